// SPDX-License-Identifier: MPL-2.0
//! Many live sessions in one `rivulet serve --max-sessions N` (docs/runner.md, "Many
//! sessions"): two sessions at once with their own params and outputs (content checked), the
//! capacity refusal, `/v1/sessions`, stopping one session while the other goes on, and a
//! session's own params; crash cleanup of every session's channels.

use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::{DaemonProc, get_json, set_state, wait_health};

fn gain_dir() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gst-plugin-aipipeline/testdata/pipelines")
        .to_string_lossy()
        .into_owned()
}

/// One session's input publisher and output reader (frame count, last frame's mean luma).
struct Peer {
    mid: String,
    input: gst::Pipeline,
    reader: gst::Pipeline,
    frames: Arc<AtomicU64>,
    luma: Arc<Mutex<f64>>,
}

impl Peer {
    fn frames(&self) -> u64 {
        self.frames.load(Ordering::SeqCst)
    }

    fn luma(&self) -> f64 {
        *self.luma.lock().unwrap()
    }

    /// Waits (bounded) until `count` more frames came out and the last one's luma satisfies
    /// `want`.
    async fn wait_output(&self, what: &str, count: u64, want: impl Fn(f64) -> bool) {
        let from = self.frames();
        let t = Instant::now();
        while self.frames() < from + count || !want(self.luma()) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "session {}: {what}: {} frames, last luma {:.1}",
                self.mid,
                self.frames() - from,
                self.luma()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        set_state(&self.input, gst::State::Null).await;
        set_state(&self.reader, gst::State::Null).await;
    }
}

fn start_body(base: &str, mid: &str, params: Value) -> Value {
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");
    json!({
        "subscribe_url": url(""), "publish_url": url("-out"),
        "control_url": url("-control"), "events_url": url("-events"),
        "model_id": "gain", "params": params,
        "gateway_request_id": format!("req-{mid}"), "manifest_id": mid,
        "stream_id": format!("s-{mid}")
    })
}

/// Creates `mid`'s channels, starts its input, starts the session with `params` and reads its
/// output.
async fn start_peer(http: &reqwest::Client, base: &str, mid: &str, params: Value) -> Peer {
    start_peer_on(http, base, base, mid, params).await
}

/// [`start_peer`] with the channels on the trickle server at `trickle` (its routes under
/// `/trickle/`) instead of the daemon's own.
async fn start_peer_on(
    http: &reqwest::Client,
    base: &str,
    trickle: &str,
    mid: &str,
    params: Value,
) -> Peer {
    common::create_stream_channels(http, trickle, mid).await;
    let input = common::live_input(&format!("{trickle}/trickle/{mid}"));
    set_state(&input, gst::State::Playing).await;
    common::start_stream(http, base, &start_body(trickle, mid, params)).await;
    let frames = Arc::new(AtomicU64::new(0));
    let luma = Arc::new(Mutex::new(-1.0));
    let (f, l) = (frames.clone(), luma.clone());
    let reader = common::output_reader(&format!("{trickle}/trickle/{mid}-out"), move |s| {
        if let Some(y) = common::mean_luma(s) {
            *l.lock().unwrap() = y;
            f.fetch_add(1, Ordering::SeqCst);
        }
    });
    set_state(&reader, gst::State::Playing).await;
    Peer {
        mid: mid.to_string(),
        input,
        reader,
        frames,
        luma,
    }
}

const DARK: fn(f64) -> bool = |y| y < 60.0;
const BRIGHT: fn(f64) -> bool = |y| y > 180.0;

