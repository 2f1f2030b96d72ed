// SPDX-License-Identifier: MPL-2.0
//! End-to-end latency, throughput and CPU of the `rivulet` daemon as a real child process.
//!
//! A live 512×512 30 fps stream is pushed into an `appsrc` (is-live, paced by the wall clock)
//! and published with `tricklesink` (x264 zerolatency) into the daemon's embedded trickle server.
//! Every frame carries its index drawn into the picture (two rows of 16 black/white 32×32
//! squares: the index and its complement, which also rejects any frame that is not one of ours);
//! the wall-clock time of each push is recorded. The reader is `tricklesrc` (decode mode,
//! `do-timestamp=false`) → `appsink sync=false`; the index is read back from the decoded picture
//! and the arrival time recorded.
//!
//! Cases: the floor (publisher and reader on the input channel alone, the daemon idle: only its
//! trickle server works), the daemon running `noop` with the runner's default 24 fps cap, and
//! with `RIVULET_FPS_CAP=0`, and (d) as the capped case with a dashboard open (both preview
//! JPEGs fetched every second: the preview branches run only while previews are fetched). CPU is the daemon's process tree (utime + stime from /proc) over the
//! measured interval, per second of video; the bench process itself (publisher + reader) is shown
//! beside it.
//!
//! The daemon's CPU is also split into its own process and its children (the inference child
//! of `RIVULET_ISOLATION=process`, the default). The daemon runs libgomp with
//! `OMP_WAIT_POLICY=PASSIVE` unless the environment sets it (see `src/openmp.rs`); run the bench
//! with `OMP_WAIT_POLICY=ACTIVE` to see what spinning OpenMP workers cost.
//!
//! `cargo bench -p rivulet-launch --bench e2e_latency` (builds `target/release/rivulet` too).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;
use serde_json::json;

const W: usize = 512;
const H: usize = 512;
const FPS: u32 = 30;
/// Frames before the measured interval (pipeline start-up, first segment, first IDR).
const WARMUP: u32 = 90;
/// Measured frames: 10 s of video.
const MEASURED: u32 = 300;
const TOTAL: u32 = WARMUP + MEASURED;
const BLOCK: usize = 32;
const BITS: usize = 16;
/// How long the reader waits for late frames after the last push.
const DRAIN: Duration = Duration::from_secs(3);
/// The whole bench is killed (daemon included) past this.
const WATCHDOG: Duration = Duration::from_secs(300);

/// The daemon's pid, for the watchdog.
static DAEMON_PID: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Floor,
    Capped,
    Uncapped,
    /// As `Capped`, with a dashboard open: both previews fetched every second.
    Previews,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::Floor => "(a) floor: publisher -> trickle server -> reader, no runner",
            Case::Capped => "(b) daemon, noop, default 24 fps cap",
            Case::Uncapped => "(c) daemon, noop, RIVULET_FPS_CAP=0",
            Case::Previews => "(d) as (b), dashboard open (previews fetched every second)",
        }
    }
}

struct Row {
    case: Case,
    frames_in: u32,
    frames_out: usize,
    expected_out: usize,
    p50: f64,
    p95: f64,
    max: f64,
    mean: f64,
    fps_out: f64,
    daemon_cpu: f64,
    child_cpu: f64,
    bench_cpu: f64,
    other_cpu: f64,
    missing_runs: String,
    counters: String,
    rejected: usize,
    reordered: usize,
}

// ---------------------------------------------------------------------------------------------
// The daemon as a child process.

struct Daemon {
    child: Child,
    base: String,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        DAEMON_PID.store(0, Ordering::SeqCst);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `target/release/rivulet`, next to the bench executable (`target/release/deps/e2e_latency-…`).
fn daemon_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("bench executable in target/<profile>/deps")
        .join("rivulet");
    assert!(
        path.exists(),
        "{} is missing: run `cargo bench -p rivulet-launch --bench e2e_latency`, which builds it",
        path.display()
    );
    path
}

