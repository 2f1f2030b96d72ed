// SPDX-License-Identifier: MPL-2.0
//! Checks of the container images (`docker/`) that need no Docker engine: every Debian package
//! the Dockerfiles install exists in Debian 12, every COPY source exists in the repository or is
//! an artefact the build stage's cargo command produces, the libtorch files copied into the CPU
//! image cover what the built `rivulet` binary loads, the entry point, port, environment, user and
//! health check are what the Livepeer worker expects (docs/runner.md, "Deployment and worker
//! polling", "Environment variables"), the
//! HEALTHCHECK command itself works against a live `/health`, the compose file and the README's
//! `aiModels.json` are consistent, the shipped `styletransfer` model lands where the pipeline
//! search path looks (replayed in a scratch root with the registry itself) and templates sit on
//! compose's named volume, and hadolint passes.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const LIBTORCH: &str = "/opt/libtorch-2.11.0";
const LIBTORCH_LIB: &str = "/opt/libtorch-2.11.0/torch/lib";
/// The wheels and versions of the libtorch pip line (README.md, "Build facts"), verbatim.
const LIBTORCH_WHEELS: &str =
    "torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85";
const IMAGES: [&str; 2] = ["Dockerfile.cpu", "Dockerfile.cuda"];
/// What the images ship from the build stage's target/release.
const ARTEFACTS: [&str; 6] = [
    "rivulet",
    "trickle-server",
    "rivulet-inference",
    "libgsttrickle.so",
    "libgstaipipeline.so",
    "libgstrivuletoverlay.so",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("launch/ has a parent")
        .to_path_buf()
}

fn docker_dir() -> PathBuf {
    repo().join("docker")
}

/// What these checks need from the host; `scripts/setup` (run by `make test`) installs it.
/// A missing piece is a failure that says what to install, never a silent skip.
fn require(ok: bool, what: &str) {
    assert!(
        ok,
        "{what}: run `scripts/setup` (as root) on a Debian 12 host, as `make test` does"
    );
}

/// A tool on PATH, from the Debian package `package`.
fn require_tool(tool: &str, package: &str) {
    require(
        have(tool),
        &format!("{tool} not found (Debian package {package})"),
    );
}

// ---------------------------------------------------------------------------------------------
// A small Dockerfile parser: comments dropped, continuation lines joined, stages split on FROM.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Instr {
    line: usize,
    keyword: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    image: String,
    name: Option<String>,
    instrs: Vec<Instr>,
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &Instr> {
        self.instrs.iter().filter(move |i| i.keyword == keyword)
    }

    fn one(&self, keyword: &str) -> &Instr {
        let v: Vec<_> = self.all(keyword).collect();
        assert_eq!(
            v.len(),
            1,
            "stage {:?} must have exactly one {keyword}",
            self.name
        );
        v[0]
    }

    /// ENV key=value pairs (later ones win), values unquoted.
    fn env(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for i in self.all("ENV") {
            for tok in shell_words(&i.args) {
                let (k, v) = tok
                    .split_once('=')
                    .unwrap_or_else(|| panic!("line {}: ENV must use key=value: {tok}", i.line));
                m.insert(k.to_owned(), v.to_owned());
            }
        }
        m
    }

    /// The RUN commands, flags such as --mount removed.
    fn runs(&self) -> Vec<&str> {
        self.all("RUN")
            .map(|i| {
                let mut s = i.args.as_str();
                while s.starts_with("--") {
                    s = s.split_once(' ').map(|(_, r)| r.trim_start()).unwrap_or("");
                }
                s
            })
            .collect()
    }

    /// (flags, sources, destination) of each COPY.
    fn copies(&self) -> Vec<(Vec<String>, Vec<String>, String, usize)> {
        self.all("COPY")
            .map(|i| {
                let words = shell_words(&i.args);
                let (flags, rest): (Vec<_>, Vec<_>) =
                    words.into_iter().partition(|w| w.starts_with("--"));
                assert!(
                    rest.len() >= 2,
                    "line {}: COPY needs a source and a destination",
                    i.line
                );
                let (dest, srcs) = rest.split_last().expect("non-empty");
                (flags, srcs.to_vec(), dest.clone(), i.line)
            })
            .collect()
    }
}

