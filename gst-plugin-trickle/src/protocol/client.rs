// SPDX-License-Identifier: MPL-2.0
//! The trickle client, on reqwest. It follows the publisher rules P1-P10 and the subscriber rules
//! S1-S10 of `docs/trickle.md` ("Publisher (Rivulet's client)", "Subscriber (Rivulet's client)");
//! the bare labels in this file (P5, S3, ...) are those rules. Everything is async and runs on the
//! caller's tokio runtime; background requests (preconnects) are spawned on the current runtime.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gsttrickle::protocol::client::ClientError> {
//! use gsttrickle::protocol::client::*;
//! let mut publisher = Publisher::new("http://127.0.0.1:2939/demo", PublisherConfig::default())?;
//! let mut seg = publisher.begin_segment().await?;
//! seg.write(bytes::Bytes::from_static(b"hello")).await?;
//! seg.finish().await?;
//!
//! let mut sub = Subscriber::new("http://127.0.0.1:2939/demo", SubscriberConfig::default())?;
//! while let Some(mut seg) = sub.next_segment().await? {
//!     while let Some(chunk) = seg.chunk().await? {
//!         println!("segment {}: {} bytes", seg.seq(), chunk.len());
//!     }
//! }
//! publisher.close().await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{HEADER_CLOSED, HEADER_LATEST, HEADER_RESET, HEADER_SEQ, STATUS_SEGMENT_NOT_FOUND};

/// Errors of the trickle client. Each names the URL involved.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is malformed or not http(s) (checked without I/O).
    #[error("invalid trickle URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// 404: the channel does not exist (never created, deleted or swept). Fatal.
    #[error(
        "trickle channel not found (404) at {url}: the channel was never created, or was deleted or swept"
    )]
    NotFound { url: String },
    /// An unexpected HTTP status.
    #[error("trickle request to {url} failed with HTTP {status}: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    /// A connection or protocol error.
    #[error("trickle request to {url} failed: {message}")]
    Transport { url: String, message: String },
    /// Too many consecutive failed attempts.
    #[error(
        "trickle request to {url} failed {attempts} times in a row, giving up; last error: {last}"
    )]
    RetriesExhausted {
        url: String,
        attempts: u32,
        last: String,
    },
    /// A segment was larger than the caller's limit.
    #[error("trickle segment from {url} is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: usize },
    /// The publisher is closed (by `close()`, or because the server reported the channel closed).
    #[error("trickle publisher is closed (the channel ended or close() was called)")]
    Closed,
}

/// Validates a channel URL (http or https, with a host, no query or fragment) and returns it
/// without a trailing `/`.
fn channel_url(url: &str) -> Result<String, ClientError> {
    let bad = |reason: &str| ClientError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => return Err(bad(&format!("scheme {other:?} is not http or https"))),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("a channel URL must not have a query or fragment"));
    }
    let s = parsed.as_str().trim_end_matches('/');
    if parsed.path().trim_matches('/').is_empty() {
        return Err(bad("no channel name in the path"));
    }
    Ok(s.to_owned())
}

fn build_client(
    url: &str,
    connect_timeout: Duration,
    tls_verify: bool,
    bearer_token: Option<&str>,
) -> Result<reqwest::Client, ClientError> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = bearer_token {
        let mut v =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ClientError::Transport {
                    url: url.to_owned(),
                    message: "the bearer token is not a valid header value".into(),
                }
            })?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        // P9: every in-flight request gets its own connection (no HTTP/2 multiplexing).
        .http1_only()
        .connect_timeout(connect_timeout)
        .tls_danger_accept_invalid_certs(!tls_verify)
        .build()
        .map_err(|e| ClientError::Transport {
            url: url.to_owned(),
            message: format!("cannot build the HTTP client: {e}"),
        })
}

fn header_i64(resp: &reqwest::Response, name: &str) -> Option<i64> {
    resp.headers().get(name)?.to_str().ok()?.trim().parse().ok()
}