fn spawn_daemon(case: Case) -> Daemon {
    let dir = std::env::temp_dir().join(format!(
        "rivulet-bench-{}-{}",
        std::process::id(),
        case as u8
    ));
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
    if case == Case::Uncapped {
        cmd.env("RIVULET_FPS_CAP", "0");
    }
    let mut child = cmd.spawn().expect("cannot start rivulet");
    DAEMON_PID.store(child.id(), Ordering::SeqCst);
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

// ---------------------------------------------------------------------------------------------
// CPU time from /proc.

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100 on every Linux port).
fn clock_ticks() -> f64 {
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
fn stat_of(path: &str) -> Option<(u32, u64)> {
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

/// CPU ticks of `root` and all its descendants (threads are included in each process's stat).
fn tree_ticks(root: u32) -> u64 {
    let mut procs: Vec<(u32, u32, u64)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, t)) = stat_of(&format!("/proc/{pid}/stat")) {
                procs.push((pid, ppid, t));
            }
        }
    }
    let mut tree = vec![root];
    let mut total = 0;
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        for &(pid, ppid, t) in &procs {
            if pid == p {
                total += t;
            }
            if ppid == p && !tree.contains(&pid) {
                tree.push(pid);
            }
        }
        i += 1;
    }
    total
}

fn self_ticks() -> u64 {
    stat_of("/proc/self/stat").map_or(0, |(_, t)| t)
}

// ---------------------------------------------------------------------------------------------
// Stamped frames.