struct Dockerfile {
    name: String,
    text: String,
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn load(name: &str) -> Dockerfile {
        let path = docker_dir().join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut instrs = Vec::new();
        let mut pending: Option<(usize, String)> = None;
        for (n, raw) in text.lines().enumerate() {
            let trimmed = raw.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_none()) {
                continue;
            }
            let (cont, body) = match trimmed.strip_suffix('\\') {
                Some(b) => (true, b.trim_end()),
                None => (false, trimmed),
            };
            let (start, mut acc) = pending.take().unwrap_or((n + 1, String::new()));
            if !acc.is_empty() && !body.is_empty() {
                acc.push(' ');
            }
            acc.push_str(body);
            if cont {
                pending = Some((start, acc));
            } else if !acc.is_empty() {
                let (kw, args) = acc.split_once(char::is_whitespace).unwrap_or((&acc, ""));
                instrs.push(Instr {
                    line: start,
                    keyword: kw.to_ascii_uppercase(),
                    args: args.trim().to_owned(),
                });
            }
        }
        assert!(
            pending.is_none(),
            "{name}: file ends inside a continuation line"
        );
        let mut stages: Vec<Stage> = Vec::new();
        for i in instrs {
            if i.keyword == "FROM" {
                let w: Vec<&str> = i.args.split_whitespace().collect();
                let (image, name) = match w.as_slice() {
                    [img] => (img.to_string(), None),
                    [img, as_, n] if as_.eq_ignore_ascii_case("as") => {
                        (img.to_string(), Some(n.to_string()))
                    }
                    _ => panic!("{name} line {}: unexpected FROM {}", i.line, i.args),
                };
                stages.push(Stage {
                    image,
                    name,
                    instrs: Vec::new(),
                });
            } else {
                let stage = stages.last_mut().unwrap_or_else(|| {
                    panic!("{name} line {}: {} before any FROM", i.line, i.keyword)
                });
                stage.instrs.push(i);
            }
        }
        Dockerfile {
            name: name.to_owned(),
            text,
            stages,
        }
    }

    fn build(&self) -> &Stage {
        let s = &self.stages[0];
        assert_eq!(
            s.name.as_deref(),
            Some("build"),
            "{}: first stage must be `AS build`",
            self.name
        );
        s
    }

    fn runtime(&self) -> &Stage {
        assert_eq!(
            self.stages.len(),
            2,
            "{}: a build stage and a runtime stage",
            self.name
        );
        &self.stages[1]
    }

    fn is_cuda(&self) -> bool {
        self.name.ends_with(".cuda")
    }
}

/// Splits on whitespace, honouring double and single quotes (enough for ENV and COPY lines).
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    assert!(quote.is_none(), "unbalanced quotes in {s}");
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The packages of every `apt-get install` in a RUN command.
fn apt_packages(run: &str) -> Vec<String> {
    let mut pkgs = Vec::new();
    for part in run.split("&&").flat_map(|p| p.split(';')) {
        let words: Vec<&str> = part.split_whitespace().collect();
        if let Some(pos) = words
            .windows(2)
            .position(|w| w[0] == "apt-get" && w[1] == "install")
        {
            pkgs.extend(
                words[pos + 2..]
                    .iter()
                    .filter(|w| !w.starts_with('-'))
                    .map(|w| w.to_string()),
            );
        }
    }
    pkgs
}

fn run_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn host_is_bookworm() -> bool {
    std::fs::read_to_string("/etc/os-release")
        .is_ok_and(|s| s.contains("VERSION_CODENAME=bookworm"))
}

// ---------------------------------------------------------------------------------------------
// The build: what cargo produces, and the libtorch install.
// ---------------------------------------------------------------------------------------------

/// File names under target/<profile>/ produced by `cargo build -p <pkgs>`: bins and cdylibs.
fn cargo_artefacts(packages: &[String]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let mut names = BTreeSet::new();
    let pkgs = meta["packages"].as_array().expect("packages");
    for wanted in packages {
        let pkg = pkgs
            .iter()
            .find(|p| p["name"] == wanted.as_str())
            .unwrap_or_else(|| panic!("`-p {wanted}` is not a workspace package"));
        for t in pkg["targets"].as_array().expect("targets") {
            let kinds: Vec<&str> = t["kind"]
                .as_array()
                .expect("kind")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let name = t["name"].as_str().expect("target name");
            if kinds.contains(&"bin") {
                names.insert(name.to_owned());
            }
            if kinds.contains(&"cdylib") {
                names.insert(format!("lib{}.so", name.replace('-', "_")));
            }
        }
    }
    names
}

/// The build stage's cargo command: `cargo build --release ... -p X -p Y`, and its workdir.
fn cargo_build(stage: &Stage, df: &str) -> (Vec<String>, String) {
    let builds: Vec<&str> = stage
        .runs()
        .into_iter()
        .filter(|r| r.contains("cargo build"))
        .collect();
    assert_eq!(
        builds.len(),
        1,
        "{df}: one `cargo build` in the build stage"
    );
    let words: Vec<&str> = builds[0].split_whitespace().collect();
    assert!(words.contains(&"--release"), "{df}: cargo build --release");
    assert!(
        words.contains(&"--locked"),
        "{df}: cargo build --locked (Cargo.lock is committed)"
    );
    let pkgs: Vec<String> = words
        .windows(2)
        .filter(|w| w[0] == "-p" || w[0] == "--package")
        .map(|w| w[1].to_owned())
        .collect();
    assert!(
        pkgs.contains(&"rivulet-launch".to_owned()),
        "{df}: the build must include -p rivulet-launch"
    );
    let workdir = stage
        .all("WORKDIR")
        .last()
        .map(|i| i.args.clone())
        .unwrap_or_else(|| "/".into());
    (pkgs, workdir)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn licence_headers() {
    let docker_files = [
        "Dockerfile.cpu",
        "Dockerfile.cuda",
        "Dockerfile.cpu.dockerignore",
        "Dockerfile.cuda.dockerignore",
        "compose.yaml",
        "hadolint.yaml",
    ];
    for f in docker_files {
        let text = std::fs::read_to_string(docker_dir().join(f)).expect(f);
        assert_eq!(
            text.lines().next(),
            Some("# SPDX-License-Identifier: MPL-2.0"),
            "docker/{f} must start with the SPDX line"
        );
    }
    for script in ["scripts/lint-docker", "docker/replay-runtime-stage"] {
        let text = std::fs::read_to_string(repo().join(script)).expect(script);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("#!/usr/bin/env bash"), "{script}");
        assert_eq!(
            lines.next(),
            Some("# SPDX-License-Identifier: MPL-2.0"),
            "{script}"
        );
    }
    let makefile = std::fs::read_to_string(repo().join("Makefile")).expect("Makefile");
    let test_target: Vec<&str> = makefile
        .split("\ntest:")
        .nth(1)
        .expect("Makefile has a test target")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('\t'))
        .map(str::trim)
        .collect();
    let lint = test_target
        .iter()
        .position(|l| *l == "bash scripts/lint-docker");
    let test = test_target.iter().position(|l| l.starts_with("cargo test"));
    assert!(
        matches!((lint, test), (Some(a), Some(b)) if a < b),
        "`make test` must run scripts/lint-docker before cargo test: {test_target:?}"
    );
}

