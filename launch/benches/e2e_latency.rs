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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

mod common;
use common::{Cpu, FPS, H, W, cpu_model, cpu_now, cpu_per_s, run_flow, spawn_daemon};

/// Frames before the measured interval (3 s).
const WARMUP: u32 = 90;
/// Frames measured (10 s).
const MEASURED: u32 = 300;
const TOTAL: u32 = WARMUP + MEASURED;
/// The whole bench gives up (and kills the daemon) after this.
const WATCHDOG: Duration = Duration::from_secs(300);

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
// One case.

fn run_case(rt: &tokio::runtime::Runtime, http: &reqwest::Client, case: Case) -> Row {
    let envs: &[(&str, &str)] = if case == Case::Uncapped {
        &[("RIVULET_FPS_CAP", "0")]
    } else {
        &[]
    };
    let daemon = spawn_daemon(&format!("e2e{}", case as u8), envs);
    let base = daemon.base.clone();
    let pid = daemon.child.id();
    let mid = format!("bench{}", case as u8);
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");

    rt.block_on(async {
        common::wait_idle(http, &base).await;
        common::create_channels(http, &base, &mid).await;
        if case != Case::Floor {
            let params = json!({"width": W, "height": H});
            let start = common::start_request(&base, &mid, "noop", params);
            common::start_stream(http, &base, &start).await;
        }
    });

    let read_url = if case == Case::Floor {
        url("")
    } else {
        url("-out")
    };
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
    // The measured interval is MEASURED frame intervals of video, from frame WARMUP.
    let first: Arc<Mutex<Option<Cpu>>> = Arc::default();
    let last: Arc<Mutex<Option<Cpu>>> = Arc::default();
    let flow = {
        let (f, l) = (first.clone(), last.clone());
        run_flow(
            &url(""),
            &read_url,
            TOTAL,
            WARMUP,
            move || *f.lock().unwrap() = Some(cpu_now(pid)),
            move || *l.lock().unwrap() = Some(cpu_now(pid)),
        )
    };
    stop_fetching.store(true, Ordering::SeqCst);
    if let Some(f) = fetcher {
        let _ = f.join();
    }
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
    drop(daemon);
    for e in &flow.errors {
        eprintln!("e2e_latency: pipeline error in {}: {e}", case.label());
    }

    let lat = flow.latency(WARMUP, TOTAL);
    let video_s = f64::from(MEASURED) / f64::from(FPS);
    let (daemon_cpu, child_cpu, bench_cpu, other_cpu) =
        match (first.lock().unwrap().take(), last.lock().unwrap().take()) {
            (Some(a), Some(b)) => cpu_per_s(&a, &b, video_s),
            _ => (f64::NAN, f64::NAN, f64::NAN, f64::NAN),
        };
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
        frames_out: lat.frames_out,
        expected_out,
        p50: lat.p50,
        p95: lat.p95,
        max: lat.max,
        mean: lat.mean,
        fps_out: lat.fps_out,
        daemon_cpu,
        child_cpu,
        bench_cpu,
        other_cpu,
        missing_runs: flow.missing_runs(WARMUP, TOTAL),
        counters,
        rejected: flow.rejected,
        reordered: flow.reordered,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    common::watchdog("e2e_latency", WATCHDOG);
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
