// SPDX-License-Identifier: MPL-2.0
//! Many live sessions in one `rivulet serve --max-sessions N` daemon, as real child processes
//! with real publishers and readers (the same stamped 512×512 30 fps flows as `e2e_latency`).
//!
//! Part 1, `noop` (the runner's default 24 fps cap; `RIVULET_ISOLATION=process`, the default):
//! the floor (one flow through the idle daemon's trickle server, no session), then 1, 2 and 4
//! concurrent sessions in one daemon. Per session: frames out/in, p50/p95 and the added p50/p95
//! over the floor. Per case: daemon CPU s/s (its process tree, over the measured interval), RSS
//! of the daemon tree once every session runs, RSS per extra session, and the time from the
//! start request to the first output frame of the first and of the second session (each
//! session's input is live before its start request, as with an orchestrator).
//!
//! Part 2, `styletransfer` at 384² (the smallest size the runner's params allow; the shipped
//! model, found on the default search path; the input is the same 512² flow): two concurrent
//! sessions in one daemon (their `aipipeline`s share one `batch-group`) against two daemons with
//! one session each. Decoded frames out and their rate (a restyled picture hides the stamp, so
//! there is no per-frame latency there), CPU, RSS, and the second session's time to first output
//! against the first's.
//!
//! `cargo bench -p rivulet-launch --bench sessions` (builds `target/release/rivulet` too).
//! `-- --quick`: 2 s warm-up and 4 s measured per case instead of 3 s and 10 s.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{
    Cpu, Daemon, FPS, Flow, cpu_model, cpu_now, cpu_per_s, run_flow, spawn_daemon, tree_rss_kb,
};

const WATCHDOG: Duration = Duration::from_secs(900);
/// How long each flow's publisher runs before its start request is sent.
const LIVE_BEFORE_START: Duration = Duration::from_millis(500);

/// What every case runs with.
struct Bench {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    plan: Plan,
}

struct Plan {
    warmup: u32,
    measured: u32,
}

impl Plan {
    fn total(&self) -> u32 {
        self.warmup + self.measured
    }
    fn video_s(&self) -> f64 {
        f64::from(self.measured) / f64::from(FPS)
    }
}

/// One case's figures.
struct Case {
    label: String,
    /// Per flow: its latency over the measured frames, and frames expected out.
    flows: Vec<(common::Latency, usize)>,
    /// Daemon CPU s/s (all daemons of the case).
    cpu: f64,
    /// RSS of the daemon trees once every session ran, kB.
    rss_kb: u64,
    /// Per flow: decoded frames (stamped or not) during the measured interval, and their rate.
    decoded: Vec<(usize, f64)>,
    /// Start request to first output frame, per session in start order.
    first_output: Vec<Duration>,
    errors: Vec<String>,
}

/// Frames of `from..total` at 30 fps that the runner's 24 fps cap keeps.
fn capped_out(from: u32, total: u32) -> usize {
    let mut cap = rivulet::session::stream::FpsCap::new(24.0);
    (0..total)
        .filter(|&n| cap.pass(f64::from(n) / f64::from(FPS)) && n >= from)
        .count()
}

fn daemon_with(tag: &str, pipeline: &str, sessions: usize) -> Daemon {
    let n = sessions.to_string();
    spawn_daemon(
        tag,
        &[("MODEL_ID", pipeline), ("RIVULET_MAX_SESSIONS", n.as_str())],
    )
}