#[test]
fn stages_and_base_images() {
    for name in IMAGES {
        let df = Dockerfile::load(name);
        assert_eq!(df.build().image, "rust:1.95-bookworm", "{name}: build base");
        let rt = df.runtime();
        assert_eq!(
            rt.image, "debian:bookworm-slim",
            "{name}: runtime base (Debian 12)"
        );
        assert_eq!(
            rt.name.as_deref(),
            Some("runtime"),
            "{name}: runtime stage name"
        );
        // The runtime stage takes nothing from the build stage but files.
        for (flags, _, _, line) in rt.copies() {
            if let Some(from) = flags.iter().find_map(|f| f.strip_prefix("--from=")) {
                assert_eq!(from, "build", "{name} line {line}: COPY --from=build only");
            }
        }
    }
    // The Rust toolchain the image builds with is the workspace's rust-version.
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    assert!(
        cargo.contains("rust-version = \"1.95\""),
        "workspace rust-version is 1.95"
    );
}

#[test]
fn apt_packages_exist_in_debian_12() {
    let mut all = BTreeSet::new();
    for name in IMAGES {
        let df = Dockerfile::load(name);
        let build: Vec<String> = df
            .build()
            .runs()
            .iter()
            .flat_map(|r| apt_packages(r))
            .collect();
        let runtime: Vec<String> = df
            .runtime()
            .runs()
            .iter()
            .flat_map(|r| apt_packages(r))
            .collect();
        for p in [
            "pkg-config",
            "libglib2.0-dev",
            "libgstreamer1.0-dev",
            "libgstreamer-plugins-base1.0-dev",
            "python3-pip",
        ] {
            assert!(
                build.iter().any(|b| b == p),
                "{name}: build stage must install {p}"
            );
        }
        for p in [
            "gstreamer1.0-tools",
            "gstreamer1.0-plugins-base",
            "gstreamer1.0-plugins-good",
            "gstreamer1.0-plugins-bad",
            "gstreamer1.0-plugins-ugly",
            "gstreamer1.0-libav",
            "curl",
            "ca-certificates",
        ] {
            assert!(
                runtime.iter().any(|b| b == p),
                "{name}: runtime stage must install {p}"
            );
        }
        for run in df.build().runs().iter().chain(df.runtime().runs().iter()) {
            if run.contains("apt-get install") {
                assert!(
                    run.contains("--no-install-recommends")
                        && run.contains("rm -rf /var/lib/apt/lists"),
                    "{name}: apt-get install with --no-install-recommends, lists removed: {run}"
                );
            }
        }
        all.extend(build);
        all.extend(runtime);
    }
    require_tool("apt-cache", "apt");
    require(
        host_is_bookworm(),
        "this host is not Debian 12 (bookworm): its apt index says nothing about the images",
    );
    let known = |p: &str| {
        run_ok(Command::new("apt-cache").args(["show", "--no-all-versions", p]))
            .is_some_and(|text| text.contains(&format!("Package: {p}\n")))
    };
    let installed = |p: &str| {
        run_ok(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
            .is_some_and(|s| s.ends_with(" installed"))
    };
    let missing: Vec<&String> = all.iter().filter(|p| !known(p) && !installed(p)).collect();
    require(
        missing.is_empty() || known("gstreamer1.0-plugins-bad") || known("python3-pip"),
        &format!("the apt index is empty here (no apt-get update): cannot check {missing:?}"),
    );
    assert!(
        missing.is_empty(),
        "neither in this Debian 12 apt index nor installed: {missing:?}"
    );
    println!(
        "{} Debian packages checked with apt-cache show: {all:?}",
        all.len()
    );
}

#[test]
fn copy_sources_exist_or_are_built() {
    let ignore = std::fs::read_to_string(docker_dir().join("Dockerfile.cpu.dockerignore"))
        .expect("dockerignore");
    for name in IMAGES {
        let df = Dockerfile::load(name);
        // Each image has its own ignore file (BuildKit: <Dockerfile>.dockerignore), all alike.
        let own = std::fs::read_to_string(docker_dir().join(format!("{name}.dockerignore")))
            .unwrap_or_else(|e| panic!("docker/{name}.dockerignore: {e}"));
        assert_eq!(own.replace(".cuda", ".cpu"), ignore, "{name}.dockerignore");
        let ignored: Vec<&str> = ignore
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        for must in ["target/", ".git/", "out/"] {
            assert!(
                ignored.contains(&must),
                "{name}.dockerignore must exclude {must}"
            );
        }

        // Context COPYs: each source exists in the repository and is not ignored.
        let build = df.build();
        for (flags, srcs, _, line) in build.copies() {
            assert!(
                flags.is_empty(),
                "{name} line {line}: plain COPY in the build stage"
            );
            for s in srcs {
                let p = repo().join(&s);
                assert!(
                    p.exists(),
                    "{name} line {line}: COPY source {s} is not in the repository"
                );
                assert!(
                    !ignored
                        .iter()
                        .any(|i| s.trim_end_matches('/').starts_with(i.trim_end_matches('/'))),
                    "{name} line {line}: COPY source {s} is excluded by the dockerignore"
                );
            }
        }
        // Every workspace member and the cargo config are in the build context.
        let copied: BTreeSet<String> = build
            .copies()
            .into_iter()
            .flat_map(|(_, s, _, _)| s)
            .map(|s| s.trim_end_matches('/').to_owned())
            .collect();
        let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
        let members = manifest
            .split("members = [")
            .nth(1)
            .and_then(|s| s.split(']').next())
            .expect("workspace members");
        for m in members
            .split(',')
            .map(|m| m.trim().trim_matches('"'))
            .filter(|m| !m.is_empty())
        {
            assert!(
                copied.contains(m),
                "{name}: workspace member {m} is not copied"
            );
        }
        for f in ["Cargo.toml", "Cargo.lock", ".cargo"] {
            assert!(copied.contains(f), "{name}: {f} is not copied");
        }

        // Build-stage COPYs in the runtime stage: libtorch files that the build stage's pip
        // install produces (this host installs the same wheels at the same path), and cargo
        // artefacts the build stage's cargo command produces.
        let (pkgs, workdir) = cargo_build(build, name);
        let produced = cargo_artefacts(&pkgs);
        let release = format!("{}/target/release/", workdir.trim_end_matches('/'));
        let mut shipped = BTreeSet::new();
        for (flags, srcs, dest, line) in df.runtime().copies() {
            if !flags.iter().any(|f| f.starts_with("--from=")) {
                // From the build context: the shipped model files.
                for s in srcs {
                    assert!(
                        s.starts_with("models/") && repo().join(&s).is_file(),
                        "{name} line {line}: context COPY source {s} must be a file under models/"
                    );
                    assert!(
                        !ignored
                            .iter()
                            .any(|i| s.starts_with(i.trim_end_matches('/'))),
                        "{name} line {line}: COPY source {s} is excluded by the dockerignore"
                    );
                }
                continue;
            }
            for s in srcs {
                if let Some(file) = s.strip_prefix(&release) {
                    assert!(
                        produced.contains(file),
                        "{name} line {line}: {s} is not produced by `cargo build -p {pkgs:?}` \
                         (it produces {produced:?})"
                    );
                    shipped.insert(file.to_owned());
                } else if s.starts_with(LIBTORCH) {
                    require(
                        Path::new(LIBTORCH_LIB).join("libtorch_cpu.so").exists(),
                        &format!("{LIBTORCH} not installed here: cannot check {s}"),
                    );
                    assert!(
                        Path::new(&s).exists(),
                        "{name} line {line}: {s} is not in the libtorch install"
                    );
                    assert!(
                        dest.starts_with(LIBTORCH),
                        "{name} line {line}: libtorch files keep their absolute path, not {dest}"
                    );
                } else {
                    panic!("{name} line {line}: unexpected build-stage source {s}");
                }
            }
        }
        let expected: BTreeSet<String> = ARTEFACTS.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            shipped, expected,
            "{name}: the image ships exactly these artefacts"
        );
        // The binary this very test was built with has the name the Dockerfile copies.
        assert_eq!(
            Path::new(env!("CARGO_BIN_EXE_rivulet"))
                .file_name()
                .and_then(|f| f.to_str()),
            Some("rivulet")
        );
    }
}