fn has_closed(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get(HEADER_CLOSED)
        .is_some_and(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
}

/// Reads at most 1 KiB of an error body, as text.
async fn error_body(mut resp: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < 1024 {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    buf.truncate(1024);
    String::from_utf8_lossy(&buf).trim().to_owned()
}

fn describe(err: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

type RespTask = JoinHandle<Result<reqwest::Response, reqwest::Error>>;

fn joined(
    url: &str,
    r: Result<Result<reqwest::Response, reqwest::Error>, tokio::task::JoinError>,
) -> Result<reqwest::Response, String> {
    match r {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(describe(&e)),
        Err(e) => Err(format!("request task for {url} ended: {e}")),
    }
}

// =============================================================================================
// Subscriber

/// Subscriber settings (`docs/trickle.md`, "Subscriber (Rivulet's client)"; defaults as there).
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// First seq to ask for: -2 (current, default), -1 (next) or any seq ≥ 0.
    pub start_seq: i64,
    /// Consecutive failed attempts before giving up (a 470 counts as one).
    pub max_retries: u32,
    /// Pause before retrying after a failure.
    pub retry_pause: Duration,
    /// A GET with no response headers after this long is cancelled and sent again.
    pub preconnect_refresh: Duration,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Verify TLS certificates.
    pub tls_verify: bool,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        Self {
            start_seq: -2,
            max_retries: 5,
            retry_pause: Duration::from_millis(500),
            preconnect_refresh: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            tls_verify: true,
        }
    }
}

struct PendingGet {
    seq: i64,
    sent: std::time::Instant,
    task: RespTask,
}

/// A 200 response whose first chunk is being awaited.
#[derive(Debug)]
struct Peek {
    served: i64,
    latest: Option<i64>,
    seg_url: String,
    resp: reqwest::Response,
}

/// Reads a channel segment by segment, in order, preconnecting the next one.
#[derive(Debug)]
pub struct Subscriber {
    url: String,
    client: reqwest::Client,
    config: SubscriberConfig,
    seq: i64,
    pending: Option<PendingGet>,
    peek: Option<Peek>,
    failures: u32,
    discont: bool,
    ended: bool,
}

impl Drop for PendingGet {
    fn drop(&mut self) {
        // Keeps `next_segment` cancel-safe: a dropped wait cancels its request.
        self.task.abort();
    }
}

impl std::fmt::Debug for PendingGet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingGet")
            .field("seq", &self.seq)
            .finish()
    }
}

impl Subscriber {
    /// Validates the URL and builds an HTTP client; no I/O.
    pub fn new(url: &str, config: SubscriberConfig) -> Result<Self, ClientError> {
        let client = build_client(url, config.connect_timeout, config.tls_verify, None)?;
        Self::with_client(url, config, client)
    }

    /// Like [`Subscriber::new`] with a caller-provided client (its TLS and timeout settings
    /// apply; `connect_timeout` and `tls_verify` of `config` are ignored).
    pub fn with_client(
        url: &str,
        config: SubscriberConfig,
        client: reqwest::Client,
    ) -> Result<Self, ClientError> {
        let url = channel_url(url)?;
        let mut config = config;
        // A zero refresh time would re-send the GET in a tight loop.
        config.preconnect_refresh = config.preconnect_refresh.max(Duration::from_millis(10));
        if config.start_seq < -2 {
            return Err(ClientError::InvalidUrl {
                url,
                reason: format!("start seq {} is not -2, -1 or ≥ 0", config.start_seq),
            });
        }
        Ok(Self {
            url,
            client,
            seq: config.start_seq,
            config,
            pending: None,
            peek: None,
            failures: 0,
            discont: false,
            ended: false,
        })
    }

    /// The channel URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The next seq it will ask for (-1/-2 until the server has told it a real seq).
    pub fn position(&self) -> i64 {
        self.seq
    }

    fn spawn_get(&self, seq: i64) -> PendingGet {
        let req = self.client.get(format!("{}/{seq}", self.url)).send();
        PendingGet {
            seq,
            sent: std::time::Instant::now(),
            task: tokio::spawn(req),
        }
    }

    fn cancel_pending(&mut self) {
        if let Some(p) = self.pending.take() {
            p.task.abort();
        }
    }

