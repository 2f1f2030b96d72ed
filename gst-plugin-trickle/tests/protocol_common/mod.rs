// SPDX-License-Identifier: MPL-2.0
//! Helpers shared by the protocol tests: a real server on 127.0.0.1:0 and a raw HTTP/1.1
//! client for exact control over what goes on the wire.
#![allow(dead_code)] // each test file uses a different subset of the helpers

use std::collections::HashMap;
use std::time::Duration;

use gsttrickle::protocol::server::{ServerConfig, ServerHandle, TrickleServer, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Failure bound for every wait in the tests.
pub const BOUND: Duration = Duration::from_secs(10);

pub async fn start(config: ServerConfig) -> ServerHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    serve(listener, TrickleServer::new(config))
        .await
        .expect("start server")
}

pub async fn start_dev() -> ServerHandle {
    start(ServerConfig::development()).await
}

/// Awaits `fut` with the failure bound.
pub async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(BOUND, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// A response head read from a raw connection.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    pub headers: HashMap<String, String>,
    /// Bytes read after the head.
    pub rest: Vec<u8>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// Opens a raw connection and writes `request` as is.
pub async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(request).await.expect("write request");
    s
}

/// Reads one response head (skipping 1xx heads).
pub async fn read_head(s: &mut TcpStream) -> Head {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            let mut tmp = [0u8; 4096];
            let n = s.read(&mut tmp).await.expect("read response");
            assert!(
                n > 0,
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let rest = buf[end + 4..].to_vec();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .expect("status line");
        if (100..200).contains(&status) {
            buf = rest;
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        return Head {
            status,
            headers,
            rest,
        };
    }
}

/// Reads until the peer closes the connection; returns everything read.
pub async fn read_to_close(s: &mut TcpStream, mut got: Vec<u8>) -> Vec<u8> {
    let mut tmp = [0u8; 4096];
    loop {
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Reads until `got` contains `needle`.
pub async fn read_until(s: &mut TcpStream, mut got: Vec<u8>, needle: &[u8]) -> Vec<u8> {
    let mut tmp = [0u8; 4096];
    while !got.windows(needle.len()).any(|w| w == needle) {
        let n = s.read(&mut tmp).await.expect("read");
        assert!(
            n > 0,
            "connection closed before {:?}",
            String::from_utf8_lossy(needle)
        );
        got.extend_from_slice(&tmp[..n]);
    }
    got
}

/// One chunk in chunked transfer encoding.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

/// Start of a chunked POST request.
pub fn chunked_post(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: video/MP2T\r\nTransfer-Encoding: chunked\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// Publishes a whole segment with reqwest; returns the status.
pub async fn post(url: &str, body: &'static [u8]) -> reqwest::Response {
    http()
        .post(url)
        .header("Content-Type", "video/MP2T")
        .body(body)
        .send()
        .await
        .expect("POST")
}

pub async fn get(url: &str) -> reqwest::Response {
    http().get(url).send().await.expect("GET")
}

pub fn hdr(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Polls `cond` (every 2 ms, bounded) until it holds.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    bounded(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

/// Waits until segment `seq` of `channel` has at least `readers` subscribers and `writers`
/// publisher requests attached on the server.
pub async fn wait_attached(
    server: &gsttrickle::protocol::server::TrickleServer,
    channel: &str,
    seq: i64,
    readers: usize,
    writers: usize,
) {
    wait_until(
        &format!("{readers} readers / {writers} writers on {channel}/{seq}"),
        || {
            server.channel_info(channel).is_some_and(|info| {
                info.segments
                    .iter()
                    .any(|s| s.seq == seq && s.readers >= readers && s.writers >= writers)
            })
        },
    )
    .await
}

/// A GET in a background task.
pub fn spawn_get(url: String) -> tokio::task::JoinHandle<reqwest::Response> {
    tokio::spawn(async move { get(&url).await })
}
