// SPDX-License-Identifier: MPL-2.0
//! What the daemon's benches share: the `rivulet` daemon as a child process, CPU and memory from
//! /proc, index-stamped 512×512 I420 frames, a paced live publisher and a stamp reader through
//! trickle channels, and latency figures per frame.
#![allow(dead_code)]

use gst::prelude::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const W: usize = 512;
pub const H: usize = 512;
pub const FPS: u32 = 30;
const BLOCK: usize = 32;
const BITS: usize = 16;
/// How long the reader waits for the last frames once the publisher is done.
pub const DRAIN: Duration = Duration::from_secs(3);

/// The daemons running now, for a watchdog to kill.
pub static DAEMONS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills the running daemons and exits if the bench is still running after `limit`.
pub fn watchdog(name: &'static str, limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        for pid in DAEMONS.lock().unwrap().iter() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        eprintln!("{name}: watchdog: gave up after {limit:?}");
        std::process::exit(1);
    });
}

// ---------------------------------------------------------------------------------------------
// The daemon as a child process.

pub struct Daemon {
    pub child: Child,
    pub base: String,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        DAEMONS.lock().unwrap().retain(|p| *p != self.child.id());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `target/release/rivulet`, next to the bench executable (`target/release/deps/e2e_latency-…`).
pub fn daemon_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("bench executable in target/<profile>/deps")
        .join("rivulet");
    assert!(
        path.exists(),
        "{} is missing: run the bench with `cargo bench -p rivulet-launch --bench …`, which builds it",
        path.display()
    );
    path
}

/// `rivulet serve --port 0` (noop, the bench's own state file) with `envs`, once it listens.
pub fn spawn_daemon(tag: &str, envs: &[(&str, &str)]) -> Daemon {
    let dir = std::env::temp_dir().join(format!("rivulet-bench-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new(daemon_exe());
    cmd.args(["serve", "--port", "0"])
        .env_remove("AUTH_TOKEN")
        .env_remove("RIVULET_FPS_CAP")
        .env("MODEL_ID", "noop")
        .env("RUST_LOG", "info")
        .env("RIVULET_STATE_FILE", dir.join("last.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("cannot start rivulet");
    DAEMONS.lock().unwrap().push(child.id());
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && let Some(i) = line.find("listening on http://") {
                let _ = tx.send(line[i + "listening on ".len()..].trim().to_string());
                sent = true;
            }
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("[rivulet] {line}");
            }
        }
    });
    let base = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(b) => b,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rivulet did not report its address within 60 s");
        }
    };
    Daemon { child, base, dir }
}

/// Waits (60 s bound) until the daemon's `/health` is `IDLE`.
pub async fn wait_idle(http: &reqwest::Client, base: &str) {
    let t = Instant::now();
    loop {
        let status = match http.get(format!("{base}/health")).send().await {
            Ok(r) => r.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        };
        if status.as_ref().is_some_and(|v| v["status"] == "IDLE") {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "daemon not IDLE within 60 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates stream `mid`'s four channels on the daemon's embedded trickle server.
pub async fn create_channels(http: &reqwest::Client, base: &str, mid: &str) {
    for (suffix, mime) in [
        ("", "video/MP2T"),
        ("-out", "video/MP2T"),
        ("-control", "application/json"),
        ("-events", "application/json"),
    ] {
        let r = http
            .post(format!("{base}/trickle/{mid}{suffix}"))
            .header("Expect-Content", mime)
            .send()
            .await
            .expect("create channel");
        assert_eq!(r.status(), 200, "create channel {mid}{suffix}");
    }
}

/// The runner's start request for stream `mid` on the daemon's own channels.
pub fn start_request(
    base: &str,
    mid: &str,
    model_id: &str,
    params: serde_json::Value,
) -> serde_json::Value {
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");
    serde_json::json!({
        "subscribe_url": url(""), "publish_url": url("-out"),
        "control_url": url("-control"), "events_url": url("-events"),
        "model_id": model_id, "params": params,
        "gateway_request_id": format!("req-{mid}"), "manifest_id": mid, "stream_id": mid,
    })
}

/// `POST /live-video-to-video`, answered 200 (30 s bound).
pub async fn start_stream(http: &reqwest::Client, base: &str, start: &serde_json::Value) {
    let r = http
        .post(format!("{base}/live-video-to-video"))
        .json(start)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("start request");
    assert_eq!(r.status(), 200, "start: {:?}", r.text().await);
}

/// Resident memory (kB) of `root` and all its descendants.
pub fn tree_rss_kb(root: u32) -> u64 {
    tree_pids(root)
        .into_iter()
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// CPU time from /proc.

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on every Linux port).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// (ppid, utime + stime in ticks) of one /proc/<pid>/stat.
pub fn stat_of(path: &str) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, ut + st))
}