    /// Next segment in order. `Ok(None)` = end of stream (`Lp-Trickle-Closed`). Handles 470
    /// resync, empty 200 (skipped), preconnect of S+1 as soon as S's headers arrive, the S4
    /// refresh and the S3 retry rules; `Err(NotFound)` on 404; `Err(RetriesExhausted)` after
    /// `max_retries` consecutive failures.
    ///
    /// Cancel-safe: dropping the future cancels the request in flight; the next call asks for
    /// the same seq again.
    pub async fn next_segment(&mut self) -> Result<Option<SubscribedSegment>, ClientError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            if let Some(peek) = self.peek.as_mut() {
                let first = peek.resp.chunk().await;
                let Some(peek) = self.peek.take() else {
                    continue;
                };
                let served = peek.served;
                let failure = match first {
                    Ok(Some(first)) => {
                        self.failures = 0;
                        let discont = std::mem::take(&mut self.discont);
                        tracing::debug!(url = %peek.seg_url, seq = served, latest = ?peek.latest, discont, "segment");
                        return Ok(Some(SubscribedSegment {
                            url: format!("{}/{served}", self.url),
                            seq: served,
                            latest: peek.latest,
                            discont,
                            content_type: peek
                                .resp
                                .headers()
                                .get(reqwest::header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned),
                            first: Some(first),
                            resp: Some(peek.resp),
                        }));
                    }
                    Ok(None) => {
                        self.failures = 0;
                        tracing::debug!(url = %peek.seg_url, seq = served, "empty segment skipped");
                        self.discont = true;
                        continue;
                    }
                    Err(e) => {
                        // Failed before the first byte: ask for the same seq again.
                        self.cancel_pending();
                        if served >= 0 {
                            self.seq = served;
                        }
                        describe(&e)
                    }
                };
                self.failures += 1;
                if self.failures >= self.config.max_retries.max(1) {
                    return Err(self.exhausted(&peek.seg_url, failure));
                }
                tokio::time::sleep(self.config.retry_pause).await;
                continue;
            }
            let seq = self.seq;
            let seg_url = format!("{}/{seq}", self.url);
            let mut pending = match self.pending.take() {
                Some(p) if p.seq == seq => p,
                other => {
                    if let Some(p) = other {
                        p.task.abort();
                    }
                    self.spawn_get(seq)
                }
            };
            // S4: no response headers within the refresh time -> cancel and ask again.
            let result = loop {
                // Counted from when the request was sent (a preconnect may have been waiting
                // while the previous segment was read).
                let left = self
                    .config
                    .preconnect_refresh
                    .saturating_sub(pending.sent.elapsed());
                match tokio::time::timeout(left, &mut pending.task).await {
                    Ok(r) => break joined(&seg_url, r),
                    Err(_) => {
                        pending.task.abort();
                        tracing::debug!(url = %seg_url, "preconnect refresh");
                        pending = self.spawn_get(seq);
                    }
                }
            };
            let failure = match result {
                Err(msg) => msg,
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if has_closed(&resp) {
                        tracing::debug!(url = %seg_url, status, "end of stream");
                        self.ended = true;
                        return Ok(None);
                    }
                    if status == 404 {
                        return Err(ClientError::NotFound {
                            url: self.url.clone(),
                        });
                    }
                    if status == STATUS_SEGMENT_NOT_FOUND {
                        self.failures += 1;
                        let latest = header_i64(&resp, HEADER_LATEST);
                        let last = format!("HTTP 470 (latest {latest:?})");
                        if self.failures >= self.config.max_retries.max(1) {
                            return Err(self.exhausted(&seg_url, last));
                        }
                        self.seq = latest.filter(|l| *l >= 0).unwrap_or(-1);
                        tracing::debug!(url = %seg_url, to = self.seq, "470: resync");
                        self.discont = true;
                        continue;
                    }
                    if status == 200 {
                        let served = header_i64(&resp, HEADER_SEQ)
                            .filter(|s| *s >= 0)
                            .or((seq >= 0).then_some(seq));
                        let latest = header_i64(&resp, HEADER_LATEST);
                        match served {
                            Some(s) => {
                                self.seq = s.saturating_add(1);
                                self.pending = Some(self.spawn_get(s.saturating_add(1)));
                            }
                            None => self.seq = -1,
                        }
                        // Peek at the first chunk (kept in `self`, so a cancelled call loses
                        // nothing): an empty body is a skipped segment.
                        self.peek = Some(Peek {
                            served: served.unwrap_or(seq),
                            latest,
                            seg_url: seg_url.clone(),
                            resp,
                        });
                        continue;
                    } else {
                        format!("HTTP {status}: {}", error_body(resp).await)
                    }
                }
            };
            self.failures += 1;
            tracing::debug!(url = %seg_url, attempt = self.failures, error = %failure, "subscribe attempt failed");
            if self.failures >= self.config.max_retries.max(1) {
                return Err(self.exhausted(&seg_url, failure));
            }
            tokio::time::sleep(self.config.retry_pause).await;
        }
    }

    fn exhausted(&mut self, seg_url: &str, last: String) -> ClientError {
        let attempts = self.failures;
        self.failures = 0;
        ClientError::RetriesExhausted {
            url: seg_url.to_owned(),
            attempts,
            last,
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        // S8: cancel the pending preconnect.
        self.cancel_pending();
    }
}

