// SPDX-License-Identifier: MPL-2.0
//! What the daemon's process-level tests share: a `rivulet serve` child process with its own
//! state directory, and a line watcher for child processes' output.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `rivulet serve` child process, killed on drop.
pub struct DaemonProc {
    pub child: Child,
    /// e.g. `http://127.0.0.1:41234`
    pub base: String,
    _dir: TempDir,
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("rivulet-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads `stream` line by line on a thread, echoing each line with `tag`, and sends the rest of
/// the first line containing `marker`.
pub fn watch_for(
    stream: impl std::io::Read + Send + 'static,
    tag: &'static str,
    marker: &'static str,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if !sent && let Some(i) = line.find(marker) {
                let _ = tx.send(line[i + marker.len()..].trim().to_string());
                sent = true;
            }
            eprintln!("[{tag}] {line}");
        }
    });
    rx
}

/// Starts `rivulet serve --port 0` (status events every second) with `envs` and waits for the
/// address it listens on.
pub fn spawn_daemon(tag: &str, envs: &[(&str, &str)]) -> DaemonProc {
    let dir = TempDir::new(tag);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rivulet"));
    cmd.args(["serve", "--port", "0"])
        .env_remove("AUTH_TOKEN")
        .env_remove("MODEL_ID")
        .env("RUST_LOG", "info")
        .env("RIVULET_STATE_FILE", dir.0.join("last.json"))
        .env("RIVULET_STATUS_PERIOD_MS", "1000")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("cannot start rivulet");
    let rx = watch_for(child.stdout.take().unwrap(), "rivulet", "listening on ");
    let base = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("rivulet did not report its address");
    DaemonProc {
        child,
        base,
        _dir: dir,
    }
}

/// Creates a channel on the daemon's embedded trickle server, as an orchestrator does.
pub async fn create_channel(http: &reqwest::Client, base: &str, name: &str, mime: &str) {
    let r = http
        .post(format!("{base}/trickle/{name}"))
        .header("Expect-Content", mime)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "create {name}");
}
