// SPDX-License-Identifier: MPL-2.0
//! Trickle protocol benchmark: `cargo bench -p gst-plugin-trickle --bench trickle_protocol`.
//!
//! Every figure is printed beside a baseline measured in the same run: the same bytes through
//! plain loopback TCP connections (tokio `TcpStream`), with the same chunk sizes and the same
//! task structure. `TRICKLE_BENCH_SCALE` (default 1.0) scales the data volumes;
//! `TRICKLE_BENCH_ROUNDS` (default 5) sets how many rounds each figure is the median of.
//!
//! - time to first byte: a publisher writes a 1 KiB chunk into a segment that a subscriber is
//!   already waiting on (both preconnected); time until the subscriber holds it (p50/p99);
//! - one-channel throughput: one publisher, one subscriber, 8 MiB segments, 64 KiB chunks;
//! - fan-out: 100 channels with 2 subscribers each, aggregate received MB/s;
//! - memory per idle channel: RSS delta (`/proc/self/statm`) over 1000 channels, against the
//!   RSS delta of idle loopback TCP connection pairs.

use std::time::{Duration, Instant};

use bytes::Bytes;
use gsttrickle::protocol::client::{
    Publisher, PublisherConfig, SegmentOutcome, Subscriber, SubscriberConfig,
};
use gsttrickle::protocol::server::{ServerConfig, ServerHandle, TrickleServer, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const CHUNK: usize = 64 * 1024;

fn scale() -> f64 {
    std::env::var("TRICKLE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0)
}

fn rounds() -> usize {
    std::env::var("TRICKLE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|r| *r > 0)
        .unwrap_or(5)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn scaled(n: usize) -> usize {
    ((n as f64 * scale()) as usize).max(1)
}

async fn start_server() -> ServerHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = ServerConfig {
        max_channels: 100_000,
        ..ServerConfig::default()
    };
    serve(listener, TrickleServer::new(config))
        .await
        .expect("serve")
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let a = a.expect("connect");
    let b = b.expect("accept").0;
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn sub_config(start_seq: i64) -> SubscriberConfig {
    SubscriberConfig {
        start_seq,
        ..SubscriberConfig::default()
    }
}

async fn wait_attached(server: &TrickleServer, channel: &str, seq: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = server.channel_info(channel).is_some_and(|i| {
            i.segments
                .iter()
                .any(|s| s.seq == seq && s.readers >= 1 && s.writers >= 1)
        });
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "{channel}/{seq} never attached");
        tokio::task::yield_now().await;
    }
}

// ---- time to first byte -----------------------------------------------------------------

async fn ttfb_trickle(n: usize) -> Vec<Duration> {
    let h = start_server().await;
    h.server()
        .create_channel("ttfb", "video/MP2T")
        .expect("create");
    let url = h.url("ttfb");
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let mut sub = Subscriber::new(&url, sub_config(0)).expect("subscriber");
    let reader = tokio::spawn(async move {
        while let Ok(Some(mut seg)) = sub.next_segment().await {
            let _ = seg.chunk().await;
            let _ = tx.send(Instant::now());
            while let Ok(Some(_)) = seg.chunk().await {}
        }
    });
    let mut publisher = Publisher::new(&url, PublisherConfig::default()).expect("publisher");
    let data = Bytes::from(vec![0x47u8; 1024]);
    let mut out = Vec::with_capacity(n);
    for seq in 0..n as i64 {
        let mut w = publisher.begin_segment().await.expect("begin");
        wait_attached(h.server(), "ttfb", seq).await;
        let t0 = Instant::now();
        w.write(data.clone()).await.expect("write");
        let t1 = rx.recv().await.expect("subscriber ended");
        out.push(t1 - t0);
        assert_eq!(w.finish().await.expect("finish"), SegmentOutcome::Done);
    }
    reader.abort();
    drop(publisher);
    h.shutdown().await;
    out
}

async fn ttfb_tcp(n: usize) -> Vec<Duration> {
    let (mut a, mut b) = tcp_pair().await;
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1024];
        while b.read_exact(&mut buf).await.is_ok() {
            let _ = tx.send(Instant::now());
        }
    });
    let data = vec![0x47u8; 1024];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        a.write_all(&data).await.expect("write");
        let t1 = rx.recv().await.expect("reader ended");
        out.push(t1 - t0);
    }
    drop(a);
    let _ = reader.await;
    out
}

