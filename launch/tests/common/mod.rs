// SPDX-License-Identifier: MPL-2.0
//! What the daemon's process-level tests share: a `rivulet serve` child process with its own
//! state directory, a line watcher for child processes' output, and the steps the tests
//! repeat around it (channels, events, /api/status polling, inference children, input files).
// Each test binary uses a part of it.
#![allow(dead_code)]

use gst::prelude::*;
use gsttrickle::protocol::client::{Publisher, PublisherConfig, Subscriber, SubscriberConfig};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// GStreamer with the trickle elements registered (once per test binary).
pub fn init_trickle() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gsttrickle::plugin_register_static().unwrap();
    });
}

/// State changes block (the trickle elements wait on their own runtime): never on a tokio worker.
pub async fn set_state(p: &gst::Pipeline, state: gst::State) {
    let p = p.clone();
    tokio::task::spawn_blocking(move || p.set_state(state))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("state change to {state:?} failed: {e}"));
}

pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Polls /health every 100 ms until its status is `want`; `within` is the failure bound.
/// The ids `GET /v1/sessions` lists, oldest first.
pub async fn session_ids(http: &reqwest::Client, base: &str) -> Vec<String> {
    let list = get_json(http, &format!("{base}/v1/sessions")).await;
    list["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("no sessions array: {list}"))
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

pub async fn wait_health(http: &reqwest::Client, base: &str, want: &str, within: Duration) {
    let t = Instant::now();
    loop {
        let v = get_json(http, &format!("{base}/health")).await;
        if v["status"] == want {
            return;
        }
        assert!(t.elapsed() < within, "health is {v}, expected {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls /health every 100 ms for `during` (over several health evaluations) and fails on the
/// first reading that is not `want`: a state that must stay, read more than once.
pub async fn health_stays(http: &reqwest::Client, base: &str, want: &str, during: Duration) {
    let t = Instant::now();
    while t.elapsed() < during {
        let v = get_json(http, &format!("{base}/health")).await;
        assert_eq!(v["status"], want, "health left {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` on /api/status every 100 ms until it holds; `within` is the failure bound.
pub async fn wait_status(
    http: &reqwest::Client,
    base: &str,
    within: Duration,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let s = get_json(http, &format!("{base}/api/status")).await;
        if f(&s) {
            return s;
        }
        assert!(t.elapsed() < within, "{what}: status {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `rivulet serve` with `RIVULET_ISOLATION=isolation` and `envs`, IDLE, with the four
/// channels of stream `mid` created on its embedded trickle server; with an HTTP client and
/// its base URL.
pub async fn idle_daemon_with_channels(
    tag: &str,
    isolation: &str,
    envs: &[(&str, &str)],
    mid: &str,
) -> (DaemonProc, reqwest::Client, String) {
    init_trickle();
    let mut all = vec![("RIVULET_ISOLATION", isolation)];
    all.extend_from_slice(envs);
    let d = spawn_daemon(tag, &all);
    let http = reqwest::Client::new();
    let base = d.base.clone();
    wait_health(&http, &base, "IDLE", Duration::from_secs(60)).await;
    create_stream_channels(&http, &base, mid).await;
    (d, http, base)
}

/// Creates a stream's four channels (`{mid}`, `-out`, `-control`, `-events`) as an
/// orchestrator does.
pub async fn create_stream_channels(http: &reqwest::Client, base: &str, mid: &str) {
    for (suffix, mime) in [
        ("", "video/MP2T"),
        ("-out", "video/MP2T"),
        ("-control", "application/json"),
        ("-events", "application/json"),
    ] {
        create_channel(http, base, &format!("{mid}{suffix}"), mime).await;
    }
}

/// Every JSON message of the events channel at `url`, from its first segment; the receiver
/// ends when the channel does.
pub fn subscribe_events(url: &str) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let mut events = Subscriber::new(
        url,
        SubscriberConfig {
            start_seq: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        while let Ok(Some(seg)) = events.next_segment().await {
            if let Ok(body) = seg.read_all(1 << 20).await
                && let Ok(v) = serde_json::from_slice::<Value>(&body)
            {
                let _ = tx.send(v);
            }
        }
    });
    rx
}

/// A JSON publisher on the control channel at `url`.
pub fn control_publisher(url: &str) -> Publisher {
    Publisher::new(
        url,
        PublisherConfig {
            mime: "application/json".into(),
            ..Default::default()
        },
    )
    .unwrap()
}

/// The daemon's inference children: child processes of `daemon` run with `aipipeline-child`.
pub fn inference_children(daemon: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(daemon) && cmdline.split(|b| *b == 0).any(|a| a == b"aipipeline-child") {
            found.push(pid);
        }
    }
    found
}

/// Live input: videotestsrc at 30 fps (640×480, moving ball) plus a tone, into `url`.
pub fn live_input(url: &str) -> gst::Pipeline {
    gst::parse::launch(&format!(
        "videotestsrc is-live=true pattern=ball ! \
           video/x-raw,format=I420,width=640,height=480,framerate=30/1 ! \
         tricklesink name=pub url={url} min-segment-duration=500000000 \
         audiotestsrc is-live=true samplesperbuffer=1600 ! audio/x-raw,rate=48000,channels=2 ! pub."
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap()
}

/// Reads the output channel at `url` from its first segment, calling `on_frame` with each
/// decoded video frame.
pub fn output_reader(
    url: &str,
    on_frame: impl Fn(&gst::Sample) + Send + Sync + Clone + 'static,
) -> gst::Pipeline {
    let pipeline = gst::Pipeline::new();
    let src = gst::ElementFactory::make("tricklesrc")
        .property("url", url)
        .property("start-seq", 0i64)
        .build()
        .unwrap();
    pipeline.add(&src).unwrap();
    let weak = pipeline.downgrade();
    src.connect_pad_added(move |_, pad| {
        let Some(pipeline) = weak.upgrade() else {
            return;
        };
        let sink = gst_app::AppSink::builder().sync(false).build();
        if pad.name().starts_with("video") {
            let on_frame = on_frame.clone();
            sink.set_callbacks(
                gst_app::AppSinkCallbacks::builder()
                    .new_sample(move |s| {
                        if let Ok(sample) = s.pull_sample() {
                            on_frame(&sample);
                        }
                        Ok(gst::FlowSuccess::Ok)
                    })
                    .build(),
            );
        }
        let sink: gst::Element = sink.upcast();
        pipeline.add(&sink).unwrap();
        sink.sync_state_with_parent().unwrap();
        pad.link(&sink.static_pad("sink").unwrap()).unwrap();
    });
    pipeline
}

/// Counts the video frames of the output channel at `url`, read from its first segment.
pub fn output_counter(url: &str) -> (gst::Pipeline, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let count = std::sync::Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let pipeline = output_reader(url, move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    });
    (pipeline, count)
}

/// The mean of a decoded frame's first plane (luma for I420/NV12), 0–255.
pub fn mean_luma(sample: &gst::Sample) -> Option<f64> {
    let caps = sample.caps()?;
    let info = gst_video::VideoInfo::from_caps(caps).ok()?;
    let buf = sample.buffer()?;
    let map = buf.map_readable().ok()?;
    let (w, h, stride) = (
        info.width() as usize,
        info.height() as usize,
        info.stride()[0] as usize,
    );
    let data = map.as_slice();
    let mut sum = 0u64;
    for row in 0..h {
        let line = data.get(row * stride..row * stride + w)?;
        sum += line.iter().map(|b| u64::from(*b)).sum::<u64>();
    }
    Some(sum as f64 / (w * h) as f64)
}

/// Sends `sig` to the daemon's child `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall on the daemon's child.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// Waits until `daemon` has no inference child left (10 s failure bound).
pub async fn wait_no_inference_child(daemon: u32) {
    let t = Instant::now();
    while !inference_children(daemon).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "a child is left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `count` reaches `at_least` (60 s failure bound).
pub async fn wait_frames(count: &std::sync::atomic::AtomicU64, at_least: u64) {
    let t = Instant::now();
    while count.load(std::sync::atomic::Ordering::SeqCst) < at_least {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the output did not go on"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Runs a launch line to EOS (bounded); panics on an error.
pub fn run_to_eos(pipeline: &gst::Element) {
    pipeline.set_state(gst::State::Playing).unwrap();
    let msg = pipeline
        .bus()
        .unwrap()
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(60),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("no EOS within 60 s");
    pipeline.set_state(gst::State::Null).unwrap();
    if let gst::MessageView::Error(e) = msg.view() {
        panic!("{}: {:?}", e.error(), e.debug());
    }
}

/// An `n`-frame H.264 MP4 (320×240, 30 fps, moving ball).
pub fn make_input(path: &Path, n: u64) {
    let p = gst::parse::launch(&format!(
        "videotestsrc num-buffers={n} pattern=ball ! \
         video/x-raw,width=320,height=240,framerate=30/1 ! x264enc ! mp4mux ! filesink location={}",
        path.display()
    ))
    .unwrap();
    run_to_eos(&p);
}

/// Builds `examples/gst-plugin-example-tint` on its own (not a workspace member) into
/// `target/examples`; returns the path of its plugin (`libgstrivulettint.so`).
pub fn build_example_tint() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("examples");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--locked", "--manifest-path"])
        .arg(workspace.join("examples/gst-plugin-example-tint/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("cannot run cargo");
    assert!(status.success(), "the example plugin does not build");
    target.join("debug/libgstrivulettint.so")
}

/// The daemon's realtime feed (`GET /v1/events`), as raw bytes.
pub async fn feed(
    http: &reqwest::Client,
    base: &str,
) -> futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>> {
    Box::pin(
        http.get(format!("{base}/v1/events"))
            .send()
            .await
            .unwrap()
            .bytes_stream(),
    )
}

/// The next event of the feed as (`event:` kind, `data:` text), with `buf` holding what was
/// read past it; `within` bounds the wait for each chunk.
pub async fn next_feed_event(
    events: &mut futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: &mut String,
    within: Duration,
    what: &str,
) -> (String, String) {
    use futures::StreamExt;
    loop {
        if let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut kind = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(k) = line.strip_prefix("event:") {
                    kind = k.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            return (kind, data);
        }
        let chunk = tokio::time::timeout(within, events.next())
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .expect("feed ended")
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// `POST /live-video-to-video` with `start`, answered 200; returns the answer's JSON (null if
/// it is not JSON).
pub async fn start_stream(http: &reqwest::Client, base: &str, start: &Value) -> Value {
    let r = http
        .post(format!("{base}/live-video-to-video"))
        .json(start)
        .send()
        .await
        .unwrap();
    let code = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Side of the index-stamped I420 test frames ([`stamped_frame`], [`read_stamp`]).
pub const STAMP_SIZE: usize = 512;
/// Bits of the index, drawn as black/white squares along the top of the frame.
pub const STAMP_BITS: usize = 16;

/// A 512×512 I420 frame: `n` as 16 black/white 32×32 squares on top; below them grey, or
/// fresh noise (`noise`: large encoded frames, well over 64 KiB).
pub fn stamped_frame(n: u32, noise: bool) -> Vec<u8> {
    const S: usize = STAMP_SIZE;
    let block = S / STAMP_BITS;
    let mut f = vec![128u8; S * S * 3 / 2];
    for bit in 0..STAMP_BITS {
        let v = if n >> bit & 1 == 1 { 235 } else { 16 };
        for y in 0..block {
            f[y * S + bit * block..y * S + (bit + 1) * block].fill(v);
        }
    }
    if noise {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(n).wrapping_mul(0x2545_f491_4f6c_dd1d);
        for px in &mut f[(block + 2) * S..S * S] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *px = 32 + (x % 192) as u8;
        }
    }
    f
}

/// The index drawn by [`stamped_frame`], read back from a decoded I420 sample (None: not one
/// of ours, e.g. a loading frame).
pub fn read_stamp(sample: &gst::Sample) -> Option<u32> {
    const S: usize = STAMP_SIZE;
    let info = gst_video::VideoInfo::from_caps(sample.caps()?).ok()?;
    if info.width() as usize != S || info.height() as usize != S {
        return None;
    }
    let buf = sample.buffer()?;
    let map = buf.map_readable().ok()?;
    let luma = &map[info.offset()[0]..];
    let stride = info.stride()[0] as usize;
    let block = S / STAMP_BITS;
    let mut n = 0;
    for bit in 0..STAMP_BITS {
        let (cx, cy) = (bit * block + block / 2, block / 2);
        let mut sum = 0u32;
        for y in cy - 4..cy + 4 {
            for x in cx - 4..cx + 4 {
                sum += u32::from(luma[y * stride + x]);
            }
        }
        let mean = sum / 64;
        if mean > 160 {
            n |= 1 << bit;
        } else if mean > 80 {
            return None; // neither black nor white: not a stamped frame
        }
    }
    Some(n)
}