#[test]
fn entrypoint_port_env_user_and_plugin_path() {
    for name in IMAGES {
        let df = Dockerfile::load(name);
        let rt = df.runtime();
        let ep: Vec<String> = serde_json::from_str(&rt.one("ENTRYPOINT").args)
            .unwrap_or_else(|e| panic!("{name}: ENTRYPOINT must be a JSON array: {e}"));
        assert_eq!(
            ep,
            ["/usr/local/bin/rivulet", "serve"],
            "{name}: entry point"
        );
        assert!(
            rt.all("CMD").next().is_none(),
            "{name}: no CMD (the worker passes none either)"
        );

        // Where each shipped artefact lands.
        let mut dest_of = BTreeMap::new();
        for (_, srcs, dest, _) in rt.copies() {
            for s in srcs {
                let file = s.rsplit('/').next().unwrap_or_default().to_owned();
                dest_of.insert(file, dest.clone());
            }
        }
        assert_eq!(
            dest_of.get("rivulet").map(String::as_str),
            Some("/usr/local/bin/")
        );
        assert_eq!(
            dest_of.get("trickle-server").map(String::as_str),
            Some("/usr/local/bin/")
        );

        let env = rt.env();
        let want = [
            ("HOST", "0.0.0.0"),
            ("PORT", "8000"),
            ("PIPELINE", "live-video-to-video"),
            ("MODEL_ID", "noop"),
            ("MODEL_DIR", "/models"),
            // Templates on a volume (compose names it).
            ("RIVULET_DATA_DIR", "/var/lib/rivulet"),
            // libgomp sleeps between frames instead of spinning (no re-exec of the daemon).
            ("OMP_WAIT_POLICY", "PASSIVE"),
        ];
        for (k, v) in want {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{name}: ENV {k}");
        }
        let device = env.get("RIVULET_DEVICE").map(String::as_str);
        assert_eq!(
            device,
            Some(if df.is_cuda() { "auto" } else { "cpu" }),
            "{name}: device"
        );
        if df.is_cuda() {
            assert_eq!(
                env.get("NVIDIA_DRIVER_CAPABILITIES").map(String::as_str),
                Some("compute,utility")
            );
        }
        let plugin_dir = env.get("GST_PLUGIN_PATH").expect("GST_PLUGIN_PATH");
        for p in [
            "libgsttrickle.so",
            "libgstaipipeline.so",
            "libgstrivuletoverlay.so",
        ] {
            assert_eq!(
                dest_of.get(p).map(|d| d.trim_end_matches('/')),
                Some(plugin_dir.as_str()),
                "{name}: {p} must be in GST_PLUGIN_PATH"
            );
        }

        let expose: Vec<&str> = rt.all("EXPOSE").map(|i| i.args.as_str()).collect();
        assert_eq!(
            expose,
            ["8000"],
            "{name}: EXPOSE 8000 (docs/runner.md, Deployment and worker polling)"
        );
        assert_eq!(
            rt.one("STOPSIGNAL").args,
            "SIGINT",
            "{name}: the daemon stops on SIGINT"
        );

        // Non-root, numeric, and the user the image creates; /models exists for the mount.
        let user = &rt.one("USER").args;
        let (uid, gid) = user.split_once(':').expect("USER uid:gid");
        assert!(
            [uid, gid]
                .iter()
                .all(|n| n.parse::<u32>().is_ok_and(|n| n != 0)),
            "{name}: USER must be a non-root numeric uid:gid, not {user}"
        );
        let runs = rt.runs().join("\n");
        assert!(
            runs.contains(&format!("groupadd --gid {gid} rivulet"))
                && runs.contains(&format!("useradd --uid {uid} --gid {gid} ")),
            "{name}: the image creates user rivulet as {uid}:{gid}"
        );
        assert!(
            runs.contains("install -d -o rivulet -g rivulet /models /var/lib/rivulet"),
            "{name}: /models mount point and the data dir, owned by the runtime user"
        );

        // The ENTRYPOINT's subcommand exists in the binary that was built.
        let help = Command::new(env!("CARGO_BIN_EXE_rivulet"))
            .args(["serve", "--help"])
            .output()
            .expect("rivulet runs");
        assert!(help.status.success(), "`rivulet serve --help` fails");
        assert!(String::from_utf8_lossy(&help.stdout).contains("--port"));
    }
}