fn daemon(tag: &str, isolation: &str) -> DaemonProc {
    common::init_trickle();
    common::spawn_daemon(
        tag,
        &[
            ("RIVULET_MAX_SESSIONS", "2"),
            ("RIVULET_ISOLATION", isolation),
            ("MODEL_ID", "gain"),
            ("RIVULET_PIPELINES", &gain_dir()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_at_once_each_with_its_own_params_and_output() {
    let d = daemon("sessions", "none");
    let http = reqwest::Client::new();
    let base = d.base.clone();
    wait_health(&http, &base, "IDLE", Duration::from_secs(60)).await;

    // gain 0: the output is the bias alone, black for one session and white for the other.
    let black = json!({"gain": 0.0, "bias": [0.0, 0.0, 0.0]});
    let white = json!({"gain": 0.0, "bias": [1.0, 1.0, 1.0]});
    let a = start_peer(&http, &base, "sa", black.clone()).await;
    let b = start_peer(&http, &base, "sb", white.clone()).await;
    a.wait_output("black output", 10, DARK).await;
    b.wait_output("white output", 10, BRIGHT).await;

    // Both are listed, oldest first, with their own params.
    let list = get_json(&http, &format!("{base}/v1/sessions")).await;
    assert_eq!(list["max_sessions"], 2, "{list}");
    let sessions = list["sessions"].as_array().unwrap();
    let ids: Vec<&str> = sessions.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["s-sa", "s-sb"], "{list}");
    assert_eq!(sessions[0]["params"], black);
    assert_eq!(sessions[1]["params"], white);
    let one = get_json(&http, &format!("{base}/v1/sessions/s-sb")).await;
    assert_eq!(one["request_id"], "req-sb", "{one}");
    assert_eq!(one["status"]["type"], "status", "{one}");
    // The runner's single-stream views show the oldest session.
    let status = get_json(&http, &format!("{base}/api/status")).await;
    assert_eq!(status["inference_status"]["last_params"], black, "{status}");

    // A third start is refused while two run: 503 with a JSON reason, nothing stopped.
    common::create_stream_channels(&http, &base, "sc").await;
    let r = http
        .post(format!("{base}/live-video-to-video"))
        .json(&start_body(&base, "sc", black.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    let msg = body["detail"]["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("--max-sessions 2"), "{body}");
    a.wait_output("still black", 10, DARK).await;
    b.wait_output("still white", 10, BRIGHT).await;

    // One session's own params: b turns black, a is untouched.
    let r = http
        .post(format!("{base}/v1/sessions/s-sb/params"))
        .json(&black)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    b.wait_output("black after its params", 10, DARK).await;
    let r = http
        .post(format!("{base}/v1/sessions/s-sb/params"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["detail"]["msg"].is_string());
    let r = http
        .post(format!("{base}/v1/sessions/nope/params"))
        .json(&black)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Stopping a stops only a: its output channel is closed, b goes on, and there is room
    // for c again.
    let r = http
        .delete(format!("{base}/v1/sessions/s-sa"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t = Instant::now();
    loop {
        let ids = common::session_ids(&http, &base).await;
        if ids == ["s-sb"] {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "{ids:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = http
        .get(format!("{base}/trickle/sa-out/next"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404, "a's output channel is closed");
    b.wait_output("b goes on after a stopped", 30, DARK).await;
    let c = start_peer(&http, &base, "sc", white.clone()).await;
    c.wait_output("c's white output", 10, BRIGHT).await;
    b.wait_output("b goes on beside c", 10, DARK).await;
    let r = http
        .delete(format!("{base}/v1/sessions/s-sa"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "a is gone");

    for p in [a, b, c] {
        p.stop().await;
    }
}

/// Restart counts of the running sessions, by id.
async fn restart_counts(http: &reqwest::Client, base: &str) -> Vec<(String, u64)> {
    let list = get_json(http, &format!("{base}/v1/sessions")).await;
    list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["restart_count"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_share_one_inference_child_and_a_loss_restarts_both() {
    let d = daemon("sessions-shared", "process");
    let http = reqwest::Client::new();
    let base = d.base.clone();
    wait_health(&http, &base, "IDLE", Duration::from_secs(60)).await;
    let black = json!({"gain": 0.0, "bias": [0.0, 0.0, 0.0]});
    let white = json!({"gain": 0.0, "bias": [1.0, 1.0, 1.0]});
    let a = start_peer(&http, &base, "xa", black).await;
    let b = start_peer(&http, &base, "xb", white).await;
    a.wait_output("black output", 10, DARK).await;
    b.wait_output("white output", 10, BRIGHT).await;

    // Both sessions run the same model on one device: one inference child serves them, each
    // with its own params.
    let t = Instant::now();
    let child = loop {
        let children = common::inference_children(d.child.id());
        if children.len() == 1 {
            break children[0];
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "want one shared inference child, have {children:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Its loss is one restart of each session it served; both outputs come back, each its own.
    common::signal(child, libc::SIGKILL);
    let t = Instant::now();
    loop {
        let counts = restart_counts(&http, &base).await;
        if counts.len() == 2 && counts.iter().all(|(_, n)| *n == 1) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.wait_output("black again after the restart", 10, DARK)
        .await;
    b.wait_output("white again after the restart", 10, BRIGHT)
        .await;
    let children = common::inference_children(d.child.id());
    assert_eq!(children.len(), 1, "one new shared child: {children:?}");
    assert_ne!(children[0], child, "the lost child was replaced");
    a.stop().await;
    b.stop().await;
}

/// The state file of session `id` in `dir` (`Config::state_file_for`).
fn session_state_file(dir: &std::path::Path, id: &str) -> std::path::PathBuf {
    let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("last.json.session-{hex}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_cleanup_closes_the_channels_of_every_session() {
    common::init_trickle();
    // The channels live on a trickle server of the test's own, which outlives the daemons.
    let trickle = gsttrickle::protocol::server::TrickleServer::new(
        gsttrickle::protocol::server::ServerConfig {
            base_path: "/trickle/".into(),
            ..gsttrickle::protocol::server::ServerConfig::development()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tbase = format!("http://{}", listener.local_addr().unwrap());
    let handle = gsttrickle::protocol::server::serve(listener, trickle.clone())
        .await
        .unwrap();
    let has = |name: &str| trickle.channel_names().iter().any(|c| c == name);

    let state = common::TempDir::new("sessions-crash");
    let state_file = state.0.join("last.json");
    let (state_env, gain) = (state_file.to_str().unwrap().to_owned(), gain_dir());
    // Both daemons: two sessions, the same state file.
    let envs = [
        ("RIVULET_MAX_SESSIONS", "2"),
        ("RIVULET_ISOLATION", "none"),
        ("MODEL_ID", "gain"),
        ("RIVULET_PIPELINES", gain.as_str()),
        ("RIVULET_STATE_FILE", state_env.as_str()),
    ];
    let mut a = common::spawn_daemon("sessions-crash-a", &envs);
    let http = reqwest::Client::new();
    wait_health(&http, &a.base, "IDLE", Duration::from_secs(60)).await;
    let black = json!({"gain": 0.0, "bias": [0.0, 0.0, 0.0]});
    let pa = start_peer_on(&http, &a.base, &tbase, "ca", black.clone()).await;
    let pb = start_peer_on(&http, &a.base, &tbase, "cb", black).await;
    pa.wait_output("ca's output", 5, DARK).await;
    pb.wait_output("cb's output", 5, DARK).await;
    // One file per running session; the one session of `--max-sessions 1` uses the plain file.
    assert!(session_state_file(&state.0, "s-ca").exists());
    assert!(session_state_file(&state.0, "s-cb").exists());
    assert!(!state_file.exists());

    // A session that ends cleanly closes its own channels and forgets its file.
    let r = http
        .delete(format!("{}/v1/sessions/s-cb", a.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t = Instant::now();
    while session_state_file(&state.0, "s-cb").exists() || has("cb-out") {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "cb's file or output channel stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A crash leaves ca's channels open; the next daemon's start-up closes them.
    a.child.kill().unwrap();
    let _ = a.child.wait();
    assert!(
        has("ca-out") && has("ca-events"),
        "{:?}",
        trickle.channel_names()
    );
    assert!(session_state_file(&state.0, "s-ca").exists());
    let b = common::spawn_daemon("sessions-crash-b", &envs);
    // The clean-up runs before the port answers.
    assert!(
        !has("ca-out") && !has("ca-events"),
        "{:?}",
        trickle.channel_names()
    );
    assert!(!session_state_file(&state.0, "s-ca").exists());
    wait_health(&http, &b.base, "IDLE", Duration::from_secs(60)).await;
    pa.stop().await;
    pb.stop().await;
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_fill_the_capacity_and_no_more() {
    let d = daemon("sessions-concurrent", "none");
    let http = reqwest::Client::new();
    let base = d.base.clone();
    wait_health(&http, &base, "IDLE", Duration::from_secs(60)).await;
    let mut inputs = Vec::new();
    for mid in ["ka", "kb", "kc"] {
        common::create_stream_channels(&http, &base, mid).await;
        let input = common::live_input(&format!("{base}/trickle/{mid}"));
        set_state(&input, gst::State::Playing).await;
        inputs.push(input);
    }
    // Three starts at once into room for two: two start, one gets the 503.
    let post = |mid: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let body = start_body(&base, mid, json!({"gain": 1.0}));
            let r = http
                .post(format!("{base}/live-video-to-video"))
                .json(&body)
                .send()
                .await
                .unwrap();
            (mid, r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (a, b, c) = tokio::join!(post("ka"), post("kb"), post("kc"));
    let mut codes: Vec<u16> = [&a, &b, &c].iter().map(|r| r.1).collect();
    codes.sort();
    assert_eq!(codes, [200, 200, 503], "{a:?} {b:?} {c:?}");
    let refused = [&a, &b, &c].into_iter().find(|r| r.1 == 503).unwrap();
    assert!(refused.2.contains("--max-sessions 2"), "{refused:?}");
    let mut ids = common::session_ids(&http, &base).await;
    ids.sort();
    let mut want: Vec<String> = [&a, &b, &c]
        .into_iter()
        .filter(|r| r.1 == 200)
        .map(|r| format!("s-{}", r.0))
        .collect();
    want.sort();
    assert_eq!(ids, want);
    for input in inputs {
        set_state(&input, gst::State::Null).await;
    }
}
