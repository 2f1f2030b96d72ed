// SPDX-License-Identifier: MPL-2.0
//! The trickle server under abuse (issue 16): the connection cap, the request-head timeout,
//! the waiting-subscriber caps and the idle-body timeouts, on a real server on 127.0.0.1:0.
//!
//! The tests measure process-wide figures (open fds, RSS), so they run one at a time (`SERIAL`).

mod protocol_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gsttrickle::protocol::server::{ServerConfig, ServerHandle, raise_fd_limit};
use protocol_common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Lifts the soft fd limit to the hard limit (`ulimit -n` may be 1024); these tests hold
/// about 2000 sockets (client and server ends live in this process).
fn raise_fds() {
    let soft = raise_fd_limit(u64::MAX).expect("raise RLIMIT_NOFILE");
    assert!(
        soft >= 2600,
        "these tests need about 2600 file descriptors; the hard limit allows {soft}"
    );
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Polls `cond` every 2 ms until it holds, at most `within`.
async fn wait_within(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn p(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `rounds` publish-then-subscribe round trips of a 4 KiB segment on `channel` from seq
/// `first`; checks the bytes, returns the sorted latencies.
async fn round_trips(
    h: &ServerHandle,
    client: &reqwest::Client,
    channel: &str,
    first: i64,
    rounds: i64,
) -> Vec<Duration> {
    let mut lat = Vec::new();
    for seq in first..first + rounds {
        let body: Vec<u8> = (0..4096).map(|i| (i as i64 * 7 + seq) as u8).collect();
        let t = Instant::now();
        let r = bounded(
            "POST",
            client
                .post(h.url(&format!("{channel}/{seq}")))
                .header("Content-Type", "video/MP2T")
                .body(body.clone())
                .send(),
        )
        .await
        .expect("POST");
        assert_eq!(r.status(), 200);
        let r = bounded("GET", client.get(h.url(&format!("{channel}/{seq}"))).send())
            .await
            .expect("GET");
        assert_eq!(r.status(), 200);
        let got = bounded("GET body", r.bytes()).await.expect("body");
        lat.push(t.elapsed());
        assert_eq!(&got[..], &body[..], "segment {seq} bytes");
    }
    lat.sort();
    lat
}

/// Reads a raw connection until the server closes it; sends what was read.
fn spawn_read_to_close(s: TcpStream, tx: mpsc::UnboundedSender<(usize, Vec<u8>)>, id: usize) {
    tokio::spawn(async move {
        let mut s = s;
        let got = read_to_close(&mut s, Vec::new()).await;
        drop(s);
        let _ = tx.send((id, got));
    });
}

fn status_of(resp: &[u8]) -> Option<u16> {
    let line = resp.split(|b| *b == b'\r').next()?;
    std::str::from_utf8(line)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

// ---- request-head timeout -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_leave_normal_traffic_working_and_time_out() {
    let _serial = SERIAL.lock().await;
    raise_fds();
    const HALF_OPEN: usize = 1000;
    let timeout = Duration::from_secs(3);
    let h = start(ServerConfig {
        max_connections: HALF_OPEN + 100,
        header_read_timeout: timeout,
        ..ServerConfig::development()
    })
    .await;
    h.server().create_channel("rt", "video/MP2T").unwrap();
    let client = http();
    // Warm up (connection, allocations), then the unloaded figure.
    round_trips(&h, &client, "rt", 0, 5).await;
    let unloaded = round_trips(&h, &client, "rt", 5, 40).await;

    // Half of them send part of a request head, half send nothing.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opened = Instant::now();
    for i in 0..HALF_OPEN {
        let head: &[u8] = if i % 2 == 0 {
            b"GET /rt/0 HTTP/1.1\r\nHost: x\r\nX-Slow: "
        } else {
            b""
        };
        let s = raw(h.local_addr(), head).await;
        spawn_read_to_close(s, tx.clone(), i);
    }
    drop(tx);
    let stats = h.connections().clone();
    wait_within("the half-open connections to be accepted", BOUND, || {
        stats.open() >= HALF_OPEN
    })
    .await;
    let loaded = round_trips(&h, &client, "rt", 45, 40).await;
    let held = stats.open();
    if opened.elapsed() < timeout {
        // No timer could have fired yet: every half-open connection was held throughout.
        assert_eq!(stats.header_timeouts(), 0);
        assert!(held >= HALF_OPEN, "{held} open");
    }
    let (u50, l50) = (p(&unloaded, 0.5), p(&loaded, 0.5));
    println!(
        "round trip (POST 4 KiB + GET) p50/p95: unloaded {:?}/{:?}, with {HALF_OPEN} half-open \
         connections {:?}/{:?} (p50 ratio {:.2}); {held} connections open",
        u50,
        p(&unloaded, 0.95),
        l50,
        p(&loaded, 0.95),
        l50.as_secs_f64() / u50.as_secs_f64()
    );

    // Every half-open connection is closed by the head timeout: a partial head gets a 408,
    // a silent connection is closed without an answer.
    let mut closed = 0;
    while closed < HALF_OPEN {
        let (id, got) = tokio::time::timeout(timeout + BOUND, rx.recv())
            .await
            .expect("half-open connections still open long after the header timeout")
            .expect("reader tasks");
        if id % 2 == 0 {
            assert_eq!(
                status_of(&got),
                Some(408),
                "{:?}",
                String::from_utf8_lossy(&got)
            );
            let text = String::from_utf8_lossy(&got);
            assert!(text.contains("Connection: close"), "{text}");
            assert!(text.contains("request head did not arrive"), "{text}");
        } else {
            assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        }
        closed += 1;
    }
    assert!(
        opened.elapsed() >= timeout,
        "closed before the header timeout"
    );
    assert!(stats.header_timeouts() >= HALF_OPEN as u64);
    // The keep-alive connection of `client` may be closed too (idle for the timeout).
    wait_within("the server to drop them", BOUND, || stats.open() <= 2).await;
    // Still serving.
    round_trips(&h, &http(), "rt", 85, 2).await;
}

// ---- waiting subscribers --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_subscriber_caps_answer_503_and_admitted_waiters_get_the_data() {
    let _serial = SERIAL.lock().await;
    raise_fds();
    const PER_CHANNEL: usize = 400;
    const TOTAL: usize = 600;
    const PER_BATCH: usize = 500;
    let h = start(ServerConfig {
        max_connections: 3000,
        max_waiting_subscribers_per_channel: PER_CHANNEL,
        max_waiting_subscribers: TOTAL,
        ..ServerConfig::development()
    })
    .await;
    let server = h.server().clone();
    for ch in ["a", "b"] {
        server.create_channel(ch, "video/MP2T").unwrap();
    }
    // Warm up, then the baseline.
    assert_eq!(post(&h.url("warm/0"), b"x").await.status(), 200);
    assert_eq!(get(&h.url("warm/0")).await.status(), 200);
    let base_fds = open_fds();
    let base_rss = rss_kib();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut refused = Vec::new();
    let mut done = Vec::new();
    // Channel a: 500 GETs on seq 0 (nothing written yet): 400 wait, 100 are refused by the
    // per-channel cap.
    for i in 0..PER_BATCH {
        let s = raw(
            h.local_addr(),
            b"GET /a/0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        spawn_read_to_close(s, tx.clone(), i);
    }
    while refused.len() < PER_BATCH - PER_CHANNEL {
        let (id, got) = bounded("503s on a", rx.recv()).await.unwrap();
        assert_eq!(
            status_of(&got),
            Some(503),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        refused.push((id, got));
    }
    wait_until("400 waiting on a", || {
        server.channel_info("a").unwrap().waiting_subscribers == PER_CHANNEL
    })
    .await;
    let text = String::from_utf8_lossy(&refused[0].1).to_string();
    assert!(
        text.contains("too many subscribers waiting on this channel")
            && text.contains("limit of 400 per channel"),
        "{text}"
    );
    // Channel b: 500 more; only 200 fit under the total cap.
    for i in PER_BATCH..2 * PER_BATCH {
        let s = raw(
            h.local_addr(),
            b"GET /b/0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        spawn_read_to_close(s, tx.clone(), i);
    }
    drop(tx);
    while refused.len() < 2 * PER_BATCH - TOTAL {
        let (id, got) = bounded("503s on b", rx.recv()).await.unwrap();
        assert!(id >= PER_BATCH, "a waiter on a was answered early");
        assert_eq!(
            status_of(&got),
            Some(503),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        refused.push((id, got));
    }
    wait_until("600 waiting in all", || {
        server.waiting_subscribers() == TOTAL
    })
    .await;
    assert_eq!(
        server.channel_info("b").unwrap().waiting_subscribers,
        TOTAL - PER_CHANNEL
    );
    let text = String::from_utf8_lossy(&refused.last().unwrap().1).to_string();
    assert!(text.contains("limit of 600 is reached"), "{text}");

    // Bounded: each admitted waiter holds two sockets here (client and server end); refused
    // ones hold none once answered.
    let fd_bound = base_fds + 2 * TOTAL + 64;
    wait_within("refused connections to be closed", BOUND, || {
        open_fds() <= fd_bound
    })
    .await;
    let fds = open_fds();
    let rss = rss_kib();
    let rss_delta = rss.saturating_sub(base_rss);
    // Generous (about 10 KiB are measured): 32 KiB per GET sent, client and server side
    // together, 1000 GETs.
    let rss_bound = 32 * 2 * PER_BATCH as u64;
    println!(
        "{} waiting, {} refused: fds {base_fds} -> {fds} (bound {fd_bound}), RSS {base_rss} KiB \
         -> {rss} KiB (+{rss_delta} KiB, bound +{rss_bound} KiB)",
        server.waiting_subscribers(),
        refused.len()
    );
    assert!(rss_delta <= rss_bound, "RSS grew by {rss_delta} KiB");

    // The publisher writes: every admitted waiter gets its segment.
    assert_eq!(post(&h.url("a/0"), b"payload-a").await.status(), 200);
    assert_eq!(post(&h.url("b/0"), b"payload-b").await.status(), 200);
    while done.len() < TOTAL {
        let (id, got) = bounded("admitted waiters", rx.recv()).await.unwrap();
        let text = String::from_utf8_lossy(&got).to_string();
        assert_eq!(status_of(&got), Some(200), "{text}");
        let want = if id < PER_BATCH {
            "payload-a"
        } else {
            "payload-b"
        };
        assert!(text.contains(want) && text.ends_with("0\r\n\r\n"), "{text}");
        done.push(id);
    }
    assert_eq!(server.waiting_subscribers(), 0);
    wait_within("the sockets to be closed", BOUND, || {
        open_fds() <= base_fds + 16
    })
    .await;
}

// ---- idle-body timeouts ---------------------------------------------------------------------

fn short_idle() -> ServerConfig {
    ServerConfig {
        body_idle_timeout: Duration::from_millis(300),
        ..ServerConfig::development()
    }
}

#[tokio::test]
async fn publisher_disconnect_mid_body_ends_the_segment_cleanly() {
    let _serial = SERIAL.lock().await;
    let h = start(short_idle()).await;
    h.server().create_channel("cut", "video/MP2T").unwrap();
    let mut s = raw(h.local_addr(), &chunked_post("/cut/0", "")).await;
    s.write_all(&chunk(b"part-one")).await.unwrap();
    let r = get(&h.url("cut/0")).await;
    assert_eq!(r.status(), 200);
    let reader = tokio::spawn(r.bytes());
    // Abrupt disconnect: a body read error (500), the segment stays open (`docs/trickle.md`,
    // "Publishing a segment", step 6) until the idle-body timeout has passed with no other POST
    // attached.
    drop(s);
    let body = bounded("reader", reader)
        .await
        .unwrap()
        .expect("a clean end");
    assert_eq!(&body[..], b"part-one");
    let info = h.server().channel_info("cut").unwrap();
    assert!(info.segments.iter().any(|s| s.seq == 0 && s.closed));
    // The next segment works.
    assert_eq!(post(&h.url("cut/1"), b"ok").await.status(), 200);
    assert_eq!(
        &get(&h.url("cut/1")).await.bytes().await.unwrap()[..],
        b"ok"
    );
}

#[tokio::test]
async fn stalled_post_body_is_answered_408_while_preconnects_keep_waiting() {
    let _serial = SERIAL.lock().await;
    let h = start(short_idle()).await;
    h.server().create_channel("idle", "video/MP2T").unwrap();
    // A preconnected POST (headers only) and a GET for the next seq: both wait legitimately,
    // far longer than the idle-body timeout.
    let mut publisher = raw(h.local_addr(), &chunked_post("/idle/0", "")).await;
    let sub = spawn_get(h.url("idle/0"));
    wait_attached(h.server(), "idle", 0, 1, 1).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(1000), read_head(&mut publisher))
            .await
            .is_err(),
        "the preconnected POST was answered before its body started"
    );
    assert!(!sub.is_finished(), "the waiting GET was answered");
    // The body starts, then stalls.
    publisher.write_all(&chunk(b"abc")).await.unwrap();
    let r = bounded("subscriber head", sub).await.unwrap();
    assert_eq!(r.status(), 200);
    let reader = tokio::spawn(r.bytes());
    let t = Instant::now();
    let head = bounded("408", read_head(&mut publisher)).await;
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(head.status, 408);
    assert_eq!(head.header("connection"), Some("close"));
    let rest = bounded("close", read_to_close(&mut publisher, head.rest)).await;
    assert!(
        String::from_utf8_lossy(&rest).contains("no body data for 300 ms"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    // The subscriber gets the bytes so far and a clean end.
    let body = bounded("reader", reader)
        .await
        .unwrap()
        .expect("a clean end");
    assert_eq!(&body[..], b"abc");
    // The next segment works.
    assert_eq!(post(&h.url("idle/1"), b"next").await.status(), 200);
    assert_eq!(
        &get(&h.url("idle/1")).await.bytes().await.unwrap()[..],
        b"next"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_is_dropped_and_others_are_unaffected() {
    let _serial = SERIAL.lock().await;
    let h = start(short_idle()).await;
    h.server().create_channel("st", "video/MP2T").unwrap();
    let stats = h.connections().clone();
    // A subscriber that never reads, with a small receive window.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stalled = sock.connect(h.local_addr()).await.unwrap();
    stalled
        .write_all(b"GET /st/0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    wait_attached(h.server(), "st", 0, 1, 0).await;
    // A subscriber that reads everything.
    let good = spawn_get(h.url("st/0"));
    wait_attached(h.server(), "st", 0, 2, 0).await;
    let mut publisher = raw(h.local_addr(), &chunked_post("/st/0", "")).await;
    let block = vec![0x47u8; 64 * 1024];
    let server = h.server().clone();
    let readers = || {
        server
            .channel_info("st")
            .and_then(|i| i.segments.iter().find(|s| s.seq == 0).map(|s| s.readers))
            .unwrap_or(0)
    };
    publisher.write_all(&chunk(&block)).await.unwrap();
    let good = bounded("good subscriber head", good).await.unwrap();
    let good = tokio::spawn(good.bytes());
    // Publish until the stalled one is dropped (socket buffers full + 300 ms), at most 48 MiB.
    let mut sent = 1usize;
    let t = Instant::now();
    while readers() > 1 && sent < 768 && t.elapsed() < BOUND {
        publisher.write_all(&chunk(&block)).await.unwrap();
        sent += 1;
        if sent.is_multiple_of(16) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    wait_until("the stalled subscriber to be dropped", || readers() <= 1).await;
    assert!(stats.write_timeouts() >= 1);
    publisher.write_all(b"0\r\n\r\n").await.unwrap();
    assert_eq!(
        bounded("publish", read_head(&mut publisher)).await.status,
        200
    );
    let body = bounded("good subscriber", good).await.unwrap().unwrap();
    assert_eq!(body.len(), sent * block.len());
    println!(
        "stalled subscriber dropped after {} KiB published",
        sent * block.len() / 1024
    );
    // Its connection is closed (after whatever the kernel had buffered).
    bounded(
        "stalled socket closed",
        read_to_close(&mut stalled, Vec::new()),
    )
    .await;
}

// ---- connection cap -------------------------------------------------------------------------

async fn refused_answer(addr: SocketAddr) -> String {
    let mut s = raw(addr, b"GET /cap/next HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let got = bounded("refusal", read_to_close(&mut s, Vec::new())).await;
    String::from_utf8_lossy(&got).to_string()
}

#[tokio::test]
async fn connection_cap_answers_503_and_frees_slots() {
    let _serial = SERIAL.lock().await;
    raise_fds();
    const CAP: usize = 4;
    let h = start(ServerConfig {
        max_connections: CAP,
        ..ServerConfig::development()
    })
    .await;
    let stats = h.connections().clone();
    let base_fds = open_fds();
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(raw(h.local_addr(), b"").await);
    }
    wait_until("the held connections", || stats.open() == CAP).await;
    let text = refused_answer(h.local_addr()).await;
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{text}"
    );
    assert!(text.contains("Connection: close\r\n"), "{text}");
    assert!(
        text.contains("too many connections (the server's limit of 4 open connections"),
        "{text}"
    );
    // A burst over the cap: every one refused, none kept open.
    for _ in 0..200 {
        let text = refused_answer(h.local_addr()).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    }
    assert_eq!(stats.refused(), 201);
    wait_within("refused sockets to be closed", BOUND, || {
        open_fds() <= base_fds + 2 * CAP + 8
    })
    .await;
    // A slot frees: requests are served again.
    drop(held.pop());
    wait_until("a free slot", || stats.open() < CAP).await;
    assert_eq!(post(&h.url("cap/0"), b"x").await.status(), 200);
}