/// An I420 frame: the index in squares on the first row of blocks and its complement on the
/// second (white = 1); below them a textured pattern scrolling 4 px per frame, so that the
/// encoders do real work (a flat picture would make x264 nearly free).
fn stamped_i420(n: u32) -> Vec<u8> {
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
fn read_stamp(sample: &gst::Sample) -> Option<u32> {
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

fn publisher(url: &str) -> (gst::Pipeline, gst_app::AppSrc) {
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
fn reader(url: &str) -> (gst::Pipeline, gst_app::AppSink) {
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

fn bus_error(p: &gst::Pipeline) -> Option<String> {
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

// ---------------------------------------------------------------------------------------------
// One case.

struct Cpu {
    daemon_ticks: u64,
    /// The daemon's own process (its tree less its children, e.g. the inference child).
    daemon_main_ticks: u64,
    self_ticks: u64,
    system_ticks: u64,
}

/// Busy ticks of the whole machine (all CPUs): the first line of /proc/stat less idle and iowait.
fn system_ticks() -> u64 {
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

fn cpu_now(daemon_pid: u32) -> Cpu {
    Cpu {
        daemon_ticks: tree_ticks(daemon_pid),
        daemon_main_ticks: stat_of(&format!("/proc/{daemon_pid}/stat")).map_or(0, |(_, t)| t),
        self_ticks: self_ticks(),
        system_ticks: system_ticks(),
    }
}

fn run_case(rt: &tokio::runtime::Runtime, http: &reqwest::Client, case: Case) -> Row {
    let daemon = spawn_daemon(case);
    let base = daemon.base.clone();
    let pid = daemon.child.id();
    let mid = format!("bench{}", case as u8);
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");

    rt.block_on(async {
        let t = Instant::now();
        loop {
            let status = match http.get(format!("{base}/health")).send().await {
                Ok(r) => r.json::<serde_json::Value>().await.ok(),
                Err(_) => None,
            };
            if status.as_ref().is_some_and(|v| v["status"] == "IDLE") {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "daemon not IDLE within 60 s: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (suffix, mime) in [
            ("", "video/MP2T"),
            ("-out", "video/MP2T"),
            ("-control", "application/json"),
            ("-events", "application/json"),
        ] {
            let r = http
                .post(url(suffix))
                .header("Expect-Content", mime)
                .send()
                .await
                .expect("create channel");
            assert_eq!(r.status(), 200, "create channel {mid}{suffix}");
        }
        if case != Case::Floor {
            let start = json!({
                "subscribe_url": url(""), "publish_url": url("-out"),
                "control_url": url("-control"), "events_url": url("-events"),
                "model_id": "noop", "params": {"width": W, "height": H},
                "gateway_request_id": "bench", "manifest_id": mid, "stream_id": "bench",
            });
            let r = http
                .post(format!("{base}/live-video-to-video"))
                .json(&start)
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .expect("start request");
            assert_eq!(r.status(), 200, "start: {:?}", r.text().await);
        }
    });

    // Plain thread (not a tokio worker): the trickle elements block on their own runtime.
    let read_url = if case == Case::Floor {
        url("")
    } else {
        url("-out")
    };
    let (rp, appsink) = reader(&read_url);
    rp.set_state(gst::State::Playing)
        .expect("reader to PLAYING");
    let (pp, appsrc) = publisher(&url(""));
    pp.set_state(gst::State::Playing)
        .expect("publisher to PLAYING");

    // (d): a dashboard's preview fetches, once a second, on a thread of their own.
    let stop_fetching = Arc::new(AtomicBool::new(false));
    let fetcher = (case == Case::Previews).then(|| {
        let stop = stop_fetching.clone();
        let base = base.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let http = reqwest::Client::new();
            rt.block_on(async {
                while !stop.load(Ordering::SeqCst) {
                    for which in ["input", "output"] {
                        if let Ok(r) = http
                            .get(format!("{base}/api/preview/{which}.jpg"))
                            .send()
                            .await
                        {
                            let _ = r.bytes().await;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        })
    });
    let pushed: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; TOTAL as usize]));
    let cpu: Arc<Mutex<Option<(Cpu, Cpu)>>> = Arc::new(Mutex::new(None));
    let frames: Vec<Vec<u8>> = (0..TOTAL).map(stamped_i420).collect();
    let feeder = {
        let pushed = pushed.clone();
        let cpu = cpu.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let due = |n: u32| start + Duration::from_secs(1) * n / FPS;
            let mut first = None;
            for (n, frame) in frames.into_iter().enumerate() {
                let n = n as u32;
                if let Some(wait) = due(n).checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if n == WARMUP {
                    first = Some(cpu_now(pid));
                }
                let buf = gst::Buffer::from_mut_slice(frame);
                pushed.lock().unwrap()[n as usize] = Some(Instant::now());
                if appsrc.push_buffer(buf).is_err() {
                    return;
                }
            }
            // The measured interval is MEASURED frame intervals of video.
            if let Some(wait) = due(TOTAL).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let last = cpu_now(pid);
            *cpu.lock().unwrap() = first.map(|f| (f, last));
        })
    };

    let mut arrivals: HashMap<u32, Instant> = HashMap::new();
    let mut rejected = 0usize;
    let mut reordered = 0usize;
    let mut last_index: Option<u32> = None;
    let hard_end = Instant::now() + Duration::from_secs(TOTAL as u64 / FPS as u64) + DRAIN * 4;
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
        match read_stamp(&sample) {
            Some(n) if n < TOTAL => {
                if last_index.is_some_and(|l| n <= l) {
                    reordered += 1;
                }
                last_index = Some(n);
                arrivals.entry(n).or_insert(at);
                if n == TOTAL - 1 {
                    break;
                }
            }
            _ => rejected += 1,
        }
    }
    let _ = feeder.join();
    stop_fetching.store(true, Ordering::SeqCst);
    if let Some(f) = fetcher {
        let _ = f.join();
    }
    let errors = [bus_error(&pp), bus_error(&rp)];
    let counters = if case == Case::Floor {
        String::new()
    } else {
        rt.block_on(async {
            let text = async {
                http.get(format!("{base}/metrics"))
                    .send()
                    .await?
                    .text()
                    .await
            };
            match tokio::time::timeout(Duration::from_secs(5), text).await {
                Ok(Ok(t)) => t
                    .lines()
                    .filter(|l| l.starts_with("rivulet_") && l.contains("_total "))
                    .map(|l| l.trim_start_matches("rivulet_").replace("_total ", "="))
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => "metrics unavailable".into(),
            }
        })
    };
    let _ = pp.set_state(gst::State::Null);
    let _ = rp.set_state(gst::State::Null);
    drop(daemon);
    for e in errors.into_iter().flatten() {
        eprintln!("e2e_latency: pipeline error in {}: {e}", case.label());
    }

    let pushed = pushed.lock().unwrap().clone();
    let mut lat: Vec<f64> = Vec::new();
    let mut times: Vec<Instant> = Vec::new();
    for n in WARMUP..TOTAL {
        if let (Some(a), Some(p)) = (arrivals.get(&n), pushed[n as usize]) {
            lat.push(a.duration_since(p).as_secs_f64() * 1000.0);
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
    let video_s = f64::from(MEASURED) / f64::from(FPS);
    let ticks = clock_ticks();
    let (daemon_cpu, child_cpu, bench_cpu, other_cpu) = match cpu.lock().unwrap().take() {
        Some((a, b)) => {
            let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / ticks / video_s;
            let d = per_s(a.daemon_ticks, b.daemon_ticks);
            let me = per_s(a.self_ticks, b.self_ticks);
            let all = per_s(a.system_ticks, b.system_ticks);
            let main = per_s(a.daemon_main_ticks, b.daemon_main_ticks);
            (d, (d - main).max(0.0), me, (all - d - me).max(0.0))
        }
        None => (f64::NAN, f64::NAN, f64::NAN, f64::NAN),
    };
    // Runs of consecutive missing frames in the measured range: "length x count".
    let mut runs: std::collections::BTreeMap<u32, u32> = Default::default();
    let mut run = 0;
    for n in WARMUP..=TOTAL {
        if n < TOTAL && !arrivals.contains_key(&n) {
            run += 1;
        } else if run > 0 {
            *runs.entry(run).or_default() += 1;
            run = 0;
        }
    }
    let missing_runs = runs
        .iter()
        .map(|(len, count)| format!("{len}x{count}"))
        .collect::<Vec<_>>()
        .join(" ");
    let expected_out = if matches!(case, Case::Capped | Case::Previews) {
        // The cap sees every frame from the first; count those it keeps in the measured range.
        let mut cap = rivulet::session::stream::FpsCap::new(24.0);
        (0..TOTAL)
            .filter(|&n| cap.pass(f64::from(n) / f64::from(FPS)) && n >= WARMUP)
            .count()
    } else {
        MEASURED as usize
    };
    Row {
        case,
        frames_in: MEASURED,
        frames_out: lat.len(),
        expected_out,
        p50: pct(0.5),
        p95: pct(0.95),
        max: lat.last().copied().unwrap_or(f64::NAN),
        mean: lat.iter().sum::<f64>() / lat.len().max(1) as f64,
        fps_out,
        daemon_cpu,
        child_cpu,
        bench_cpu,
        other_cpu,
        missing_runs,
        counters,
        rejected,
        reordered,
    }
}

fn cpu_model() -> String {
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

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    std::thread::spawn(|| {
        std::thread::sleep(WATCHDOG);
        let pid = DAEMON_PID.load(Ordering::SeqCst);
        if pid != 0 {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        eprintln!("e2e_latency: watchdog: gave up after {WATCHDOG:?}");
        std::process::exit(1);
    });
    gst::init().unwrap();
    gsttrickle::plugin_register_static().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();

    let rows: Vec<Row> = [Case::Floor, Case::Capped, Case::Uncapped, Case::Previews]
        .into_iter()
        .map(|c| run_case(&rt, &http, c))
        .collect();

    println!();
    println!(
        "e2e_latency: {W}x{H} @ {FPS} fps live input (x264 zerolatency via tricklesink), {} s measured \
         after {} s warm-up per case, loopback HTTP; {} cores of {}",
        MEASURED / FPS,
        WARMUP / FPS,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    println!(
        "| case | frames out/in | expected out | p50 ms | p95 ms | max ms | mean ms | out fps | daemon CPU s/s | of which its children (inference) | publisher+reader CPU s/s | other processes CPU s/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {}/{} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} |",
            r.case.label(),
            r.frames_out,
            r.frames_in,
            r.expected_out,
            r.p50,
            r.p95,
            r.max,
            r.mean,
            r.fps_out,
            r.daemon_cpu,
            r.child_cpu,
            r.bench_cpu,
            r.other_cpu
        );
    }
    let floor = &rows[0];
    println!();
    println!(
        "| runner minus floor | added p50 ms | added p95 ms | p50 ratio | p95 ratio | added daemon CPU s/s |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows[1..] {
        println!(
            "| {} | {:+.1} | {:+.1} | {:.2}x | {:.2}x | {:+.3} |",
            r.case.label(),
            r.p50 - floor.p50,
            r.p95 - floor.p95,
            r.p50 / floor.p50,
            r.p95 / floor.p95,
            r.daemon_cpu - floor.daemon_cpu
        );
    }
    println!();
    for r in &rows {
        println!(
            "{}: missing runs (length x count) [{}]; daemon counters [{}]",
            r.case.label(),
            r.missing_runs,
            r.counters
        );
        if r.rejected > 0 || r.reordered > 0 {
            println!(
                "{}: {} decoded frames without a valid stamp (not ours), {} out of order",
                r.case.label(),
                r.rejected,
                r.reordered
            );
        }
    }
}
