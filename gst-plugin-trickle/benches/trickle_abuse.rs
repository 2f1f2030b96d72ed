// SPDX-License-Identifier: MPL-2.0
//! The trickle server under abuse: `cargo bench -p gst-plugin-trickle --bench trickle_abuse`.
//!
//! A normal client publishes a 4 KiB segment and reads it back (POST + GET, keep-alive), first
//! on an unloaded server, then while the server holds `TRICKLE_ABUSE_CONNECTIONS` (default
//! 2000) half-open connections (half with part of a request head, half silent) and
//! `TRICKLE_ABUSE_WAITERS` (default 500) GETs waiting on a future seq, and finally with a
//! connect flood over the connection cap on top (4 tasks connecting in a loop; each answered
//! 503). Printed: connections held, RSS, open fds, the round trip's p50/p95 and the ratio to
//! the unloaded figures, with a plain loopback TCP echo of 4 KiB as the floor.
//! `TRICKLE_ABUSE_ROUNDS` (default 400) round trips per phase.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gsttrickle::protocol::server::{
    ConnectionStats, ServerConfig, ServerHandle, TrickleServer, raise_fd_limit, serve,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// `rounds` POST + GET round trips of a 4 KiB segment from seq `first`; latencies (sorted)
/// and the number of failed round trips.
async fn round_trips(
    h: &ServerHandle,
    client: &reqwest::Client,
    first: i64,
    rounds: usize,
) -> (Vec<Duration>, usize) {
    let mut lat = Vec::with_capacity(rounds);
    let mut failed = 0;
    for seq in first..first + rounds as i64 {
        let body: Vec<u8> = (0..4096).map(|i| (i as i64 * 7 + seq) as u8).collect();
        let url = h.url(&format!("rt/{seq}"));
        let t = Instant::now();
        let ok = async {
            let r = client
                .post(&url)
                .header("Content-Type", "video/MP2T")
                .body(body.clone())
                .send()
                .await
                .ok()?;
            if r.status() != 200 {
                return None;
            }
            let r = client.get(&url).send().await.ok()?;
            let got = r.bytes().await.ok()?;
            (got[..] == body[..]).then_some(())
        }
        .await;
        match ok {
            Some(()) => lat.push(t.elapsed()),
            None => failed += 1,
        }
    }
    lat.sort();
    (lat, failed)
}

/// 4 KiB written, echoed back, read: the plain loopback TCP floor.
async fn tcp_echo(rounds: usize) -> Vec<Duration> {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let echo = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = vec![0u8; 4096];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let data = vec![0x47u8; 4096];
    let mut back = vec![0u8; 4096];
    let mut lat = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        c.write_all(&data).await.expect("write");
        c.read_exact(&mut back).await.expect("read");
        lat.push(t.elapsed());
    }
    drop(c);
    let _ = echo.await;
    lat.sort();
    lat
}

struct Phase {
    name: &'static str,
    held: usize,
    rss: f64,
    fds: usize,
    p50: f64,
    p95: f64,
    failed: usize,
}

impl Phase {
    /// The phase's figures: connections held, RSS and fds now, and the round trips' latencies.
    fn now(name: &'static str, stats: &ConnectionStats, lat: &[Duration], failed: usize) -> Self {
        Phase {
            name,
            held: stats.open(),
            rss: rss_mib(),
            fds: open_fds(),
            p50: percentile(lat, 0.5),
            p95: percentile(lat, 0.95),
            failed,
        }
    }
}

