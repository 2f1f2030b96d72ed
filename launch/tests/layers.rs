// SPDX-License-Identifier: MPL-2.0
//! The layers of `launch/src` (ARCHITECTURE.md, "Layers of `launch/src`"): every `crate::`
//! path in a module names a module of its own layer or of one below it, never one above.

use std::path::{Path, PathBuf};

/// Top to bottom; a module may use its own layer and the ones after it.
const LAYERS: &[&[&str]] = &[
    &["serve", "demo", "registration"],
    &["http"],
    &["daemon"],
    &["session", "jobs", "check"],
    &["templates", "status", "feed", "metrics"],
    &["graph"],
    &["media"],
    &[
        "health",
        "pyjson",
        "nvml",
        "openmp",
        "config",
        "init_gstreamer",
    ],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn imports_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut checked = 0;
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let module = rel
            .iter()
            .next()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if ["lib", "main"].contains(&module.as_str()) {
            continue;
        }
        let own = layer_of(&module)
            .unwrap_or_else(|| panic!("{} is in no layer of this test's table", rel.display()));
        let text = std::fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for (at, _) in code.match_indices("crate::") {
                let used: String = code[at + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let Some(layer) = layer_of(&used) else {
                    wrong.push(format!(
                        "{}:{}: crate::{used} is in no layer",
                        rel.display(),
                        i + 1
                    ));
                    continue;
                };
                checked += 1;
                if layer < own {
                    wrong.push(format!(
                        "{}:{}: {module} uses crate::{used}, a layer above it",
                        rel.display(),
                        i + 1
                    ));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} crate:: paths found");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