/// One segment being received; its bytes arrive as the publisher sends them.
#[derive(Debug)]
pub struct SubscribedSegment {
    url: String,
    seq: i64,
    latest: Option<i64>,
    discont: bool,
    content_type: Option<String>,
    first: Option<Bytes>,
    resp: Option<reqwest::Response>,
}

impl SubscribedSegment {
    /// The seq served (`Lp-Trickle-Seq`).
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// `Lp-Trickle-Latest` if the server sent it (`latest - seq - 1` = segments behind).
    pub fn latest(&self) -> Option<i64> {
        self.latest
    }

    /// True when a 470 resync or a skipped empty segment came before this one.
    pub fn discont(&self) -> bool {
        self.discont
    }

    /// The `Content-Type` of the response (the channel's MIME type), if sent.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The next chunk of the body; `None` once the segment has ended.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        let Some(resp) = self.resp.as_mut() else {
            return Ok(None);
        };
        match resp.chunk().await {
            Ok(Some(c)) => Ok(Some(c)),
            Ok(None) => {
                self.resp = None;
                Ok(None)
            }
            Err(e) => {
                self.resp = None;
                Err(ClientError::Transport {
                    url: self.url.clone(),
                    message: describe(&e),
                })
            }
        }
    }

    /// The whole body (for JSON channels); `Err(TooLarge)` once it exceeds `limit` bytes.
    pub async fn read_all(mut self, limit: usize) -> Result<Bytes, ClientError> {
        let mut buf = BytesMut::new();
        while let Some(c) = self.chunk().await? {
            if buf.len() + c.len() > limit {
                return Err(ClientError::TooLarge {
                    url: self.url.clone(),
                    limit,
                });
            }
            buf.extend_from_slice(&c);
        }
        Ok(buf.freeze())
    }
}

// =============================================================================================
// Publisher

/// Publisher settings (`docs/trickle.md`, "Publisher (Rivulet's client)"; defaults as there).
#[derive(Clone)]
pub struct PublisherConfig {
    /// `Content-Type` of every POST (the channel's MIME type).
    pub mime: String,
    /// Pause before retrying a segment that failed before any byte was sent (P5).
    pub retry_pause: Duration,
    /// `close()` sends `DELETE U` after the final empty segment (P7).
    pub delete_on_close: bool,
    /// Verify TLS certificates.
    pub tls_verify: bool,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Sent as `Authorization: Bearer <token>` on every request (a server behind bearer auth,
    /// such as the daemon's embedded one with `RIVULET_API_TOKEN`); never logged.
    pub bearer_token: Option<String>,
}

impl std::fmt::Debug for PublisherConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherConfig")
            .field("mime", &self.mime)
            .field("retry_pause", &self.retry_pause)
            .field("delete_on_close", &self.delete_on_close)
            .field("tls_verify", &self.tls_verify)
            .field("connect_timeout", &self.connect_timeout)
            // Whether there is one, never the token.
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "…"))
            .finish()
    }
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            mime: "video/MP2T".to_owned(),
            retry_pause: Duration::from_millis(250),
            delete_on_close: true,
            tls_verify: true,
            connect_timeout: Duration::from_secs(10),
            bearer_token: None,
        }
    }
}

/// How many times an untouched segment (no byte sent yet) is re-POSTed before giving up.
pub const MAX_UNTOUCHED_RETRIES: u32 = 5;

/// Capacity (in chunks) of the channel between `write()` and the HTTP body: small, so a
/// stalled server applies back-pressure to the writer.
const BODY_CHANNEL_CHUNKS: usize = 4;