// ---- throughput -------------------------------------------------------------------------

/// Publishes `segments` segments of `seg_bytes`; returns when all are done.
async fn publish(mut publisher: Publisher, segments: usize, seg_bytes: usize) {
    let chunk = Bytes::from(vec![0x47u8; CHUNK]);
    for _ in 0..segments {
        let mut w = publisher.begin_segment().await.expect("begin");
        let mut left = seg_bytes;
        while left > 0 {
            let n = left.min(CHUNK);
            w.write(chunk.slice(..n)).await.expect("write");
            left -= n;
        }
        assert_eq!(w.finish().await.expect("finish"), SegmentOutcome::Done);
    }
}

/// Reads `total` bytes from a channel starting at seq 0.
async fn subscribe(url: String, total: usize) -> usize {
    let mut sub = Subscriber::new(&url, sub_config(0)).expect("subscriber");
    let mut got = 0;
    while got < total {
        let Some(mut seg) = sub.next_segment().await.expect("next_segment") else {
            break;
        };
        while let Some(c) = seg.chunk().await.expect("chunk") {
            got += c.len();
        }
    }
    got
}

/// Aggregate MB/s of `channels` channels with `subs` subscribers each.
async fn throughput_trickle(
    channels: usize,
    subs: usize,
    segments: usize,
    seg_bytes: usize,
) -> f64 {
    let h = start_server().await;
    for c in 0..channels {
        h.server()
            .create_channel(&format!("tp{c}"), "video/MP2T")
            .expect("create");
    }
    let total = segments * seg_bytes;
    let mut readers = Vec::new();
    for c in 0..channels {
        for _ in 0..subs {
            readers.push(tokio::spawn(subscribe(h.url(&format!("tp{c}")), total)));
        }
    }
    // Let every subscriber park its first GET before the clock starts.
    for c in 0..channels {
        let name = format!("tp{c}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h
            .server()
            .channel_info(&name)
            .is_some_and(|i| i.segments.iter().any(|s| s.seq == 0 && s.readers >= subs))
        {
            assert!(Instant::now() < deadline, "subscribers never attached");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // Clients are made before the clock starts (building one loads the TLS root store), as
    // the baseline's connections are.
    let publishers: Vec<Publisher> = (0..channels)
        .map(|c| {
            Publisher::new(&h.url(&format!("tp{c}")), PublisherConfig::default())
                .expect("publisher")
        })
        .collect();
    let t0 = Instant::now();
    let writers: Vec<_> = publishers
        .into_iter()
        .map(|p| tokio::spawn(publish(p, segments, seg_bytes)))
        .collect();
    let mut received = 0usize;
    for r in readers {
        received += r.await.expect("reader");
    }
    let secs = t0.elapsed().as_secs_f64();
    for w in writers {
        w.await.expect("writer");
    }
    h.shutdown().await;
    assert_eq!(received, total * channels * subs, "bytes lost");
    received as f64 / secs / 1e6
}

async fn throughput_tcp(channels: usize, subs: usize, total: usize) -> f64 {
    // One connection per (channel, subscriber), each fed by its own writer task, like the
    // server relays every chunk to each subscriber independently.
    let mut conns = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..channels * subs {
        let (a, mut b) = tcp_pair().await;
        conns.push(a);
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0usize;
            while got < total {
                match b.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        }));
    }
    let t0 = Instant::now();
    let writers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let chunk = vec![0x47u8; CHUNK];
                let mut left = total;
                while left > 0 {
                    let n = left.min(CHUNK);
                    c.write_all(&chunk[..n]).await.expect("write");
                    left -= n;
                }
            })
        })
        .collect();
    let mut received = 0usize;
    for r in readers {
        received += r.await.expect("reader");
    }
    let secs = t0.elapsed().as_secs_f64();
    for w in writers {
        w.await.expect("writer");
    }
    assert_eq!(received, total * channels * subs, "bytes lost");
    received as f64 / secs / 1e6
}

// ---- memory -----------------------------------------------------------------------------

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

async fn memory_trickle(n: usize) -> Option<f64> {
    let server = TrickleServer::new(ServerConfig {
        max_channels: n + 10,
        ..ServerConfig::default()
    });
    let before = rss_bytes()?;
    for i in 0..n {
        server
            .create_channel(&format!("idle-channel-{i:08}"), "video/MP2T")
            .expect("create");
    }
    let after = rss_bytes()?;
    assert_eq!(server.channel_names().len(), n);
    server.close_all();
    Some(after.saturating_sub(before) as f64 / n as f64)
}

