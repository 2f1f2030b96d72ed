// SPDX-License-Identifier: MPL-2.0
//! `rivulet check-pipeline`: the element contract checks, run as the command a pipeline author
//! runs, against `aipipeline` (noop, a testdata model), the example external plugin
//! (`examples/gst-plugin-example-tint`, built here on its own) and elements that break the
//! contract.

use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)] // shared with the daemon tests: only TempDir is used here
mod common;
use common::TempDir;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Run {
    ok: bool,
    stdout: String,
}

impl Run {
    /// The result column of `check`'s row.
    fn result(&self, check: &str) -> &str {
        self.stdout
            .lines()
            .find_map(|l| {
                let mut cols = l.split_whitespace();
                (cols.next() == Some(check)).then(|| cols.next()).flatten()
            })
            .unwrap_or_else(|| panic!("no row for {check} in:\n{}", self.stdout))
    }
}

fn check_pipeline(args: &[&str], envs: &[(&str, &Path)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rivulet"));
    cmd.arg("check-pipeline")
        .args(args)
        .env_remove("RIVULET_PIPELINES")
        .env_remove("MODEL_DIR")
        .env("RIVULET_DEVICE", "cpu")
        .env("RUST_LOG", "warn");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cannot run rivulet");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "rivulet check-pipeline {args:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Run {
        ok: out.status.success(),
        stdout,
    }
}

const ALL_PASS: [&str; 11] = [
    "element",
    "pads",
    "params-property",
    "caps-in",
    "start",
    "caps-out",
    "pts",
    "params-applied",
    "full-replacement",
    "bad-params",
    "eos",
];

#[test]
fn noop_follows_the_contract() {
    let r = check_pipeline(&["noop"], &[]);
    assert!(r.ok, "noop must pass");
    assert!(
        r.stdout
            .contains("rivulet check-pipeline: aipipeline pipeline=noop")
    );
    for c in ALL_PASS {
        assert_eq!(r.result(c), "PASS", "{c}");
    }
    // noop applies a new size at once, without a reload (runner-compat §11).
    assert_eq!(r.result("loading-events"), "SKIP");
}

#[test]
fn testdata_model_follows_the_contract_with_loading_events() {
    let dir = workspace().join("gst-plugin-aipipeline/testdata/pipelines");
    let r = check_pipeline(&["gain"], &[("RIVULET_PIPELINES", &dir)]);
    assert!(r.ok, "gain must pass");
    for c in ALL_PASS {
        assert_eq!(r.result(c), "PASS", "{c}");
    }
    // A model reloads for a new size: loading, then online.
    assert_eq!(r.result("loading-events"), "PASS");
}

#[test]
fn elements_without_the_contract_fail_named_checks() {
    let r = check_pipeline(&["videoflip"], &[]);
    assert!(!r.ok, "videoflip must fail");
    assert_eq!(r.result("element"), "PASS");
    assert_eq!(r.result("params-property"), "FAIL");
    // 640x480 in, 640x480 out: not the params' default 512x512.
    assert_eq!(r.result("caps-out"), "FAIL");
    assert_eq!(r.result("params-applied"), "SKIP");
    assert!(r.stdout.contains("does NOT follow the element contract"));

    // `identity` is also a testdata pipeline name: --element picks the element.
    let dir = workspace().join("gst-plugin-aipipeline/testdata/pipelines");
    let r = check_pipeline(&["identity", "--element"], &[("RIVULET_PIPELINES", &dir)]);
    assert!(!r.ok);
    assert!(r.stdout.contains("element identity"));
    assert_eq!(r.result("params-property"), "FAIL");
}

#[test]
fn unknown_name_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["check-pipeline", "no-such-thing"])
        .env_remove("RIVULET_PIPELINES")
        .env_remove("MODEL_DIR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'no-such-thing' is neither an aipipeline pipeline"),
        "{err}"
    );
}

/// Builds `examples/gst-plugin-example-tint` on its own (not a workspace member) into
/// `target/examples`, and returns a fresh directory holding only its plugin, for
/// `GST_PLUGIN_PATH`.
pub fn build_example_plugin(dir: &TempDir) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("examples");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--locked", "--manifest-path"])
        .arg(workspace().join("examples/gst-plugin-example-tint/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("cannot run cargo");
    assert!(status.success(), "the example plugin does not build");
    let plugins = dir.0.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        target.join("debug/libgstrivulettint.so"),
        plugins.join("libgstrivulettint.so"),
    )
    .unwrap();
    plugins
}

#[test]
fn external_example_plugin_follows_the_contract() {
    let dir = TempDir::new("check-example");
    let plugins = build_example_plugin(&dir);
    let registry = dir.0.join("registry.bin");
    let r = check_pipeline(
        &["rivulettint"],
        &[("GST_PLUGIN_PATH", &plugins), ("GST_REGISTRY", &registry)],
    );
    assert!(r.ok, "rivulettint must pass");
    assert!(r.stdout.contains("element rivulettint"));
    for c in ALL_PASS {
        assert_eq!(r.result(c), "PASS", "{c}");
    }
    assert_eq!(r.result("loading-events"), "PASS");
}