/// Shared by a publisher and its writers.
#[derive(Debug)]
struct PubShared {
    url: String,
    client: reqwest::Client,
    config: PublisherConfig,
    closed: AtomicBool,
    /// A seq that a failed writer never wrote a byte to: the next segment takes it over (P5).
    unused_seq: std::sync::Mutex<Option<i64>>,
    /// Highest seq the server confirmed with `Lp-Trickle-Seq` on a 2xx POST answer; -1: none.
    written: AtomicI64,
}

impl PubShared {
    fn seg_url(&self, seq: i64) -> String {
        format!("{}/{seq}", self.url)
    }

    /// Opens a POST for `seq` whose body is fed through a small bounded channel.
    fn open_post(&self, seq: i64, reset: bool) -> PendingPost {
        let (tx, rx) = mpsc::channel::<Bytes>(BODY_CHANNEL_CHUNKS);
        let started = Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        let body = futures::stream::unfold(rx, move |mut rx| {
            let flag = flag.clone();
            async move {
                let b = rx.recv().await?;
                // From here on bytes of this seq may reach the server: never re-POST it.
                flag.store(true, Ordering::SeqCst);
                Some((Ok::<Bytes, std::io::Error>(b), rx))
            }
        });
        let mut req = self
            .client
            .post(self.seg_url(seq))
            .header(reqwest::header::CONTENT_TYPE, self.config.mime.as_str())
            .body(reqwest::Body::wrap_stream(body));
        if reset {
            req = req.header(HEADER_RESET, "1");
        }
        PendingPost {
            seq,
            reset,
            tx,
            started,
            task: tokio::spawn(req.send()),
        }
    }

    /// Notes the `Lp-Trickle-Seq` of a 2xx answer to the POST of `seq` (go-livepeer 2026
    /// servers send the seq they wrote; older ones send nothing, which is not an error). The
    /// publisher numbers its segments itself and keeps doing so; a different number means the
    /// server put the bytes elsewhere (a server or proxy that rewrote the path), which is
    /// logged as a warning. See `docs/trickle.md`, "Publishing a segment".
    fn note_written(&self, seq: i64, resp: &reqwest::Response) {
        let Some(written) = header_i64(resp, HEADER_SEQ) else {
            return;
        };
        if written != seq {
            tracing::warn!(
                url = %self.seg_url(seq),
                written,
                "the server reports it wrote another seq than the one posted"
            );
        }
        self.written.fetch_max(written, Ordering::SeqCst);
    }

    /// `DELETE U/{seq}` (P5), logged on failure.
    async fn delete_seq(&self, seq: i64) {
        let url = self.seg_url(seq);
        match self
            .client
            .delete(&url)
            .header(reqwest::header::CONNECTION, "close")
            .send()
            .await
        {
            Ok(r) => tracing::debug!(%url, status = r.status().as_u16(), "segment deleted"),
            Err(e) => tracing::warn!(%url, error = %describe(&e), "cannot delete segment"),
        }
    }

    /// P4: interprets a final POST response.
    async fn outcome(
        &self,
        seq: i64,
        result: Result<reqwest::Response, String>,
    ) -> Result<SegmentOutcome, Failure> {
        let url = self.seg_url(seq);
        match result {
            Err(message) => Err(Failure::Retryable(ClientError::Transport { url, message })),
            Ok(resp) => {
                let status = resp.status().as_u16();
                if has_closed(&resp) {
                    tracing::debug!(%url, status, "channel closed");
                    self.closed.store(true, Ordering::SeqCst);
                    return Ok(SegmentOutcome::ChannelClosed);
                }
                match status {
                    404 => Err(Failure::Fatal(ClientError::NotFound {
                        url: self.url.clone(),
                    })),
                    200..=299 => {
                        self.note_written(seq, &resp);
                        Ok(SegmentOutcome::Done)
                    }
                    _ => Err(Failure::Retryable(ClientError::Http {
                        url,
                        status,
                        body: error_body(resp).await,
                    })),
                }
            }
        }
    }
}

enum Failure {
    Retryable(ClientError),
    Fatal(ClientError),
}

struct PendingPost {
    seq: i64,
    reset: bool,
    tx: mpsc::Sender<Bytes>,
    /// Set once the HTTP body has taken its first chunk.
    started: Arc<AtomicBool>,
    task: RespTask,
}

/// Result of a finished segment (P4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentOutcome {
    /// The server accepted the segment.
    Done,
    /// The server reported the channel closed (`Lp-Trickle-Closed`): stop publishing.
    ChannelClosed,
}