fn main() {
    let held_target = env_usize("TRICKLE_ABUSE_CONNECTIONS", 2000);
    let waiters = env_usize("TRICKLE_ABUSE_WAITERS", 500);
    let rounds = env_usize("TRICKLE_ABUSE_ROUNDS", 400);
    let soft = raise_fd_limit(u64::MAX).expect("raise RLIMIT_NOFILE");
    let need = 2 * (held_target + waiters) as u64 + 512;
    assert!(
        soft >= need,
        "needs {need} file descriptors (client and server ends); RLIMIT_NOFILE allows {soft}"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "trickle abuse benchmark: loopback, {} ({cores} cores), tokio multi-thread runtime, \
             {rounds} round trips (POST 4 KiB + GET, keep-alive) per phase",
            cpu_name()
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        // The cap: the abusive connections plus 2 (the normal client and one spare).
        let cap = held_target + waiters + 2;
        let config = ServerConfig {
            max_connections: cap,
            header_read_timeout: Duration::from_secs(300),
            max_waiting_subscribers: waiters + 16,
            max_waiting_subscribers_per_channel: waiters + 16,
            ..ServerConfig::development()
        };
        let h = serve(listener, TrickleServer::new(config)).await.expect("serve");
        h.server().create_channel("rt", "video/MP2T").expect("create");
        h.server().create_channel("wait", "video/MP2T").expect("create");
        let stats = h.connections().clone();
        let client = reqwest::Client::new();
        let mut seq = 0i64;
        // Warm-up.
        let (_, failed) = round_trips(&h, &client, seq, 50).await;
        assert_eq!(failed, 0);
        seq += 50;
        let tcp = tcp_echo(rounds).await;

        let mut phases = Vec::new();
        let (lat, failed) = round_trips(&h, &client, seq, rounds).await;
        seq += rounds as i64;
        phases.push(Phase::now("unloaded", &stats, &lat, failed));

        // Abuse: half-open connections and waiting GETs, all held.
        let mut held = Vec::with_capacity(held_target + waiters);
        for i in 0..held_target {
            let mut s = TcpStream::connect(h.local_addr()).await.expect("connect");
            if i % 2 == 0 {
                s.write_all(b"GET /rt/0 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .await
                    .expect("write");
            }
            held.push(s);
        }
        for _ in 0..waiters {
            let mut s = TcpStream::connect(h.local_addr()).await.expect("connect");
            s.write_all(b"GET /wait/0 HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            held.push(s);
        }
        let t = Instant::now();
        while (h.server().waiting_subscribers() < waiters || stats.open() < held_target + waiters)
            && t.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (lat, failed) = round_trips(&h, &client, seq, rounds).await;
        seq += rounds as i64;
        phases.push(Phase::now("half-open + waiting GETs held", &stats, &lat, failed));

        // And a connect flood over the cap.
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let mut flood = Vec::new();
        for _ in 0..4 {
            let (stop, refused, addr) = (stop.clone(), refused.clone(), h.local_addr());
            flood.push(tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(addr).await else {
                        continue;
                    };
                    let _ = s.write_all(b"GET /rt/next HTTP/1.1\r\nHost: x\r\n\r\n").await;
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await
                        && buf[..n].starts_with(b"HTTP/1.1 503")
                    {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let refused_before = stats.refused();
        let t = Instant::now();
        let (lat, failed) = round_trips(&h, &client, seq, rounds).await;
        let flood_secs = t.elapsed().as_secs_f64();
        phases.push(Phase::now("... + connect flood over the cap", &stats, &lat, failed));
        stop.store(true, Ordering::Relaxed);
        for f in flood {
            let _ = f.await;
        }
        let refusals = stats.refused() - refused_before;

        println!(
            "| {:<34} | {:>10} | {:>8} | {:>6} | {:>11} | {:>11} | {:>9} | {:>9} | {:>6} |",
            "phase", "conns held", "RSS MiB", "fds", "p50 µs", "p95 µs", "p50 ratio", "p95 ratio",
            "failed"
        );
        println!(
            "|{:-<36}|{:-<12}|{:-<10}|{:-<8}|{:-<13}|{:-<13}|{:-<11}|{:-<11}|{:-<8}|",
            "", "", "", "", "", "", "", "", ""
        );
        let (b50, b95) = (phases[0].p50, phases[0].p95);
        for ph in &phases {
            println!(
                "| {:<34} | {:>10} | {:>8.1} | {:>6} | {:>11.1} | {:>11.1} | {:>9.2} | {:>9.2} | {:>6} |",
                ph.name,
                ph.held,
                ph.rss,
                ph.fds,
                ph.p50,
                ph.p95,
                ph.p50 / b50,
                ph.p95 / b95,
                ph.failed
            );
        }
        println!(
            "| {:<34} | {:>10} | {:>8} | {:>6} | {:>11.1} | {:>11.1} | {:>9} | {:>9} | {:>6} |",
            "plain TCP echo 4 KiB (floor)",
            1,
            "",
            "",
            percentile(&tcp, 0.5),
            percentile(&tcp, 0.95),
            "",
            "",
            ""
        );
        println!(
            "connection cap {cap}: {refusals} connections answered 503 during the flood \
             ({:.0}/s; {} seen by the flood clients), waiting GETs {}",
            refusals as f64 / flood_secs,
            refused.load(Ordering::Relaxed),
            h.server().waiting_subscribers()
        );
        drop(held);
        h.shutdown().await;
    });
}