/// `root` and all its descendants.
pub fn tree_pids(root: u32) -> Vec<u32> {
    let mut procs: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, _)) = stat_of(&format!("/proc/{pid}/stat")) {
                procs.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        for &(pid, ppid) in &procs {
            if ppid == p && !tree.contains(&pid) {
                tree.push(pid);
            }
        }
        i += 1;
    }
    tree
}

/// CPU ticks of `root` and all its descendants (threads are included in each process's stat).
pub fn tree_ticks(root: u32) -> u64 {
    tree_pids(root)
        .into_iter()
        .filter_map(|pid| stat_of(&format!("/proc/{pid}/stat")).map(|(_, t)| t))
        .sum()
}

pub fn self_ticks() -> u64 {
    stat_of("/proc/self/stat").map_or(0, |(_, t)| t)
}

// ---------------------------------------------------------------------------------------------
// Stamped frames.

/// An I420 frame: the index in squares on the first row of blocks and its complement on the
/// second (white = 1); below them a textured pattern scrolling 4 px per frame, so that the
/// encoders do real work (a flat picture would make x264 nearly free).
pub fn stamped_i420(n: u32) -> Vec<u8> {
    let mut frame = vec![128u8; W * H * 3 / 2];
    for y in 2 * BLOCK..H {
        for x in 0..W {
            frame[y * W + x] = 64 + (((x + 4 * n as usize) ^ y) & 127) as u8;
        }
    }
    for y in BLOCK..H / 2 {
        for x in 0..W / 2 {
            let v = 96 + ((x + 2 * n as usize + y) & 63) as u8;
            frame[W * H + y * W / 2 + x] = v;
            frame[W * H * 5 / 4 + y * W / 2 + x] = 255 - v;
        }
    }
    let n = n as u16;
    for (row, value) in [n, !n].into_iter().enumerate() {
        for bit in 0..BITS {
            let v = if value >> bit & 1 == 1 { 235 } else { 16 };
            for y in row * BLOCK..(row + 1) * BLOCK {
                frame[y * W + bit * BLOCK..y * W + (bit + 1) * BLOCK].fill(v);
            }
        }
    }
    frame
}

/// The index of a decoded I420 sample, or None when the two rows do not agree.
pub fn read_stamp(sample: &gst::Sample) -> Option<u32> {
    let info = gst_video::VideoInfo::from_caps(sample.caps()?).ok()?;
    if info.width() as usize != W || info.height() as usize != H {
        return None;
    }
    let buffer = sample.buffer()?;
    let map = buffer.map_readable().ok()?;
    let luma = &map[info.offset()[0]..];
    let stride = info.stride()[0] as usize;
    let row = |r: usize| -> u16 {
        let mut v = 0u16;
        for bit in 0..BITS {
            let (cx, cy) = (bit * BLOCK + BLOCK / 2, r * BLOCK + BLOCK / 2);
            let mut sum = 0u32;
            for y in cy - 4..cy + 4 {
                for x in cx - 4..cx + 4 {
                    sum += u32::from(luma[y * stride + x]);
                }
            }
            if sum / 64 > 128 {
                v |= 1 << bit;
            }
        }
        v
    };
    let (a, b) = (row(0), row(1));
    (a == !b).then_some(u32::from(a))
}

// ---------------------------------------------------------------------------------------------
// Publisher and reader.