/// Publishes a channel segment by segment, always holding a preconnected POST for the next seq.
pub struct Publisher {
    shared: Arc<PubShared>,
    next_seq: i64,
    reset: bool,
    pending: Option<PendingPost>,
}

impl PublisherConfig {
    /// The HTTP client for a publisher of `url` with these settings (timeout, TLS, token).
    fn client_for(&self, url: &str) -> Result<reqwest::Client, ClientError> {
        build_client(
            url,
            self.connect_timeout,
            self.tls_verify,
            self.bearer_token.as_deref(),
        )
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("url", &self.shared.url)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Validates the URL (no I/O) and preconnects seq 0 (spawned on the current tokio runtime;
    /// outside a runtime the preconnect is opened by the first `begin_segment`).
    pub fn new(url: &str, config: PublisherConfig) -> Result<Self, ClientError> {
        let client = config.client_for(url)?;
        Self::with_client(url, config, client)
    }

    /// Like [`Publisher::new`] with a caller-provided client (`connect_timeout` and
    /// `tls_verify` of `config` are ignored).
    pub fn with_client(
        url: &str,
        config: PublisherConfig,
        client: reqwest::Client,
    ) -> Result<Self, ClientError> {
        Ok(Self::start(channel_url(url)?, config, client, 0, false))
    }

    fn start(
        url: String,
        config: PublisherConfig,
        client: reqwest::Client,
        seq: i64,
        reset: bool,
    ) -> Self {
        let shared = Arc::new(PubShared {
            url,
            client,
            config,
            closed: AtomicBool::new(false),
            unused_seq: std::sync::Mutex::new(None),
            written: AtomicI64::new(-1),
        });
        let mut p = Self {
            shared,
            next_seq: seq,
            reset,
            pending: None,
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            p.pending = Some(p.open_next());
        }
        p
    }

    fn open_next(&mut self) -> PendingPost {
        let reset = std::mem::take(&mut self.reset);
        self.shared.open_post(self.next_seq, reset)
    }

    /// Continues a channel that may already have data: asks `GET U/next` (a 400, from servers
    /// without it, means start at 0) and sends `Lp-Trickle-Reset` on the first POST (P1).
    pub async fn reattach(url: &str, config: PublisherConfig) -> Result<Self, ClientError> {
        let client = config.client_for(url)?;
        let url = channel_url(url)?;
        let next_url = format!("{url}/next");
        let resp = client
            .get(&next_url)
            .send()
            .await
            .map_err(|e| ClientError::Transport {
                url: next_url.clone(),
                message: describe(&e),
            })?;
        let status = resp.status().as_u16();
        let seq = match status {
            200 => {
                let header = header_i64(&resp, HEADER_LATEST);
                let body = error_body(resp).await;
                match body.parse::<i64>().ok().or(header) {
                    Some(n) if n >= 0 => n,
                    _ => {
                        return Err(ClientError::Http {
                            url: next_url,
                            status,
                            body: format!("unexpected /next answer {body:?}"),
                        });
                    }
                }
            }
            400 => 0,
            404 => return Err(ClientError::NotFound { url }),
            _ => {
                return Err(ClientError::Http {
                    url: next_url,
                    status,
                    body: error_body(resp).await,
                });
            }
        };
        tracing::debug!(%url, seq, "publisher reattached");
        Ok(Self::start(url, config, client, seq, true))
    }

    /// The channel URL.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// The seq the next `begin_segment` will hand out.
    pub fn next_seq(&self) -> i64 {
        self.next_seq
    }

    /// The highest seq the server has confirmed writing (`Lp-Trickle-Seq` on a successful POST
    /// answer, empty segments included), or `None` before the first confirmation and with
    /// servers older than go-livepeer 2026, which do not send it. For observability: the
    /// publisher's own numbering (P1) is what drives the next seq.
    pub fn last_written_seq(&self) -> Option<i64> {
        let w = self.shared.written.load(Ordering::SeqCst);
        (w >= 0).then_some(w)
    }

    /// Hands out the preconnected POST for the next seq and immediately preconnects seq+1.
    pub async fn begin_segment(&mut self) -> Result<SegmentWriter, ClientError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(ClientError::Closed);
        }
        let unused = self.shared.unused_seq.lock().unwrap().take();
        if let Some(unused) = unused
            && unused < self.next_seq
        {
            // P5: the previous segment failed before any byte was sent: send this one under
            // its seq instead (the preconnect for the seq after it carries no byte either).
            tracing::debug!(url = %self.shared.url, seq = unused, "reusing the unwritten seq");
            if let Some(p) = self.pending.take() {
                p.task.abort();
            }
            self.next_seq = unused;
        }
        let mut post = match self.pending.take() {
            Some(p) => p,
            None => self.open_next(),
        };
        if post.task.is_finished() {
            // The preconnect ended before its body started (P4 on an early answer).
            let res = joined(&self.shared.url, (&mut post.task).await);
            match self.shared.outcome(post.seq, res).await {
                Ok(SegmentOutcome::ChannelClosed) => return Err(ClientError::Closed),
                Err(Failure::Fatal(e)) => return Err(e),
                Ok(SegmentOutcome::Done) => {
                    // The server ended it as an empty segment (e.g. a DELETE of that seq):
                    // the seq is used up, so move on to the next one.
                    post = self
                        .shared
                        .open_post(post.seq.saturating_add(1), post.reset);
                }
                Err(Failure::Retryable(_)) => {
                    // P5: untouched segment, retry the same seq after the pause.
                    tokio::time::sleep(self.shared.config.retry_pause).await;
                    post = self.shared.open_post(post.seq, post.reset);
                }
            }
        }
        let seq = post.seq;
        self.next_seq = seq.saturating_add(1);
        self.pending = Some(self.open_next());
        tracing::debug!(url = %self.shared.url, seq, "segment begins");
        Ok(SegmentWriter {
            shared: self.shared.clone(),
            seq,
            reset: post.reset,
            tx: Some(post.tx),
            task: Some(post.task),
            started: post.started,
            unsent: Vec::new(),
            retries: 0,
        })
    }