/// Starts one session per `(daemon, mid)`, one after the other, and runs all flows at once.
/// Each start's time to first output is measured on its own flow (the first stamped frame
/// that comes back), from the start request.
fn run_sessions(
    b: &Bench,
    label: String,
    daemons: &[Daemon],
    sessions: &[(usize, String)],
    pipeline: &str,
    params: Value,
) -> Case {
    let (rt, http, plan) = (&b.rt, &b.http, &b.plan);
    rt.block_on(async {
        for d in daemons {
            common::wait_idle(http, &d.base).await;
        }
        for (d, mid) in sessions {
            common::create_channels(http, &daemons[*d].base, mid).await;
        }
    });
    let pids: Vec<u32> = daemons.iter().map(|d| d.child.id()).collect();
    let cpu_all = |pids: &[u32]| pids.iter().map(|p| cpu_now(*p)).collect::<Vec<Cpu>>();
    let first: Arc<Mutex<Option<Vec<Cpu>>>> = Arc::default();
    let last: Arc<Mutex<Option<Vec<Cpu>>>> = Arc::default();
    let rss: Arc<Mutex<u64>> = Arc::default();
    let mut threads = Vec::new();
    for (i, (d, mid)) in sessions.iter().enumerate() {
        let base = daemons[*d].base.clone();
        let start = common::start_request(&base, mid, pipeline, params.clone());
        let (in_url, out_url) = (
            format!("{base}/trickle/{mid}"),
            format!("{base}/trickle/{mid}-out"),
        );
        // The first flow samples CPU and RSS for the whole case.
        let is_first = i == 0;
        let (f, l, r) = (first.clone(), last.clone(), rss.clone());
        let pids_w = pids.clone();
        let pids_e = pids.clone();
        let (total, warmup) = (plan.total(), plan.warmup);
        let flow = std::thread::spawn(move || -> Flow {
            run_flow(
                &in_url,
                &out_url,
                total,
                warmup,
                move || {
                    if is_first {
                        *f.lock().unwrap() = Some(cpu_all(&pids_w));
                    }
                },
                move || {
                    if is_first {
                        *l.lock().unwrap() = Some(cpu_all(&pids_e));
                        *r.lock().unwrap() = pids_e.iter().map(|p| tree_rss_kb(*p)).sum();
                    }
                },
            )
        });
        // As with an orchestrator, the input is live before the start request comes: the
        // time to first output is the daemon's, not the publisher's start-up.
        std::thread::sleep(LIVE_BEFORE_START);
        let asked = Instant::now();
        rt.block_on(common::start_stream(http, &base, &start));
        threads.push((asked, flow));
        // The next session starts once this one's output has begun, so that each time to
        // first output is its own (the second session's shows what a warm daemon gives).
        rt.block_on(wait_output(http, &base, mid));
    }
    let flows: Vec<(Instant, Flow)> = threads
        .into_iter()
        .map(|(asked, t)| (asked, t.join().expect("flow thread")))
        .collect();
    let first_output: Vec<Duration> = flows
        .iter()
        .map(|(asked, f)| {
            f.decoded
                .first()
                .map_or(Duration::MAX, |t| t.duration_since(*asked))
        })
        .collect();
    let (a, b) = (first.lock().unwrap().take(), last.lock().unwrap().take());
    let cpu = match (a, b) {
        (Some(a), Some(b)) => a
            .iter()
            .zip(&b)
            .map(|(a, b)| cpu_per_s(a, b, plan.video_s()).0)
            .sum(),
        _ => f64::NAN,
    };
    let expected = capped_out(plan.warmup, plan.total());
    let errors = flows
        .iter()
        .flat_map(|(_, f)| f.errors.iter().cloned())
        .collect();
    Case {
        label,
        flows: flows
            .iter()
            .map(|(_, f)| (f.latency(plan.warmup, plan.total()), expected))
            .collect(),
        decoded: flows
            .iter()
            .map(|(_, f)| f.decoded_in(plan.warmup, plan.total()))
            .collect(),
        cpu,
        rss_kb: *rss.lock().unwrap(),
        first_output,
        errors,
    }
}