pub fn publisher(url: &str) -> (gst::Pipeline, gst_app::AppSrc) {
    let p = gst::parse::launch(&format!(
        "appsrc name=in is-live=true format=time do-timestamp=true \
           caps=video/x-raw,format=I420,width={W},height={H},framerate={FPS}/1 ! \
         tricklesink url={url}"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let src = p
        .by_name("in")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    (p, src)
}

/// tricklesrc (decode mode, stream PTS kept) → videoconvert → I420 appsink (sync=false); any
/// audio pad goes to a fakesink.
pub fn reader(url: &str) -> (gst::Pipeline, gst_app::AppSink) {
    let pipeline = gst::Pipeline::new();
    let src = gst::ElementFactory::make("tricklesrc")
        .property("url", url)
        .property("start-seq", 0i64)
        .property("do-timestamp", false)
        .build()
        .unwrap();
    let convert = gst::ElementFactory::make("videoconvert").build().unwrap();
    let sink = gst_app::AppSink::builder()
        .sync(false)
        .caps(
            &gst::Caps::builder("video/x-raw")
                .field("format", "I420")
                .build(),
        )
        .build();
    pipeline
        .add_many([&src, &convert, sink.upcast_ref()])
        .unwrap();
    convert.link(&sink).unwrap();
    let weak = pipeline.downgrade();
    let convert_sink = convert.static_pad("sink").unwrap();
    src.connect_pad_added(move |_, pad| {
        if pad.name().starts_with("video") {
            if !convert_sink.is_linked() {
                let _ = pad.link(&convert_sink);
            }
        } else if let Some(p) = weak.upgrade() {
            let fake = gst::ElementFactory::make("fakesink")
                .property("sync", false)
                .property("async", false)
                .build()
                .unwrap();
            p.add(&fake).unwrap();
            fake.sync_state_with_parent().unwrap();
            let _ = pad.link(&fake.static_pad("sink").unwrap());
        }
    });
    (pipeline, sink)
}

pub fn bus_error(p: &gst::Pipeline) -> Option<String> {
    let bus = p.bus()?;
    while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
        if let gst::MessageView::Error(e) = msg.view() {
            return Some(format!(
                "{:?}: {} ({:?})",
                e.src().map(|s| s.path_string()),
                e.error(),
                e.debug()
            ));
        }
    }
    None
}

pub struct Cpu {
    pub daemon_ticks: u64,
    /// The daemon's own process (its tree less its children, e.g. the inference child).
    pub daemon_main_ticks: u64,
    pub self_ticks: u64,
    pub system_ticks: u64,
}

/// Busy ticks of the whole machine (all CPUs): the first line of /proc/stat less idle and iowait.
pub fn system_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 5 {
        return 0;
    }
    f.iter().sum::<u64>() - f[3] - f[4]
}

pub fn cpu_now(daemon_pid: u32) -> Cpu {
    Cpu {
        daemon_ticks: tree_ticks(daemon_pid),
        daemon_main_ticks: stat_of(&format!("/proc/{daemon_pid}/stat")).map_or(0, |(_, t)| t),
        self_ticks: self_ticks(),
        system_ticks: system_ticks(),
    }
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

// ---------------------------------------------------------------------------------------------
// One live flow: publisher → (daemon) → reader, frame by frame.

/// What a flow saw: when each frame was pushed and when it came back (by stamp index).
pub struct Flow {
    pub pushed: Vec<Option<Instant>>,
    pub arrivals: HashMap<u32, Instant>,
    /// When each decoded frame came, stamped or not (a restyling model hides the stamp).
    pub decoded: Vec<Instant>,
    /// Decoded frames without a valid stamp (not ours, or restyled).
    pub rejected: usize,
    pub reordered: usize,
    pub errors: Vec<String>,
}

/// Publishes `total` stamped frames at [`FPS`] into `in_url` and reads `out_url` until the last
/// one came back (or [`DRAIN`] after the publisher ended). `at_warmup` runs when frame `warmup`
/// is due, `at_end` when the last frame interval has passed.
pub fn run_flow(
    in_url: &str,
    out_url: &str,
    total: u32,
    warmup: u32,
    at_warmup: impl FnOnce() + Send + 'static,
    at_end: impl FnOnce() + Send + 'static,
) -> Flow {
    // Plain threads (not tokio workers): the trickle elements block on their own runtime.
    let (rp, appsink) = reader(out_url);
    rp.set_state(gst::State::Playing)
        .expect("reader to PLAYING");
    let (pp, appsrc) = publisher(in_url);
    pp.set_state(gst::State::Playing)
        .expect("publisher to PLAYING");
    let pushed = std::sync::Arc::new(Mutex::new(vec![None; total as usize]));
    let frames: Vec<Vec<u8>> = (0..total).map(stamped_i420).collect();
    let feeder = {
        let pushed = pushed.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let due = |n: u32| start + Duration::from_secs(1) * n / FPS;
            let mut at_warmup = Some(at_warmup);
            for (n, frame) in frames.into_iter().enumerate() {
                let n = n as u32;
                if let Some(wait) = due(n).checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if n == warmup
                    && let Some(f) = at_warmup.take()
                {
                    f();
                }
                let buf = gst::Buffer::from_mut_slice(frame);
                pushed.lock().unwrap()[n as usize] = Some(Instant::now());
                if appsrc.push_buffer(buf).is_err() {
                    return;
                }
            }
            if let Some(wait) = due(total).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            at_end();
        })
    };
    let mut arrivals: HashMap<u32, Instant> = HashMap::new();
    let mut decoded = Vec::new();
    let mut rejected = 0usize;
    let mut reordered = 0usize;
    let mut last_index: Option<u32> = None;
    let hard_end = Instant::now() + Duration::from_secs(u64::from(total / FPS)) + DRAIN * 4;
    let mut drain_end: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > hard_end || drain_end.is_some_and(|d| now > d) {
            break;
        }
        if drain_end.is_none() && feeder.is_finished() {
            drain_end = Some(now + DRAIN);
        }
        let Some(sample) = appsink.try_pull_sample(gst::ClockTime::from_mseconds(200)) else {
            if appsink.is_eos() {
                break;
            }
            continue;
        };
        let at = Instant::now();
        decoded.push(at);
        match read_stamp(&sample) {
            Some(n) if n < total => {
                if last_index.is_some_and(|l| n <= l) {
                    reordered += 1;
                }
                last_index = Some(n);
                arrivals.entry(n).or_insert(at);
                if n == total - 1 {
                    break;
                }
            }
            _ => rejected += 1,
        }
    }
    let _ = feeder.join();
    let errors = [bus_error(&pp), bus_error(&rp)]
        .into_iter()
        .flatten()
        .collect();
    let _ = pp.set_state(gst::State::Null);
    let _ = rp.set_state(gst::State::Null);
    let pushed = pushed.lock().unwrap().clone();
    Flow {
        pushed,
        arrivals,
        decoded,
        rejected,
        reordered,
        errors,
    }
}