    /// One whole message as one segment (control/events channels, P8).
    pub async fn send_message(&mut self, body: Bytes) -> Result<SegmentOutcome, ClientError> {
        let mut w = self.begin_segment().await?;
        w.write(body).await?;
        w.finish().await
    }

    /// P7: ends the pending preconnect with an empty body, then `DELETE U` (when
    /// `delete_on_close`; 400/404 mean already gone and are not errors).
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.shared.closed.store(true, Ordering::SeqCst);
        if let Some(post) = self.pending.take() {
            let PendingPost { seq, tx, task, .. } = post;
            drop(tx);
            match tokio::time::timeout(Duration::from_secs(10), task).await {
                Ok(r) => match joined(&self.shared.url, r) {
                    Ok(resp) => {
                        if resp.status().is_success() {
                            self.shared.note_written(seq, &resp);
                        }
                        tracing::debug!(
                            url = %self.shared.url, seq, status = resp.status().as_u16(),
                            "final empty segment sent"
                        )
                    }
                    Err(e) => {
                        tracing::debug!(url = %self.shared.url, seq, error = %e, "final empty segment failed")
                    }
                },
                Err(_) => {
                    tracing::warn!(url = %self.shared.url, seq, "final empty segment: no answer in 10 s")
                }
            }
        }
        if !self.shared.config.delete_on_close {
            return Ok(());
        }
        let url = self.shared.url.clone();
        let resp =
            self.shared
                .client
                .delete(&url)
                .send()
                .await
                .map_err(|e| ClientError::Transport {
                    url: url.clone(),
                    message: describe(&e),
                })?;
        match resp.status().as_u16() {
            200..=299 | 400 | 404 => {
                tracing::debug!(%url, status = resp.status().as_u16(), "channel deleted");
                Ok(())
            }
            status => Err(ClientError::Http {
                url,
                status,
                body: error_body(resp).await,
            }),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.task.abort();
        }
    }
}

/// One segment being published: bytes go out as they are written (P6).
pub struct SegmentWriter {
    shared: Arc<PubShared>,
    seq: i64,
    reset: bool,
    tx: Option<mpsc::Sender<Bytes>>,
    task: Option<RespTask>,
    /// Whether the HTTP body has taken any byte (then the seq is never re-POSTed).
    started: Arc<AtomicBool>,
    /// Chunks written while the body had not started yet, kept (cheap `Bytes` clones, at most
    /// the body channel's capacity plus one) to re-send them on a P5 retry.
    unsent: Vec<Bytes>,
    retries: u32,
}