async fn memory_tcp(n: usize) -> Option<f64> {
    let before = rss_bytes()?;
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        pairs.push(tcp_pair().await);
    }
    let after = rss_bytes()?;
    drop(pairs);
    Some(after.saturating_sub(before) as f64 / n as f64)
}

// ---- table ------------------------------------------------------------------------------

fn row(metric: &str, trickle: f64, baseline: f64, unit: &str, higher_is_better: bool) {
    let ratio = if baseline > 0.0 {
        trickle / baseline
    } else {
        f64::NAN
    };
    let note = if higher_is_better {
        "trickle/TCP (higher = better)"
    } else {
        "trickle/TCP (lower = better)"
    };
    println!(
        "| {metric:<44} | {trickle:>12.1} {unit:<5} | {baseline:>12.1} {unit:<5} | {ratio:>7.2} | {note}"
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    rt.block_on(async {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "trickle protocol benchmark: loopback, tokio multi-thread runtime, {cores} CPU cores, scale {}, median of {} rounds",
            scale(),
            rounds()
        );
        println!(
            "| {:<44} | {:>18} | {:>18} | {:>7} |",
            "metric", "trickle", "plain TCP baseline", "ratio"
        );
        println!("|{:-<46}|{:-<20}|{:-<20}|{:-<9}|", "", "", "", "");

        // Memory first, before the other runs grow the heap.
        let n_mem = scaled(1000);
        let mem_t = memory_trickle(n_mem).await;
        let mem_b = memory_tcp(n_mem).await;
        match (mem_t, mem_b) {
            (Some(t), Some(b)) => row(
                &format!("memory per idle channel / conn ({n_mem})"),
                t / 1024.0,
                b / 1024.0,
                "KiB",
                false,
            ),
            _ => println!("| memory: /proc/self/statm not readable, skipped"),
        }

        // Each figure: the median of `rounds` rounds, trickle and baseline interleaved so that
        // background load affects both alike.
        let rounds = rounds();
        let n = scaled(1000);
        let (mut t50, mut t99, mut b50, mut b99) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            let mut t = ttfb_trickle(n).await;
            let mut b = ttfb_tcp(n).await;
            t.sort();
            b.sort();
            t50.push(us(percentile(&t, 0.5)));
            t99.push(us(percentile(&t, 0.99)));
            b50.push(us(percentile(&b, 0.5)));
            b99.push(us(percentile(&b, 0.99)));
        }
        row(
            &format!("time to first byte p50 ({n} segments)"),
            median(t50),
            median(b50),
            "us",
            false,
        );
        row(
            &format!("time to first byte p99 ({n} segments)"),
            median(t99),
            median(b99),
            "us",
            false,
        );

        let segs = scaled(32);
        let seg_bytes = 8 * 1024 * 1024;
        let (mut t, mut b) = (vec![], vec![]);
        for _ in 0..rounds {
            t.push(throughput_trickle(1, 1, segs, seg_bytes).await);
            b.push(throughput_tcp(1, 1, segs * seg_bytes).await);
        }
        row(
            &format!("1 channel, 1 subscriber ({} MiB)", segs * 8),
            median(t),
            median(b),
            "MB/s",
            true,
        );

        let segs = scaled(4);
        let seg_bytes = 1024 * 1024;
        let (mut t, mut b) = (vec![], vec![]);
        for _ in 0..rounds {
            t.push(throughput_trickle(100, 2, segs, seg_bytes).await);
            b.push(throughput_tcp(100, 2, segs * seg_bytes).await);
        }
        row(
            &format!("100 channels x 2 subscribers ({} MiB each)", segs),
            median(t),
            median(b),
            "MB/s",
            true,
        );

        // Not a protocol figure, but worth knowing: each client builds its own HTTP client.
        let t = Instant::now();
        for _ in 0..20 {
            drop(Subscriber::new("http://127.0.0.1:9/x", sub_config(0)).expect("subscriber"));
        }
        println!(
            "(for reference: building one Subscriber/Publisher, i.e. its reqwest client, takes {:.2} ms)",
            t.elapsed().as_secs_f64() * 1000.0 / 20.0
        );
    });
    println!("total time {:.1} s", started.elapsed().as_secs_f64());
}