/// libtorch as README.md's "Build facts" say: the pip line, the path, the rpath.
#[test]
fn libtorch_as_build_facts_say() {
    let config =
        std::fs::read_to_string(repo().join(".cargo/config.toml")).expect(".cargo/config.toml");
    assert!(
        config.contains("LIBTORCH = \"/opt/libtorch-2.11.0/torch\""),
        ".cargo/config.toml LIBTORCH"
    );
    for name in IMAGES {
        let df = Dockerfile::load(name);
        let pips: Vec<&str> = df
            .build()
            .runs()
            .into_iter()
            .filter(|r| r.contains("pip install"))
            .collect();
        assert_eq!(pips.len(), 1, "{name}: one pip install in the build stage");
        let pip = pips[0];
        assert!(
            pip.contains(&format!("--target {LIBTORCH} {LIBTORCH_WHEELS}")),
            "{name}: {pip}"
        );
        assert!(pip.contains("--no-cache-dir"), "{name}: pip --no-cache-dir");
        // CPU: exactly README.md's line; CUDA: the same WITH torch's NVIDIA dependencies.
        assert_eq!(
            pip.contains("--no-deps"),
            !df.is_cuda(),
            "{name}: --no-deps only in the CPU image"
        );
        let libdirs: Vec<String> = df
            .runtime()
            .copies()
            .into_iter()
            .filter(|(_, s, _, _)| s.iter().any(|s| s.starts_with(LIBTORCH)))
            .map(|(_, _, d, _)| d.trim_end_matches('/').to_owned())
            .collect();
        assert!(
            libdirs.contains(&LIBTORCH_LIB.to_owned()),
            "{name}: libtorch goes to {LIBTORCH_LIB}"
        );
        if df.is_cuda() {
            assert!(
                libdirs.contains(&format!("{LIBTORCH}/nvidia")),
                "{name}: the NVIDIA wheels' libraries"
            );
        }
    }
    // The absolute rpath of the binary that was built is the path the images use.
    require_tool("readelf", "binutils");
    let dynamic = run_ok(Command::new("readelf").args(["-d", env!("CARGO_BIN_EXE_rivulet")]))
        .expect("readelf -d rivulet");
    let rpath = dynamic
        .lines()
        .find(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .expect("rivulet has an rpath");
    assert!(
        rpath.contains(&format!("[{LIBTORCH_LIB}]")),
        "rpath: {rpath}"
    );
}

/// Every library under /opt/libtorch-2.11.0 that the built binary loads is in the CPU image, and
/// every system library it loads comes from a package the runtime stage installs (or from
/// their dependencies).
#[test]
fn cpu_image_has_what_rivulet_loads() {
    require_tool("ldd", "libc-bin");
    require(
        Path::new(LIBTORCH_LIB).join("libtorch_cpu.so").exists(),
        &format!("{LIBTORCH} not installed: cannot resolve rivulet's libraries"),
    );
    let df = Dockerfile::load("Dockerfile.cpu");
    let rt = df.runtime();
    let mut in_image = BTreeSet::new();
    for (_, srcs, dest, _) in rt.copies() {
        for s in srcs.iter().filter(|s| s.starts_with(LIBTORCH)) {
            let file = s.rsplit('/').next().unwrap_or_default();
            in_image.insert(format!("{}/{file}", dest.trim_end_matches('/')));
        }
    }
    let ldd = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_rivulet"))
        .output()
        .expect("ldd runs");
    let text = String::from_utf8_lossy(&ldd.stdout);
    assert!(!text.contains("not found"), "unresolved libraries:\n{text}");
    let mut system = BTreeSet::new();
    let mut torch = BTreeSet::new();
    for line in text.lines() {
        let Some((_, rest)) = line.split_once("=> ") else {
            continue;
        };
        let path = rest.split(" (").next().unwrap_or_default().trim();
        if path.starts_with(LIBTORCH) {
            let canonical = std::fs::canonicalize(path).expect("resolved path exists");
            let normal = canonical.to_string_lossy().into_owned();
            assert!(
                in_image.contains(path) || in_image.contains(&normal),
                "rivulet loads {path}, which the CPU image does not copy (it copies {in_image:?})"
            );
            torch.insert(path.to_owned());
        } else if !path.is_empty() {
            system.insert(path.to_owned());
        }
    }
    assert!(
        torch.iter().any(|p| p.ends_with("libtorch_cpu.so")),
        "rivulet links libtorch_cpu"
    );
    println!("libtorch files rivulet loads, all in the CPU image: {torch:?}");

    require_tool("dpkg", "dpkg");
    require_tool("apt-cache", "apt");
    require(
        host_is_bookworm(),
        "not a Debian 12 host: cannot map system libraries to packages",
    );
    let runtime_pkgs: Vec<String> = rt.runs().iter().flat_map(|r| apt_packages(r)).collect();
    let mut args = vec![
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
    ];
    args.extend(runtime_pkgs.iter().map(String::as_str));
    let closure_text = run_ok(Command::new("apt-cache").args(&args)).expect("apt-cache depends");
    let closure: BTreeSet<String> = closure_text
        .lines()
        .map(|l| {
            let l = l.trim().trim_start_matches('|');
            let l = l.split_once(": ").map(|(_, p)| p).unwrap_or(l);
            l.trim_matches(|c| c == '<' || c == '>')
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    for lib in &system {
        let canonical = std::fs::canonicalize(lib).expect("resolved path exists");
        let owner = run_ok(Command::new("dpkg").arg("-S").arg(&canonical))
            .or_else(|| {
                let usr = canonical
                    .to_string_lossy()
                    .replacen("/usr/lib/", "/lib/", 1);
                run_ok(Command::new("dpkg").args(["-S", &usr]))
            })
            .unwrap_or_else(|| panic!("no Debian package owns {lib}"));
        let pkg = owner
            .split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let essential =
            run_ok(Command::new("dpkg-query").args(["-W", "-f=${Essential} ${Priority}", &pkg]))
                .is_some_and(|s| s.starts_with("yes") || s.contains("required"));
        assert!(
            closure.contains(&pkg) || essential,
            "{lib} comes from {pkg}, which the runtime stage does not install"
        );
    }
    println!(
        "{} system libraries of rivulet come from the runtime packages",
        system.len()
    );
}

/// Runs the HEALTHCHECK command against a one-request HTTP server answering a given status.
fn healthcheck_with(cmd: &str, status: &str) -> bool {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let body = format!("{{\"status\":\"{status}\"}}");
    let server = std::thread::spawn(move || {
        if let Ok((mut sock, _)) = listener.accept() {
            let mut reader = BufReader::new(sock.try_clone().expect("clone"));
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let _ = write!(
                sock,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            request
        } else {
            String::new()
        }
    });
    // As in the container: a clean environment (no proxy variables) with PORT set.
    let status_ok = Command::new("/bin/sh")
        .args(["-c", cmd])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("PORT", port.to_string())
        .status()
        .expect("sh runs")
        .success();
    let request = server.join().expect("server thread");
    assert!(
        request.starts_with("GET /health "),
        "the health check asked for {request:?}"
    );
    status_ok
}

#[test]
fn healthcheck_probes_health() {
    for name in IMAGES {
        let df = Dockerfile::load(name);
        let hc = &df.runtime().one("HEALTHCHECK").args;
        let cmd_json = hc
            .split_once("CMD ")
            .map(|(_, c)| c)
            .expect("HEALTHCHECK CMD");
        let argv: Vec<String> =
            serde_json::from_str(cmd_json).expect("HEALTHCHECK CMD as a JSON array");
        assert_eq!(
            argv[..2],
            ["/bin/sh", "-c"],
            "{name}: health check through sh -c"
        );
        let cmd = &argv[2];
        assert!(
            cmd.contains("http://127.0.0.1:${PORT}/health"),
            "{name}: probes /health: {cmd}"
        );
        assert!(
            hc.contains("--start-period=180s"),
            "{name}: loading may take 180 s (docs/runner.md, Deployment and worker polling)"
        );
        require_tool("curl", "curl");
        for (status, healthy) in [
            ("IDLE", true),
            ("OK", true),
            ("LOADING", true),
            ("ERROR", false),
        ] {
            assert_eq!(
                healthcheck_with(cmd, status),
                healthy,
                "{name}: /health says {status}"
            );
        }
    }
}

/// The elements the image's build-time smoke test asks for exist: ours from the statically
/// registered plugins, the others from this host's GStreamer packages (the same Debian 12 ones).
#[test]
fn smoke_test_elements_exist() {
    rivulet::init_gstreamer().expect("GStreamer and the plugins initialise");
    for name in IMAGES {
        let df = Dockerfile::load(name);
        let runs = df.runtime().runs();
        let smoke = runs
            .iter()
            .find(|r| r.contains("gst-inspect-1.0"))
            .unwrap_or_else(|| {
                panic!("{name}: the runtime stage runs a gst-inspect-1.0 smoke test")
            });
        let list = smoke
            .split("for e in ")
            .nth(1)
            .and_then(|s| s.split("; do").next())
            .expect("for e in ...; do");
        let elements: Vec<&str> = list.split_whitespace().collect();
        for must in [
            "tricklesrc",
            "tricklesink",
            "aipipeline",
            "loadingoverlay",
            "x264enc",
            "mpegtsmux",
        ] {
            assert!(
                elements.contains(&must),
                "{name}: the smoke test checks {must}"
            );
        }
        for e in &elements {
            assert!(
                gst::ElementFactory::find(e).is_some(),
                "{name}: element {e} does not exist here"
            );
        }
        assert!(gst::ElementFactory::find("no-such-element").is_none());
    }
}

#[test]
fn compose_file() {
    let text = std::fs::read_to_string(docker_dir().join("compose.yaml")).expect("compose.yaml");
    let values = |key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}:")))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .collect()
    };
    let dockerfiles = values("dockerfile");
    assert_eq!(
        dockerfiles,
        ["docker/Dockerfile.cpu", "docker/Dockerfile.cuda"]
    );
    for ctx in values("context") {
        // Relative to docker/, the context is the repository root.
        let root = docker_dir()
            .join(&ctx)
            .canonicalize()
            .expect("context exists");
        assert_eq!(root, repo().canonicalize().expect("repo"), "context {ctx}");
    }
    for d in &dockerfiles {
        assert!(repo().join(d).exists(), "{d}");
    }
    assert!(
        text.contains("- \"127.0.0.1:8000:8000\""),
        "CPU service on port 8000"
    );
    // No test models mounted: the images carry the shipped model. Templates and job outputs
    // (RIVULET_DATA_DIR, the images' /var/lib/rivulet) persist on a named volume.
    assert!(
        !text.contains("testdata"),
        "compose must not mount the test pipelines"
    );
    let yaml: serde_norway::Value = serde_norway::from_str(&text).expect("compose.yaml parses");
    let data_dir = Dockerfile::load("Dockerfile.cpu").runtime().env()["RIVULET_DATA_DIR"].clone();
    let services = yaml["services"].as_mapping().expect("services");
    assert_eq!(services.len(), 2);
    for (svc, def) in services {
        let mounts: Vec<&str> = def["volumes"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{svc:?}: volumes"))
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(
            mounts,
            [format!("rivulet-data:{data_dir}")],
            "{svc:?}: the named data volume at RIVULET_DATA_DIR"
        );
        assert!(
            def["environment"].get("RIVULET_DATA_DIR").is_none(),
            "{svc:?}: RIVULET_DATA_DIR is the image's"
        );
    }
    let volumes = yaml["volumes"].as_mapping().expect("top-level volumes");
    assert!(
        volumes.contains_key("rivulet-data"),
        "rivulet-data is a named volume"
    );
    assert_eq!(values("stop_signal"), ["SIGINT", "SIGINT"]);
}

/// The README's aiModels.json entry has the fields go-livepeer's AIModelConfig reads.
#[test]
fn readme_ai_models_entry() {
    let text = std::fs::read_to_string(docker_dir().join("README.md")).expect("docker/README.md");
    let blocks: Vec<&str> = text
        .split("```json\n")
        .skip(1)
        .filter_map(|b| b.split("\n```").next())
        .collect();
    assert!(!blocks.is_empty(), "docker/README.md has json blocks");
    // go-livepeer core/ai.go, AIModelConfig's json tags.
    let known = [
        "pipeline",
        "model_id",
        "url",
        "token",
        "warm",
        "capacity",
        "optimization_flags",
        "gateway",
        "price_per_unit",
        "pixels_per_unit",
        "currency",
    ];
    let mut entries = 0;
    for b in blocks {
        let v: Value =
            serde_json::from_str(b).unwrap_or_else(|e| panic!("invalid JSON in README: {e}\n{b}"));
        let Some(arr) = v.as_array() else { continue };
        for e in arr {
            let obj = e.as_object().expect("an aiModels.json entry is an object");
            for k in obj.keys() {
                assert!(
                    known.contains(&k.as_str()),
                    "aiModels.json has no field {k}"
                );
            }
            assert_eq!(obj["pipeline"], "live-video-to-video");
            assert!(obj["model_id"].as_str().is_some_and(|m| !m.is_empty()));
            if let Some(url) = obj.get("url") {
                let url = url.as_str().expect("url is a string");
                assert!(
                    url.starts_with("http://") && !url.ends_with('/'),
                    "url {url}"
                );
            }
            if let Some(w) = obj.get("warm") {
                assert!(w.is_boolean(), "warm is a boolean");
            }
            entries += 1;
        }
    }
    assert!(entries > 0, "docker/README.md shows an aiModels.json entry");
}

#[test]
fn hadolint_passes() {
    let candidates = [
        std::env::var("HADOLINT").ok(),
        Some("hadolint".to_owned()).filter(|h| have(h)),
        Some(repo().join("target/tools/hadolint-2.15.1/bin/hadolint"))
            .filter(|p| p.exists())
            .map(|p| p.to_string_lossy().into_owned()),
    ];
    let hl = candidates.into_iter().flatten().next().unwrap_or_else(|| {
        panic!(
            "hadolint 2.15.1 not installed: run `bash scripts/lint-docker` once (it installs it \
             into target/tools; `make test` runs it before the tests)"
        )
    });
    let config = docker_dir().join("hadolint.yaml");
    let out = Command::new(&hl)
        .arg("--config")
        .arg(&config)
        .args(IMAGES.map(|i| docker_dir().join(i)))
        .output()
        .expect("hadolint runs");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The lint bites: an untagged base image and an unpinned pip install are reported.
    let mut child = Command::new(&hl)
        .arg("--config")
        .arg(&config)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("hadolint runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"FROM debian\nRUN pip install torch\n")
        .expect("write");
    let bad = child.wait_with_output().expect("hadolint finishes");
    let report = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success(), "hadolint accepted a bad Dockerfile");
    assert!(
        report.contains("DL3006") && report.contains("DL3013"),
        "{report}"
    );
}

#[test]
fn dockerfile_text_names_no_other_libtorch() {
    // One libtorch everywhere: no Debian libtorch, no LD_LIBRARY_PATH, no other version.
    for name in IMAGES {
        let df = Dockerfile::load(name);
        assert!(
            !df.text.contains("LD_LIBRARY_PATH"),
            "{name}: no LD_LIBRARY_PATH"
        );
        assert!(
            !df.text.contains("libtorch-dev"),
            "{name}: no Debian libtorch"
        );
        for (i, _) in df.text.match_indices("/opt/libtorch") {
            assert!(
                df.text[i..].starts_with(LIBTORCH),
                "{name}: libtorch path other than {LIBTORCH}"
            );
        }
    }
}

/// The runtime stage's COPYs of the shipped model, replayed into a scratch root: the pipeline
/// registry, scanning the search path the image's environment gives (`SearchPath::from_sources`
/// with the image's ENV, `rivulet` in /usr/local/bin and the plugin in GST_PLUGIN_PATH; no
/// build tree), finds `styletransfer` there, with its model file beside the manifest.
#[test]
fn shipped_model_is_on_the_search_path() {
    use gstaipipeline::pipeline::{Registry, SearchPath, Sources};
    for name in IMAGES {
        let df = Dockerfile::load(name);
        let rt = df.runtime();
        let root = std::env::temp_dir().join(format!(
            "rivulet-image-{}-{}",
            name.replace('.', "-"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let mut copied = Vec::new();
        for (flags, srcs, dest, line) in rt.copies() {
            if flags.iter().any(|f| f.starts_with("--from=")) {
                continue;
            }
            assert!(
                dest.ends_with('/'),
                "{name} line {line}: COPY of several files into a folder ({dest})"
            );
            let into = root.join(dest.trim_start_matches('/'));
            std::fs::create_dir_all(&into).unwrap();
            for s in srcs {
                let file = Path::new(&s).file_name().unwrap();
                std::fs::copy(repo().join(&s), into.join(file)).unwrap();
                copied.push(format!("{dest}{}", file.to_string_lossy()));
            }
        }
        for f in ["styletransfer.toml", "styletransfer.pt", "LICENSES.md"] {
            assert!(
                copied
                    .iter()
                    .any(|c| c.ends_with(&format!("/styletransfer/{f}"))),
                "{name}: the image carries models/styletransfer/{f} ({copied:?})"
            );
        }
        let env = rt.env();
        let get = |k: &str| env.get(k).cloned();
        let plugin_dir = get("GST_PLUGIN_PATH").expect("GST_PLUGIN_PATH");
        let in_image = SearchPath::from_sources(&Sources {
            rivulet_pipelines: get("RIVULET_PIPELINES"),
            model_dir: get("MODEL_DIR"),
            xdg_data_dirs: get("XDG_DATA_DIRS"),
            exe: Some("/usr/local/bin/rivulet".into()),
            plugin_file: Some(Path::new(&plugin_dir).join("libgstaipipeline.so")),
            build_tree: None,
        });
        assert!(
            in_image
                .dirs()
                .contains(&PathBuf::from("/usr/share/rivulet/pipelines")),
            "{name}: {in_image:?}"
        );
        let scratch = SearchPath::new(
            in_image
                .dirs()
                .iter()
                .map(|d| root.join(d.strip_prefix("/").unwrap_or(d))),
        );
        let registry = Registry::scan(&scratch);
        assert!(registry.warnings.is_empty(), "{:?}", registry.warnings);
        let def = registry
            .resolve("styletransfer", None)
            .unwrap_or_else(|| panic!("{name}: {}", registry.unknown_message("styletransfer")));
        let model = def.model.expect("a model file");
        assert!(model.is_file(), "{name}: {}", model.display());
        assert_eq!(
            model,
            root.join("usr/share/rivulet/pipelines/styletransfer/styletransfer.pt")
        );
        // The build-time smoke test runs it by name, with no configuration.
        let runs = rt.runs().join("\n");
        assert!(
            runs.contains("aipipeline device=cpu pipeline=styletransfer"),
            "{name}: the smoke test runs styletransfer"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