impl std::fmt::Debug for SegmentWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentWriter")
            .field("url", &self.shared.url)
            .field("seq", &self.seq)
            .field("started", &self.sent())
            .finish_non_exhaustive()
    }
}

impl SegmentWriter {
    /// This segment's seq.
    pub fn seq(&self) -> i64 {
        self.seq
    }

    fn sent(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    async fn take_result(&mut self) -> Result<reqwest::Response, String> {
        match self.task.take() {
            Some(task) => joined(&self.shared.url, task.await),
            None => Err("request already finished".to_owned()),
        }
    }

    /// After a failure: retry an untouched segment (P5), re-sending what was written so far,
    /// or give up. `Ok(true)`: reopened and every unsent chunk handed over; `Ok(false)`: the new
    /// request failed at once (look at its result again).
    async fn retry_or_fail(&mut self, err: ClientError) -> Result<bool, ClientError> {
        if self.sent() {
            // Bytes may have reached the server: never re-POST, DELETE the seq instead.
            self.shared.delete_seq(self.seq).await;
            return Err(err);
        }
        if self.retries >= MAX_UNTOUCHED_RETRIES {
            // P5: no byte was ever written to this seq; the next segment takes it over.
            *self.shared.unused_seq.lock().unwrap() = Some(self.seq);
            return Err(ClientError::RetriesExhausted {
                url: self.shared.seg_url(self.seq),
                attempts: self.retries + 1,
                last: err.to_string(),
            });
        }
        self.retries += 1;
        tracing::debug!(url = %self.shared.seg_url(self.seq), error = %err, attempt = self.retries, "retrying untouched segment");
        tokio::time::sleep(self.shared.config.retry_pause).await;
        let post = self.shared.open_post(self.seq, self.reset);
        self.started = post.started;
        self.task = Some(post.task);
        for chunk in &self.unsent {
            if post.tx.send(chunk.clone()).await.is_err() {
                return Ok(false);
            }
        }
        self.tx = Some(post.tx);
        Ok(true)
    }

    /// The request ended before taking data: apply P4 and P5 until the data is handed over.
    async fn recover(&mut self) -> Result<(), ClientError> {
        loop {
            self.tx = None;
            let res = self.take_result().await;
            let err = match self.shared.outcome(self.seq, res).await {
                Ok(SegmentOutcome::ChannelClosed) => return Err(ClientError::Closed),
                Err(Failure::Fatal(e)) => return Err(e),
                Ok(SegmentOutcome::Done) => ClientError::Transport {
                    url: self.shared.seg_url(self.seq),
                    message: "the server ended the request before the body".to_owned(),
                },
                Err(Failure::Retryable(e)) => e,
            };
            if self.retry_or_fail(err).await? {
                return Ok(());
            }
        }
    }

    /// Streams `data` at once (P6). Waits when the server is slower than the writer (the body
    /// channel is small and bounded).
    pub async fn write(&mut self, data: Bytes) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        if self.sent() {
            self.unsent.clear();
        } else {
            self.unsent.push(data.clone());
        }
        let Some(tx) = self.tx.as_ref() else {
            return Err(ClientError::Closed);
        };
        if tx.send(data).await.is_ok() {
            return Ok(());
        }
        self.recover().await
    }

    /// Ends the body and waits for the final response (P4: `Lp-Trickle-Closed`, 404, 200,
    /// other errors in that order). A failed segment is retried if untouched, else DELETEd.
    /// There is no timeout (P9: no whole-request timeouts); drop the future to give up.
    pub async fn finish(mut self) -> Result<SegmentOutcome, ClientError> {
        loop {
            self.tx = None;
            let res = self.take_result().await;
            match self.shared.outcome(self.seq, res).await {
                Ok(o) => {
                    tracing::debug!(url = %self.shared.seg_url(self.seq), outcome = ?o, "segment finished");
                    return Ok(o);
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retryable(e)) => {
                    // Reopened (or failed at once): either way, end that body and look again.
                    self.retry_or_fail(e).await?;
                }
            }
        }
    }

    /// P5: abandons the segment: drops the upload and sends `DELETE U/{seq}` on a new
    /// request, releasing the subscribers waiting for the rest.
    pub async fn abort(mut self) {
        self.tx = None;
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.shared.delete_seq(self.seq).await;
    }
}