/// Waits (120 s bound) until session `mid` has sent a real output frame.
async fn wait_output(http: &reqwest::Client, base: &str, mid: &str) {
    let t = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/v1/sessions/{mid}")).send().await
            && let Ok(v) = r.json::<Value>().await
            && !v["status"]["inference_status"]["last_output_time"].is_null()
        {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "session {mid}: no output within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The floor: one flow through the idle daemon's trickle server (no session).
fn floor(rt: &tokio::runtime::Runtime, http: &reqwest::Client, plan: &Plan) -> common::Latency {
    let d = daemon_with("sessions-floor", "noop", 1);
    let mid = "floor";
    rt.block_on(async {
        common::wait_idle(http, &d.base).await;
        common::create_channels(http, &d.base, mid).await;
    });
    let url = format!("{}/trickle/{mid}", d.base);
    let flow = run_flow(&url, &url, plan.total(), plan.warmup, || {}, || {});
    flow.latency(plan.warmup, plan.total())
}

fn ms(d: Duration) -> String {
    if d == Duration::MAX {
        "none".into()
    } else {
        format!("{:.0}", d.as_secs_f64() * 1000.0)
    }
}

fn main() {
    common::watchdog("sessions", WATCHDOG);
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = if quick {
        Plan {
            warmup: 60,
            measured: 120,
        }
    } else {
        Plan {
            warmup: 90,
            measured: 300,
        }
    };
    gst::init().unwrap();
    gsttrickle::plugin_register_static().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();
    let floor = floor(&rt, &http, &plan);
    let b = Bench { rt, http, plan };
    let noop_params = json!({"width": 512, "height": 512});

    let mut noop = Vec::new();
    for n in [1usize, 2, 4] {
        let d = daemon_with(&format!("sessions-noop{n}"), "noop", 4);
        let sessions: Vec<(usize, String)> = (0..n).map(|i| (0, format!("n{n}s{i}"))).collect();
        let daemons = [d];
        noop.push(run_sessions(
            &b,
            format!("{n} noop session(s), one daemon"),
            &daemons,
            &sessions,
            "noop",
            noop_params.clone(),
        ));
    }
    let style_params = json!({"width": 384, "height": 384});
    let shared = {
        let daemons = [daemon_with("sessions-style-shared", "styletransfer", 2)];
        run_sessions(
            &b,
            "2 styletransfer 384² sessions, one daemon (one batch-group)".into(),
            &daemons,
            &[(0, "st0".into()), (0, "st1".into())],
            "styletransfer",
            style_params.clone(),
        )
    };
    let separate = {
        let daemons = [
            daemon_with("sessions-style-a", "styletransfer", 1),
            daemon_with("sessions-style-b", "styletransfer", 1),
        ];
        run_sessions(
            &b,
            "2 styletransfer 384² sessions, two daemons".into(),
            &daemons,
            &[(0, "sa0".into()), (1, "sb0".into())],
            "styletransfer",
            style_params,
        )
    };

    println!();
    println!(
        "sessions: 512x512 @ {FPS} fps live input per session (x264 zerolatency via tricklesink), \
         {:.0} s measured after {:.0} s warm-up per case, loopback HTTP; {} cores of {}",
        b.plan.video_s(),
        f64::from(b.plan.warmup) / f64::from(FPS),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    println!(
        "floor (publisher -> trickle server -> reader, no session): p50 {:.1} ms, p95 {:.1} ms, {} of {} frames",
        floor.p50, floor.p95, floor.frames_out, b.plan.measured
    );
    println!();
    println!(
        "| case | session | stamped frames out/expected | decoded frames out | out fps | p50 ms | p95 ms | added p50 ms | added p95 ms | first output ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for c in noop.iter().chain([&shared, &separate]) {
        for (i, (((lat, expected), first), (decoded, fps))) in c
            .flows
            .iter()
            .zip(&c.first_output)
            .zip(&c.decoded)
            .enumerate()
        {
            // A restyled picture hides the stamp: no per-frame latency then.
            let f = |v: f64| {
                if v.is_nan() {
                    "-".to_string()
                } else {
                    format!("{v:.1}")
                }
            };
            let added = |v: f64| {
                if v.is_nan() {
                    "-".to_string()
                } else {
                    format!("{v:+.1}")
                }
            };
            println!(
                "| {} | {i} | {}/{} | {decoded} | {fps:.1} | {} | {} | {} | {} | {} |",
                c.label,
                lat.frames_out,
                expected,
                f(lat.p50),
                f(lat.p95),
                added(lat.p50 - floor.p50),
                added(lat.p95 - floor.p95),
                ms(*first)
            );
        }
    }
    println!();
    println!(
        "| case | daemon CPU s/s | CPU s/s per session | daemon RSS MB | RSS per extra session MB | worst frames out/expected | 2nd first output / 1st |"
    );
    println!("|---|---|---|---|---|---|---|");
    let base_rss = noop[0].rss_kb as f64;
    for (k, c) in noop.iter().chain([&shared, &separate]).enumerate() {
        let n = c.flows.len() as f64;
        let extra = if k < noop.len() && n > 1.0 {
            format!("{:.1}", (c.rss_kb as f64 - base_rss) / (n - 1.0) / 1024.0)
        } else {
            "-".into()
        };
        // Decoded frames against the capped input: stamps are unreadable once restyled.
        let worst = c
            .decoded
            .iter()
            .zip(&c.flows)
            .map(|((d, _), (_, e))| *d as f64 / *e as f64)
            .fold(f64::INFINITY, f64::min);
        let ratio = match c.first_output.as_slice() {
            [a, b, ..] if *a != Duration::MAX && *b != Duration::MAX => {
                format!("{:.2}", b.as_secs_f64() / a.as_secs_f64())
            }
            _ => "-".into(),
        };
        println!(
            "| {} | {:.3} | {:.3} | {:.1} | {} | {:.1} % | {} |",
            c.label,
            c.cpu,
            c.cpu / n,
            c.rss_kb as f64 / 1024.0,
            extra,
            worst * 100.0,
            ratio
        );
    }
    for c in noop.iter().chain([&shared, &separate]) {
        for e in &c.errors {
            eprintln!("sessions: pipeline error in {}: {e}", c.label);
        }
    }
}