/// Latency figures of a flow's frames `from..to` (milliseconds; NaN without frames).
pub struct Latency {
    pub frames_out: usize,
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
    pub mean: f64,
    pub fps_out: f64,
}

impl Flow {
    pub fn latency(&self, from: u32, to: u32) -> Latency {
        let mut lat: Vec<f64> = Vec::new();
        let mut times: Vec<Instant> = Vec::new();
        for n in from..to {
            if let (Some(a), Some(Some(p))) = (self.arrivals.get(&n), self.pushed.get(n as usize)) {
                lat.push(a.duration_since(*p).as_secs_f64() * 1000.0);
                times.push(*a);
            }
        }
        lat.sort_by(f64::total_cmp);
        times.sort();
        let pct = |p: f64| {
            if lat.is_empty() {
                f64::NAN
            } else {
                lat[((lat.len() - 1) as f64 * p).round() as usize]
            }
        };
        let fps_out = if times.len() > 1 {
            (times.len() - 1) as f64
                / times[times.len() - 1]
                    .duration_since(times[0])
                    .as_secs_f64()
        } else {
            f64::NAN
        };
        Latency {
            frames_out: lat.len(),
            p50: pct(0.5),
            p95: pct(0.95),
            max: lat.last().copied().unwrap_or(f64::NAN),
            mean: lat.iter().sum::<f64>() / lat.len().max(1) as f64,
            fps_out,
        }
    }

    /// Decoded frames (stamped or not) that came while frames `from..to` were being pushed
    /// (plus one frame interval), and their rate.
    pub fn decoded_in(&self, from: u32, to: u32) -> (usize, f64) {
        let (Some(Some(a)), Some(Some(b))) = (
            self.pushed.get(from as usize),
            self.pushed.get(to.saturating_sub(1) as usize),
        ) else {
            return (0, f64::NAN);
        };
        let end = *b + Duration::from_secs(1) / FPS;
        let n = self
            .decoded
            .iter()
            .filter(|t| **t >= *a && **t < end)
            .count();
        (n, n as f64 / end.duration_since(*a).as_secs_f64())
    }

    /// Runs of consecutive missing frames in `from..to`: "length x count".
    pub fn missing_runs(&self, from: u32, to: u32) -> String {
        let mut runs: std::collections::BTreeMap<u32, u32> = Default::default();
        let mut run = 0;
        for n in from..=to {
            if n < to && !self.arrivals.contains_key(&n) {
                run += 1;
            } else if run > 0 {
                *runs.entry(run).or_default() += 1;
                run = 0;
            }
        }
        runs.iter()
            .map(|(len, count)| format!("{len}x{count}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// CPU seconds per second of `video_s` between two samples: (daemon tree, its children,
/// this process, other processes).
pub fn cpu_per_s(a: &Cpu, b: &Cpu, video_s: f64) -> (f64, f64, f64, f64) {
    let ticks = clock_ticks();
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / ticks / video_s;
    let d = per_s(a.daemon_ticks, b.daemon_ticks);
    let me = per_s(a.self_ticks, b.self_ticks);
    let all = per_s(a.system_ticks, b.system_ticks);
    let main = per_s(a.daemon_main_ticks, b.daemon_main_ticks);
    (d, (d - main).max(0.0), me, (all - d - me).max(0.0))
}
