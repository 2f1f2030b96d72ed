// SPDX-License-Identifier: MPL-2.0
//! Dynamic live-runner registration (docs/live-runner.md) of a real `rivulet serve` process
//! against the orchestrator stand-in (`common/orchestrator.rs`): bootstrap and heartbeats,
//! the secret kept out of the logs, readiness, re-registration, session reconciliation, the
//! O2R channel, proxied starts with their channel and stop callbacks, unregistration on
//! SIGTERM, and misconfiguration reported without a crash.

mod common;
#[path = "common/orchestrator.rs"]
mod orchestrator;

use common::{TempDir, get_json, inference_children, now_ms, set_state, signal, wait_health};
use orchestrator::{Options, Orchestrator};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "orch-secret-for-tests";

/// A log line without its colour escapes (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `rivulet serve` whose log lines are kept.
struct Runner {
    child: Child,
    base: String,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Runner {
    /// Starts `rivulet serve --port 0` (no inference child, noop pipeline) with `envs`.
    fn spawn(tag: &str, envs: &[(&str, &str)]) -> Runner {
        let dir = TempDir::new(tag);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rivulet"));
        cmd.args(["serve", "--port", "0"])
            .env_remove("AUTH_TOKEN")
            .env_remove("MODEL_ID")
            .env_remove("RIVULET_ORCHESTRATOR")
            .env_remove("RIVULET_ORCH_SECRET")
            .env("RUST_LOG", "info")
            .env("RIVULET_ISOLATION", "none")
            .env("RIVULET_STATE_FILE", dir.0.join("last.json"))
            .env("RIVULET_DATA_DIR", dir.0.join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("cannot start rivulet");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for (stream, name) in [
            (
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
                "out",
            ),
            (Box::new(child.stderr.take().unwrap()), "err"),
        ] {
            let lines = lines.clone();
            let tx = tx.clone();
            let tag = tag.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(i) = line.find("listening on ") {
                        let _ = tx.send(line[i + "listening on ".len()..].trim().to_string());
                    }
                    let line = strip_ansi(&line);
                    eprintln!("[{tag} {name}] {line}");
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("rivulet did not report its address");
        Runner {
            child,
            base,
            lines,
            _dir: dir,
        }
    }

    fn log_has(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    fn log_count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (bounded) for a log line containing every one of `needles`.
    async fn wait_log(&self, needles: &[&str], within: Duration) -> String {
        let t = Instant::now();
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            assert!(t.elapsed() < within, "no log line with {needles:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// No log line contains `secret`.
    fn assert_not_logged(&self, secret: &str) {
        let lines = self.lines.lock().unwrap();
        assert!(!lines.is_empty());
        if let Some(l) = lines.iter().find(|l| l.contains(secret)) {
            panic!("a secret was logged: {l}");
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends SIGTERM and waits (20 s bound) for a clean exit.
    async fn terminate(&mut self) {
        // SAFETY: plain syscall on our own child.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) },
            0
        );
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "rivulet exited with {status}");
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no exit on SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn registered(o: &Orchestrator, env: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut all = vec![
        ("RIVULET_ORCHESTRATOR", o.base.clone()),
        ("RIVULET_ORCH_SECRET", SECRET.to_string()),
    ];
    all.extend(env.iter().cloned());
    all
}

fn spawn_with(tag: &str, envs: &[(&'static str, String)]) -> Runner {
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Runner::spawn(tag, &envs)
}

/// The last heartbeat the stand-in accepted from runner `id`.
fn last_accepted(o: &Orchestrator, id: &str) -> Option<Value> {
    o.with(|r| {
        r.heartbeats
            .iter()
            .rev()
            .find(|h| h.status == 200 && h.body["runner_id"] == id)
            .map(|h| h.body.clone())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_heartbeats_and_unregisters_on_sigterm() {
    let o = Orchestrator::start(Options::default()).await;
    let mut d = spawn_with(
        "reg-basic",
        &registered(
            &o,
            &[
                ("VERSION", "9.8.7".into()),
                ("RIVULET_RUNNER_ID", "rivulet-test-1".into()),
            ],
        ),
    );
    let http = reqwest::Client::new();
    // Bootstrap with the orchestrator secret, then heartbeats with the derived secret.
    o.wait(Duration::from_secs(30), "no registration", |r| {
        r.registrations == ["rivulet-test-1"]
    })
    .await;
    let (secret, o2r) = o.with(|r| {
        let x = &r.runners["rivulet-test-1"];
        (x.heartbeat_secret.clone(), x.o2r_channel.clone())
    });
    o.wait(Duration::from_secs(30), "no 3 heartbeats", |r| {
        r.heartbeats
            .iter()
            .filter(|h| h.auth == secret && h.status == 200)
            .count()
            >= 3
    })
    .await;
    let (first, rest) = o.with(|r| {
        (
            r.heartbeats[0].clone(),
            r.heartbeats[1..]
                .iter()
                .map(|h| h.auth.clone())
                .collect::<Vec<_>>(),
        )
    });
    assert_eq!(first.auth, SECRET);
    assert_eq!(first.status, 200);
    assert!(rest.iter().all(|a| *a == secret), "{rest:?}");
    // The fields.
    wait_health(&http, &d.base, "IDLE", Duration::from_secs(60)).await;
    o.wait(Duration::from_secs(30), "never ready", |r| {
        r.runners["rivulet-test-1"].request["status"] == "ready"
    })
    .await;
    let hb = last_accepted(&o, "rivulet-test-1").unwrap();
    assert_eq!(hb["runner_url"], d.base);
    assert_eq!(hb["app"], "live-video-to-video/noop");
    assert_eq!(hb["version"], "9.8.7");
    assert_eq!(hb["mode"], "persistent");
    assert_eq!(hb["capacity"], 1);
    assert_eq!(hb["session_ids"], json!([]));
    assert!(hb.get("price_info").is_none(), "{hb}");
    // NVML present: a GPU with a name; absent (CI): no gpu field.
    let nvml = get_json(&http, &format!("{}/hardware/info", d.base)).await;
    match nvml["gpu_info"].get("0") {
        Some(g) => assert_eq!(hb["gpu"]["name"], g["name"], "{hb}"),
        None => assert!(hb.get("gpu").is_none(), "{hb}"),
    }
    // The first heartbeat went out while the pipeline loaded.
    assert_eq!(first.body["status"], "loading", "{}", first.body);
    // Listed in discovery while ready.
    let disc: Value = get_json(&http, &format!("{}/discovery", o.base)).await;
    assert_eq!(disc[0]["runners"][0]["app"], "live-video-to-video/noop");
    d.wait_log(&["subscribed to the O2R channel"], Duration::from_secs(10))
        .await;
    // SIGTERM: unregistered, clean exit.
    d.terminate().await;
    o.wait(Duration::from_secs(5), "not unregistered", |r| {
        r.unregistered == ["rivulet-test-1"] && r.runners.is_empty()
    })
    .await;
    assert!(d.log_has("unregistered from the orchestrator"));
    d.assert_not_logged(SECRET);
    d.assert_not_logged(&secret);
    d.assert_not_logged(&o2r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_health_is_error() {
    let o = Orchestrator::start(Options::default()).await;
    let d = spawn_with(
        "reg-error",
        &registered(&o, &[("MODEL_ID", "no-such-pipeline".into())]),
    );
    let http = reqwest::Client::new();
    wait_health(&http, &d.base, "ERROR", Duration::from_secs(60)).await;
    o.wait(Duration::from_secs(30), "status never error", |r| {
        r.runners.values().any(|x| x.request["status"] == "error")
    })
    .await;
    // Still heartbeating (alive, not offered sessions), and not in discovery.
    let id = o.only_runner();
    let n = o.with(|r| r.heartbeats.len());
    o.wait(Duration::from_secs(30), "heartbeats stopped", |r| {
        r.heartbeats.len() >= n + 2
    })
    .await;
    assert_eq!(last_accepted(&o, &id).unwrap()["status"], "error");
    let disc: Value = get_json(&http, &format!("{}/discovery", o.base)).await;
    assert_eq!(disc[0]["runners"], json!([]), "{disc}");
    let r = http
        .post(format!("{}/apps/{id}/session", o.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    d.wait_log(
        &["runner status", "status=\"error\""],
        Duration::from_secs(5),
    )
    .await;
}

/// A stream through a proxied session, its inference child killed four times: the three
/// restarts keep the runner `ready` (its session goes on), the fourth loss is a permanent
/// ERROR and the runner turns `error`, out of discovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_through_restarts_then_error() {
    common::init_trickle();
    let o = Orchestrator::start(Options::default()).await;
    let d = spawn_with(
        "reg-restarts",
        &registered(&o, &[("RIVULET_ISOLATION", "process".into())]),
    );
    let http = reqwest::Client::new();
    wait_health(&http, &d.base, "IDLE", Duration::from_secs(60)).await;
    o.wait(Duration::from_secs(30), "never ready", |r| {
        r.runners.values().any(|x| x.request["status"] == "ready")
    })
    .await;
    let id = o.only_runner();
    let r: Value = http
        .post(format!("{}/apps/{id}/session", o.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let app_url = r["app_url"].as_str().unwrap().to_string();
    let resp = http
        .post(format!("{app_url}/live-video-to-video"))
        .json(&json!({"params": {"width": 384, "height": 384}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    let input = common::live_input(answer["subscribe_url"].as_str().unwrap());
    set_state(&input, gst::State::Playing).await;
    let first_ready = o.with(|r| r.heartbeats.len());
    let pid = d.child.id();
    let mut since = 0i64;
    let mut last_kill = 0;
    for n in 1..=4 {
        // Real output from the current child, then kill it.
        common::wait_status(
            &http,
            &d.base,
            Duration::from_secs(60),
            "no real output",
            |s| {
                s["inference_status"]["last_output_time"]
                    .as_i64()
                    .is_some_and(|t| t > since)
                    && s["inference_status"]["restart_count"] == n - 1
            },
        )
        .await;
        let children = inference_children(pid);
        assert_eq!(children.len(), 1, "one inference child: {children:?}");
        since = now_ms();
        if n == 4 {
            last_kill = o.with(|r| r.heartbeats.len());
        }
        signal(children[0], libc::SIGKILL);
    }
    wait_health(&http, &d.base, "ERROR", Duration::from_secs(30)).await;
    o.wait(Duration::from_secs(10), "status never error", |r| {
        r.runners[&id].request["status"] == "error"
    })
    .await;
    // Through the three restarts (until the fatal fourth loss) every heartbeat said ready.
    let statuses: Vec<Value> = o.with(|r| {
        r.heartbeats[first_ready..last_kill]
            .iter()
            .filter(|h| h.status == 200)
            .map(|h| h.body["status"].clone())
            .collect()
    });
    assert!(statuses.len() >= 3, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == "ready"), "{statuses:?}");
    let disc: Value = get_json(&http, &format!("{}/discovery", o.base)).await;
    assert_eq!(disc[0]["runners"], json!([]), "{disc}");
    d.wait_log(
        &["runner status", "status=\"error\""],
        Duration::from_secs(5),
    )
    .await;
    set_state(&input, gst::State::Null).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_again_when_the_orchestrator_forgets() {
    let o = Orchestrator::start(Options::default()).await;
    let mut d = spawn_with("reg-again", &registered(&o, &[]));
    o.wait(Duration::from_secs(30), "no registration", |r| {
        r.registrations.len() == 1
    })
    .await;
    let id = o.only_runner();
    // Expired (still listed): the next heartbeat gets 404, then a new bootstrap with the
    // orchestrator secret and the same runner id.
    o.expire_runner(&id);
    o.wait(
        Duration::from_secs(30),
        "no re-registration after 404",
        |r| r.registrations.len() == 2,
    )
    .await;
    assert!(o.with(|r| r.heartbeats.iter().any(|h| h.status == 404)));
    assert_eq!(
        o.with(|r| r.registrations.clone()),
        [id.clone(), id.clone()]
    );
    d.wait_log(
        &["no longer knows this runner (404)"],
        Duration::from_secs(5),
    )
    .await;
    // Forgotten without trace: its heartbeat secret is refused (401), then a new bootstrap.
    o.forget_runner(&id);
    o.wait(
        Duration::from_secs(30),
        "no re-registration after 401",
        |r| r.registrations.len() == 3,
    )
    .await;
    d.wait_log(
        &["refused the heartbeat secret (401)"],
        Duration::from_secs(5),
    )
    .await;
    let secret = o.with(|r| r.runners[&id].heartbeat_secret.clone());
    o.wait(Duration::from_secs(30), "heartbeats did not resume", |r| {
        r.heartbeats
            .iter()
            .filter(|h| h.auth == secret && h.status == 200)
            .count()
            >= 2
    })
    .await;
    // A runner that stops heartbeating expires after the TTL.
    d.child.kill().unwrap();
    let _ = d.child.wait();
    o.wait(Duration::from_secs(10), "never expired", |r| {
        r.expired.contains(&id) && r.runners.is_empty()
    })
    .await;
    d.assert_not_logged(SECRET);
    d.assert_not_logged(&secret);
}

/// Reserves a session on the stand-in and starts a stream through its proxy, with no URLs
/// in the body: the runner creates the channels through the callback.
async fn proxied_start(http: &reqwest::Client, o: &Orchestrator, id: &str) -> (String, Value) {
    let r: Value = http
        .post(format!("{}/apps/{id}/session", o.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = r["session_id"].as_str().unwrap().to_string();
    let app_url = r["app_url"].as_str().unwrap();
    let resp = http
        .post(format!("{app_url}/live-video-to-video"))
        .json(&json!({"params": {}}))
        .send()
        .await
        .unwrap();
    let code = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(code, 200, "{text}");
    (sid, serde_json::from_str(&text).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_session_is_reconciled_with_the_orchestrator() {
    let o = Orchestrator::start(Options::default()).await;
    let d = spawn_with("reg-reconcile", &registered(&o, &[]));
    let http = reqwest::Client::new();
    wait_health(&http, &d.base, "IDLE", Duration::from_secs(60)).await;
    o.wait(Duration::from_secs(30), "never ready", |r| {
        r.runners.values().any(|x| x.request["status"] == "ready")
    })
    .await;
    let id = o.only_runner();
    let (sid, answer) = proxied_start(&http, &o, &id).await;
    // The four channels were created by the callback; the client gets their public URLs.
    let trickle = format!("{}/ai/trickle/{sid}", o.base);
    assert_eq!(answer["subscribe_url"], format!("{trickle}-in"));
    assert_eq!(answer["publish_url"], format!("{trickle}-out"));
    assert_eq!(answer["control_url"], format!("{trickle}-control"));
    assert_eq!(answer["events_url"], format!("{trickle}-events"));
    assert_eq!(answer["session_id"], sid);
    assert_eq!(
        o.with(|r| r.channels_created.clone()),
        ["in", "out", "control", "events"].map(|n| format!("{sid}-{n}"))
    );
    // The heartbeats report it.
    o.wait(Duration::from_secs(10), "session not reported", |r| {
        r.heartbeats
            .iter()
            .rev()
            .find(|h| h.status == 200)
            .is_some_and(|h| h.body["session_ids"] == json!([sid]))
    })
    .await;
    wait_health(&http, &d.base, "OK", Duration::from_secs(10)).await;
    // The orchestrator drops it without an O2R event: the heartbeat answer's session_ids
    // stop it here.
    o.forget_session(&id, &sid);
    d.wait_log(
        &["the orchestrator no longer has this session", sid.as_str()],
        Duration::from_secs(10),
    )
    .await;
    wait_health(&http, &d.base, "IDLE", Duration::from_secs(20)).await;
    o.wait(Duration::from_secs(10), "session still reported", |r| {
        r.heartbeats
            .iter()
            .rev()
            .find(|h| h.status == 200)
            .is_some_and(|h| h.body["session_ids"] == json!([]))
    })
    .await;
    // A token the orchestrator does not know is never logged either.
    d.assert_not_logged("token-");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o2r_released_stops_the_session_at_once() {
    // Heartbeats 20 s apart: only the O2R channel can explain a stop within 10 s.
    let o = Orchestrator::start(Options {
        heartbeat_interval: Duration::from_secs(20),
        heartbeat_ttl: Duration::from_secs(60),
        ..Options::default()
    })
    .await;
    let d = spawn_with("reg-o2r", &registered(&o, &[]));
    let http = reqwest::Client::new();
    wait_health(&http, &d.base, "IDLE", Duration::from_secs(60)).await;
    o.wait(Duration::from_secs(30), "no registration", |r| {
        !r.runners.is_empty()
    })
    .await;
    let id = o.only_runner();
    d.wait_log(&["subscribed to the O2R channel"], Duration::from_secs(10))
        .await;
    // The bootstrap went out while loading: the stand-in takes sessions only when ready, so
    // wait for the next heartbeat (20 s) to say ready.
    o.wait(Duration::from_secs(45), "never ready", |r| {
        r.runners[&id].request["status"] == "ready"
    })
    .await;
    let beats = o.with(|r| r.heartbeats.len());
    let (sid, _) = proxied_start(&http, &o, &id).await;
    wait_health(&http, &d.base, "OK", Duration::from_secs(10)).await;
    d.wait_log(
        &["the orchestrator reserved a session", sid.as_str()],
        Duration::from_secs(10),
    )
    .await;
    // The client stops the session at the orchestrator: O2R `released`.
    let r = http
        .post(format!("{}/apps/{id}/session/{sid}/stop", o.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    d.wait_log(
        &["the orchestrator released a session", sid.as_str()],
        Duration::from_secs(10),
    )
    .await;
    wait_health(&http, &d.base, "IDLE", Duration::from_secs(10)).await;
    assert_eq!(
        o.with(|r| r.heartbeats.len()),
        beats,
        "a heartbeat came in between: the test proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_ends_here_is_released_there() {
    let o = Orchestrator::start(Options::default()).await;
    // No input: the stream is stopped after 1.5 s idle.
    let d = spawn_with(
        "reg-release",
        &registered(&o, &[("RIVULET_INPUT_IDLE_STOP_MS", "1500".into())]),
    );
    let http = reqwest::Client::new();
    wait_health(&http, &d.base, "IDLE", Duration::from_secs(60)).await;
    o.wait(Duration::from_secs(30), "never ready", |r| {
        r.runners.values().any(|x| x.request["status"] == "ready")
    })
    .await;
    let id = o.only_runner();
    let (sid, _) = proxied_start(&http, &o, &id).await;
    o.wait(Duration::from_secs(30), "session not released", |r| {
        r.released == [(sid.clone(), "runner".to_string())]
    })
    .await;
    assert!(o.with(|r| r.runners[&id].sessions.is_empty()));
    d.wait_log(
        &["released at the orchestrator", sid.as_str()],
        Duration::from_secs(5),
    )
    .await;
    // A start with a stale session (its token no longer valid) fails cleanly: 502 from the
    // callback, reported with the orchestrator's answer.
    let gone = http
        .post(format!("{}/live-video-to-video", d.base))
        .header("Livepeer-Session-Id", &sid)
        .header("Livepeer-Session-Token", "token-stale")
        .header("Livepeer-Runner-Route", &id)
        .header(
            "Livepeer-Session-Control",
            format!("{}/runner/{id}/session/{sid}", o.base),
        )
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 502);
    let v: Value = gone.json().await.unwrap();
    let msg = v["detail"]["msg"].as_str().unwrap();
    assert!(msg.contains("HTTP 404: runner session not found"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfiguration_is_logged_and_the_daemon_serves_on() {
    let wrong = Orchestrator::start(Options {
        secret: "another-secret".into(),
        ..Options::default()
    })
    .await;
    let garbage = Orchestrator::start(Options {
        garbage_answers: true,
        ..Options::default()
    })
    .await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("http://127.0.0.1:{port}")
    };
    // (tag, environment, what the log line says, how many times at least)
    type Case<'a> = (&'a str, Vec<(&'static str, String)>, Vec<&'a str>, usize);
    let cases: Vec<Case> = vec![
        (
            "reg-bad-url",
            vec![
                ("RIVULET_ORCHESTRATOR", "orchestrator:8935".into()),
                ("RIVULET_ORCH_SECRET", SECRET.into()),
            ],
            vec!["registration disabled", "is not an http(s) URL"],
            1,
        ),
        (
            "reg-no-secret",
            vec![("RIVULET_ORCHESTRATOR", closed.clone())],
            vec!["registration disabled", "RIVULET_ORCH_SECRET"],
            1,
        ),
        (
            "reg-unreachable",
            vec![
                ("RIVULET_ORCHESTRATOR", closed.clone()),
                ("RIVULET_ORCH_SECRET", SECRET.into()),
            ],
            vec!["cannot reach the orchestrator", "retrying in"],
            2,
        ),
        (
            "reg-401",
            vec![
                ("RIVULET_ORCHESTRATOR", wrong.base.clone()),
                ("RIVULET_ORCH_SECRET", SECRET.into()),
            ],
            vec![
                "refused the registration secret (401",
                "check RIVULET_ORCH_SECRET",
            ],
            2,
        ),
        (
            "reg-garbage",
            vec![
                ("RIVULET_ORCHESTRATOR", garbage.base.clone()),
                ("RIVULET_ORCH_SECRET", SECRET.into()),
            ],
            vec!["heartbeat answer is not valid", "invalid JSON"],
            2,
        ),
    ];
    let http = reqwest::Client::new();
    let mut runners = Vec::new();
    for (tag, envs, _, _) in &cases {
        runners.push(spawn_with(tag, envs));
    }
    for (d, (tag, _, needles, times)) in runners.iter_mut().zip(&cases) {
        let line = d.wait_log(needles, Duration::from_secs(30)).await;
        // Retried (with a pause) where a retry can help.
        let t = Instant::now();
        while d.log_count(needles[0]) < *times {
            assert!(t.elapsed() < Duration::from_secs(30), "{tag}: not retried");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The API answers, the process runs on.
        let h = get_json(&http, &format!("{}/health", d.base)).await;
        assert!(h["status"].is_string(), "{tag}: {h}");
        assert!(d.alive(), "{tag}: the daemon exited");
        d.assert_not_logged(SECRET);
        eprintln!("{tag}: {line}");
    }
    assert_eq!(wrong.with(|r| r.registrations.len()), 0);
    assert!(wrong.with(|r| r.heartbeats.iter().all(|h| h.status == 401)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_of_capacity_two_holds_two_proxied_sessions() {
    let o = Orchestrator::start(Options::default()).await;
    let d = spawn_with(
        "reg-capacity",
        &registered(&o, &[("RIVULET_MAX_SESSIONS", "2".into())]),
    );
    let http = reqwest::Client::new();
    wait_health(&http, &d.base, "IDLE", Duration::from_secs(60)).await;
    o.wait(Duration::from_secs(30), "never ready", |r| {
        r.runners.values().any(|x| x.request["status"] == "ready")
    })
    .await;
    let id = o.only_runner();
    assert_eq!(last_accepted(&o, &id).unwrap()["capacity"], 2);
    let (s1, _) = proxied_start(&http, &o, &id).await;
    let (s2, _) = proxied_start(&http, &o, &id).await;
    assert_ne!(s1, s2);
    let reported = |want: Vec<String>| {
        move |r: &orchestrator::Registry| {
            r.heartbeats
                .iter()
                .rev()
                .find(|h| h.status == 200)
                .is_some_and(|h| {
                    let mut ids: Vec<String> = h.body["session_ids"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    ids.sort();
                    ids == want
                })
        }
    };
    let mut both = vec![s1.clone(), s2.clone()];
    both.sort();
    o.wait(
        Duration::from_secs(10),
        "both sessions not reported",
        reported(both),
    )
    .await;
    let ids = common::session_ids(&http, &d.base).await;
    assert_eq!(ids.len(), 2, "{ids:?}");
    // The orchestrator drops one: only that one stops here.
    o.forget_session(&id, &s1);
    d.wait_log(
        &["the orchestrator no longer has this session", s1.as_str()],
        Duration::from_secs(10),
    )
    .await;
    o.wait(
        Duration::from_secs(20),
        "the other session not reported alone",
        reported(vec![s2.clone()]),
    )
    .await;
    assert_eq!(common::session_ids(&http, &d.base).await, [s2.as_str()]);
}
