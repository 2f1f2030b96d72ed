// SPDX-License-Identifier: MPL-2.0
//! The elements as a new user runs them: `gst-launch-1.0` processes loading the plugin from
//! `GST_PLUGIN_PATH` (the cdylib cargo builds beside the tests), against a real server.

mod trickle_util;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use trickle_util::*;

/// A folder holding only this build's plugin. `cargo test` builds the cdylib into
/// target/<profile>/deps (beside this test binary) but copies it up to target/<profile> only on
/// `cargo build`, and pointing GST_PLUGIN_PATH at deps/ would make GStreamer try every library
/// there; so the fresh one is copied into a folder of its own.
fn plugin_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let built = exe.parent().unwrap().join("libgsttrickle.so");
        assert!(built.exists(), "{} not found", built.display());
        let dir = std::env::temp_dir().join(format!("trickle-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&built, dir.join("libgsttrickle.so")).unwrap();
        dir
    })
    .clone()
}

fn gst_launch(args: &str) -> Command {
    let mut cmd = Command::new("gst-launch-1.0");
    cmd.env("GST_PLUGIN_PATH", plugin_dir())
        .env("GST_REGISTRY", plugin_dir().join("registry.bin"))
        .args(args.split_whitespace());
    cmd
}

#[test]
fn gst_inspect_documents_both_elements() {
    for element in ["tricklesrc", "tricklesink"] {
        let out = Command::new("gst-inspect-1.0")
            .env("GST_PLUGIN_PATH", plugin_dir())
            .env("GST_REGISTRY", plugin_dir().join("registry.bin"))
            .arg(element)
            .output()
            .unwrap();
        assert!(out.status.success(), "gst-inspect-1.0 {element} failed");
        let text = String::from_utf8_lossy(&out.stdout);
        for prop in ["url", "tls-verify", "stats"] {
            assert!(text.contains(prop), "{element} does not document {prop}");
        }
    }
}

#[test]
fn launch_lines_publish_and_play() {
    init();
    let server = TestServer::start();
    let url = server.channel("launch");

    // Publish 60 frames and exit; the channel stays for the subscriber.
    let status = gst_launch(&format!(
        "videotestsrc num-buffers=60 ! video/x-raw,width=320,height=240 ! tricklesink url={url} delete-on-close=false"
    ))
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .status()
    .unwrap();
    assert!(status.success(), "publisher exited with {status}");

    // Play it back from the first segment; -m prints the element messages.
    let mut child = gst_launch(&format!(
        "-m tricklesrc url={url} start-seq=0 ! videoconvert ! fakesink"
    ))
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("trickle-segment") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(TIMEOUT)
        .expect("no trickle-segment message");
    assert!(line.contains("seq=(gint64)0"), "{line}");
    // Closing the channel ends the stream: the player exits cleanly.
    assert!(server.server.close_channel("launch"));
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = match done_rx.recv_timeout(TIMEOUT) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("gst-launch-1.0 tricklesrc did not exit after the channel closed");
        }
    };
    assert!(status.success(), "player exited with {status}");
}
