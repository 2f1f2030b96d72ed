// SPDX-License-Identifier: MPL-2.0
//! The daemon's port is served by the trickle library's bounded serving code: the connection
//! cap, the request-head timeout and the idle-body timeout, set through the
//! `RIVULET_TRICKLE_*` environment variables of a real `rivulet serve` process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;

/// Failure bound of every wait.
const BOUND: Duration = Duration::from_secs(20);

async fn connect(addr: SocketAddr, send: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(send).await.expect("write");
    s
}

/// Everything the daemon sends until it closes the connection.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(BOUND, read)
        .await
        .expect("the daemon did not close the connection");
    String::from_utf8_lossy(&got).to_string()
}

#[tokio::test]
async fn daemon_port_applies_the_connection_cap_and_timeouts_from_env() {
    const CAP: usize = 4;
    let head_timeout = Duration::from_millis(1500);
    let d = common::spawn_daemon(
        "trickle-limits",
        &[
            ("RIVULET_TRICKLE_MAX_CONNECTIONS", "4"),
            ("RIVULET_TRICKLE_HEADER_READ_TIMEOUT_MS", "1500"),
            ("RIVULET_TRICKLE_BODY_IDLE_TIMEOUT_MS", "400"),
            ("RIVULET_ISOLATION", "none"),
        ],
    );
    let addr: SocketAddr = d
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("daemon address");

    // Fill the cap before any other traffic: three silent connections and one with part of a
    // request head. The daemon accepts in order, so the next one is over the cap.
    let opened = Instant::now();
    let mut held = Vec::new();
    for i in 0..CAP {
        let send: &[u8] = if i == 0 {
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
        } else {
            b""
        };
        held.push(connect(addr, send).await);
    }
    let mut over = connect(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let text = read_to_close(&mut over).await;
    assert!(
        text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{text}"
    );
    assert!(text.contains("Connection: close\r\n"), "{text}");
    assert!(
        text.contains("too many connections (the server's limit of 4 open connections"),
        "{text}"
    );

    // The head timeout closes the held ones: 408 for the partial head, silence otherwise.
    for (i, s) in held.iter_mut().enumerate() {
        let text = read_to_close(s).await;
        if i == 0 {
            assert!(
                text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
                "{text}"
            );
            assert!(
                text.contains("the request head did not arrive within 1500 ms"),
                "{text}"
            );
        } else {
            assert_eq!(text, "", "a silent connection got an answer");
        }
    }
    assert!(opened.elapsed() >= head_timeout, "{:?}", opened.elapsed());

    // Slots are free again: the API and the embedded trickle server answer.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let t = Instant::now();
    loop {
        let r = http.get(format!("{}/health", d.base)).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(t.elapsed() < BOUND, "no free connection slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common::create_channel(&http, &d.base, "lim", "video/MP2T").await;

    // A trickle POST whose body starts and then stalls: 408 after the idle-body timeout, and
    // the subscriber gets the bytes so far and a clean end.
    let mut publisher = connect(
        addr,
        b"POST /trickle/lim/0 HTTP/1.1\r\nHost: x\r\nContent-Type: video/MP2T\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await;
    let sub = http
        .get(format!("{}/trickle/lim/0", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(sub.status(), 200);
    let text = read_to_close(&mut publisher).await;
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text}"
    );
    assert!(text.contains("no body data for 400 ms"), "{text}");
    let body = tokio::time::timeout(BOUND, sub.bytes())
        .await
        .expect("subscriber end")
        .expect("a clean end");
    assert_eq!(&body[..], b"hello");
}
