// SPDX-License-Identifier: MPL-2.0
//! The trickle server (spec §2-§9): an axum [`Router`] serving the trickle endpoints under a
//! base path, plus in-process channel management for hosts that run with auto-create off.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use gsttrickle::protocol::server::{serve, ServerConfig, TrickleServer};
//! let server = TrickleServer::new(ServerConfig::development());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let handle = serve(listener, server).await?;
//! println!("publish to {}", handle.url("my-channel"));
//! handle.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Data model: each channel has a ring of [`RING_SIZE`] segment slots (seq N in slot N mod 5), a
//! `nextWrite` counter, a `writeTime` and a closed flag. A segment is an append-only list of
//! byte chunks (the `Bytes` received from hyper, never copied); every reader keeps its own
//! position in it, so a slow subscriber never slows the publisher or other subscribers, and
//! every chunk is relayed to every waiting reader as soon as it is appended.
//!
//! # Deviation: no `100 Continue` keepalive
//!
//! The reference server sends an unsolicited `100 Continue` every 10 s on a preconnected POST
//! whose body has not started (§7.3). hyper 1 offers no way for a handler to emit informational
//! responses (it only answers `Expect: 100-continue` itself, when the body is first polled), so
//! this server does not send the keepalive. The POST simply keeps waiting without limit; clients
//! do not need the keepalive (it exists for intermediaries that cut silent connections).
//!
//! Memory is bounded by the ring of 5 segments per channel, the per-segment size cap
//! ([`ServerConfig::max_segment_bytes`]) and the channel cap ([`ServerConfig::max_channels`]).
//! There are no whole-request timeouts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::{oneshot, watch};

use super::{
    HEADER_EXPECT_CONTENT, HEADER_RESET, RING_SIZE, STATUS_SEGMENT_NOT_FOUND,
    is_reserved_channel_name, is_valid_channel_name,
};

/// Name of the changefeed channel (§9.3).
pub const CHANGEFEED_CHANNEL: &str = "_changes";

/// MIME type given to channels created without one.
pub const DEFAULT_MIME: &str = "application/octet-stream";

/// Server settings. [`Default`] is orchestrator mode (auto-create and changefeed off);
/// [`ServerConfig::development`] is the standalone development mode.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Base path the routes are mounted under; begins and ends with `/` (normalised if not).
    pub base_path: String,
    /// The first POST to an unknown channel creates it (development mode).
    pub auto_create: bool,
    /// Publish `{"added":[…]}` / `{"removed":[…]}` on the internal channel `_changes`.
    pub changefeed: bool,
    /// Channels whose last write is older than this are closed by the sweeper.
    pub idle_timeout: Duration,
    /// How often the sweeper runs.
    pub sweep_interval: Duration,
    /// Per-segment size cap: larger segments are refused (413).
    pub max_segment_bytes: u64,
    /// Maximum number of channels (internal `_` channels not counted); beyond it 503.
    pub max_channels: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            base_path: "/".to_owned(),
            auto_create: false,
            changefeed: false,
            idle_timeout: Duration::from_secs(5 * 60),
            sweep_interval: Duration::from_secs(60),
            max_segment_bytes: 64 * 1024 * 1024,
            max_channels: 10_000,
        }
    }
}

impl ServerConfig {
    /// Development mode: auto-create on, changefeed on, everything else default.
    pub fn development() -> Self {
        Self {
            auto_create: true,
            changefeed: true,
            ..Self::default()
        }
    }
}

/// Errors of the in-process server API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServerError {
    /// The name does not match `[A-Za-z0-9_-]{1,256}`.
    #[error("invalid channel name {0:?}: use 1 to 256 characters of A-Z a-z 0-9 _ -")]
    InvalidName(String),
    /// The channel cap is reached.
    #[error("too many channels (limit {0}); close some channels or raise max_channels")]
    TooManyChannels(usize),
}

// ---------------------------------------------------------------------------------------------
// Segments

/// Chunks smaller than this are copied into the segment's tail buffer instead of being kept
/// as they came (many tiny chunks would otherwise cost far more memory than their bytes).
const SMALL_CHUNK: usize = 4096;

/// The append-only data of a segment: sealed chunks (shared with readers without copying)
/// followed by a small tail buffer (under [`SMALL_CHUNK`] bytes) that collects small writes.
/// A reader's position is (chunk index, offset); offsets into the tail stay valid when the tail
/// is sealed into the next chunk, because it keeps the same bytes at the same offsets.
#[derive(Default)]
struct SegState {
    chunks: Vec<Bytes>,
    tail: BytesMut,
    len: u64,
    closed: bool,
}

impl SegState {
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            let sealed = self.tail.split().freeze();
            self.chunks.push(sealed);
        }
    }
}

/// One segment: an append-only list of chunks, a closed flag and a wake-up signal that is
/// bumped on every append and on close.
struct Segment {
    seq: i64,
    state: Mutex<SegState>,
    changed: watch::Sender<()>,
    readers: AtomicUsize,
    writers: AtomicUsize,
}

impl Segment {
    fn new(seq: i64) -> Arc<Self> {
        Arc::new(Self {
            seq,
            state: Mutex::new(SegState::default()),
            changed: watch::Sender::new(()),
            readers: AtomicUsize::new(0),
            writers: AtomicUsize::new(0),
        })
    }

    fn append(&self, chunk: Bytes) {
        {
            let mut st = self.state.lock().unwrap();
            st.len += chunk.len() as u64;
            if chunk.len() >= SMALL_CHUNK {
                st.seal_tail();
                st.chunks.push(chunk);
            } else {
                if st.tail.capacity() - st.tail.len() < chunk.len() {
                    st.tail.reserve(SMALL_CHUNK);
                }
                st.tail.extend_from_slice(&chunk);
                if st.tail.len() >= SMALL_CHUNK {
                    st.seal_tail();
                }
            }
        }
        self.changed.send_replace(());
    }

    fn close(&self) {
        {
            let mut st = self.state.lock().unwrap();
            if st.closed {
                return;
            }
            st.closed = true;
            st.seal_tail();
        }
        self.changed.send_replace(());
    }

    fn is_closed(&self) -> bool {
        self.state.lock().unwrap().closed
    }

    fn reader(self: &Arc<Self>) -> SegmentReader {
        self.readers.fetch_add(1, Ordering::Relaxed);
        SegmentReader {
            rx: self.changed.subscribe(),
            seg: self.clone(),
            idx: 0,
            off: 0,
        }
    }
}

/// A reader's own position in a segment; every reader starts at byte 0.
struct SegmentReader {
    seg: Arc<Segment>,
    idx: usize,
    off: usize,
    rx: watch::Receiver<()>,
}

impl Drop for SegmentReader {
    fn drop(&mut self) {
        self.seg.readers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a POST writing into a segment while it lives.
struct WriterGuard(Arc<Segment>);

impl WriterGuard {
    fn new(seg: &Arc<Segment>) -> Self {
        seg.writers.fetch_add(1, Ordering::Relaxed);
        Self(seg.clone())
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.0.writers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SegmentReader {
    /// The next chunk, waiting for it; `None` once the segment is closed and fully read.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            self.rx.borrow_and_update();
            {
                let st = self.seg.state.lock().unwrap();
                if let Some(chunk) = st.chunks.get(self.idx) {
                    let off = self.off;
                    self.idx += 1;
                    self.off = 0;
                    if off < chunk.len() {
                        return Some(chunk.slice(off..));
                    }
                    continue;
                }
                // Past the sealed chunks: `off` is an offset into the tail.
                if self.off < st.tail.len() {
                    let out = Bytes::copy_from_slice(&st.tail[self.off..]);
                    self.off = st.tail.len();
                    return Some(out);
                }
                if st.closed {
                    return None;
                }
            }
            // The sender lives in the segment we hold, so this only fails if it was dropped,
            // which cannot happen while `seg` is alive; treat it as the end anyway.
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// A snapshot of one segment in a channel's ring ([`TrickleServer::channel_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub seq: i64,
    /// Bytes received so far.
    pub bytes: u64,
    pub closed: bool,
    /// Subscribers currently reading or waiting on it.
    pub readers: usize,
    /// Publisher requests currently writing or waiting to write into it.
    pub writers: usize,
}

/// A snapshot of a channel ([`TrickleServer::channel_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub mime: String,
    /// The seq the next publish gets.
    pub next_write: i64,
    pub closed: bool,
    /// Time since the last write (or creation).
    pub idle: Duration,
    /// The segments in the ring, by seq.
    pub segments: Vec<SegmentInfo>,
}

// ---------------------------------------------------------------------------------------------
// Channels

struct ChanState {
    ring: [Option<Arc<Segment>>; RING_SIZE],
    next_write: i64,
    write_time: Instant,
    closed: bool,
}

struct Channel {
    mime: String,
    state: Mutex<ChanState>,
}

fn slot_of(seq: i64) -> usize {
    // seq is never negative here (callers resolve -1/-2 and refuse other negatives).
    (seq.rem_euclid(RING_SIZE as i64)) as usize
}

enum GetTarget {
    Segment(Arc<Segment>),
    Missing { latest: i64, closed: bool },
}

impl Channel {
    fn new(mime: &str) -> Arc<Self> {
        Arc::new(Self {
            mime: mime.to_owned(),
            state: Mutex::new(ChanState {
                ring: Default::default(),
                next_write: 0,
                write_time: Instant::now(),
                closed: false,
            }),
        })
    }

    fn next_write(&self) -> i64 {
        self.state.lock().unwrap().next_write
    }

    fn is_closed(&self) -> bool {
        self.state.lock().unwrap().closed
    }

    /// §7.1: the segment a POST to `seq` writes into (reused, or a new one replacing and
    /// closing whatever older segment held the slot). §7.2: with `reset`, close every ring
    /// segment with a lower seq.
    fn segment_for_post(&self, seq: i64, reset: bool) -> Arc<Segment> {
        let mut st = self.state.lock().unwrap();
        let slot = slot_of(seq);
        let seg = match &st.ring[slot] {
            Some(seg) if seg.seq == seq => seg.clone(),
            other => {
                if let Some(old) = other {
                    old.close();
                }
                let seg = Segment::new(seq);
                st.ring[slot] = Some(seg.clone());
                seg
            }
        };
        if reset {
            for s in st.ring.iter().flatten() {
                if s.seq < seq {
                    s.close();
                }
            }
        }
        seg
    }

    /// §8.1-8.2: resolve a GET's seq and apply the precreate rule.
    fn segment_for_get(&self, seq: i64) -> (i64, GetTarget) {
        let mut st = self.state.lock().unwrap();
        let seq = match seq {
            -1 => st.next_write,
            -2 => (st.next_write - 1).max(0),
            s => s,
        };
        let slot = slot_of(seq);
        if let Some(seg) = &st.ring[slot]
            && seg.seq == seq
        {
            return (seq, GetTarget::Segment(seg.clone()));
        }
        if !st.closed && (seq == st.next_write || (st.next_write == 0 && seq == 1)) {
            if let Some(old) = &st.ring[slot] {
                old.close();
            }
            let seg = Segment::new(seq);
            st.ring[slot] = Some(seg.clone());
            return (seq, GetTarget::Segment(seg));
        }
        (
            seq,
            GetTarget::Missing {
                latest: st.next_write,
                closed: st.closed,
            },
        )
    }

    /// Data arrived for `seq` (first byte, or an empty EOF): `nextWrite = seq + 1`.
    fn mark_written(&self, seq: i64) {
        let mut st = self.state.lock().unwrap();
        st.next_write = seq.saturating_add(1);
        st.write_time = Instant::now();
    }

    fn touch(&self) {
        self.state.lock().unwrap().write_time = Instant::now();
    }

    /// Close the channel and every segment in its ring.
    fn close(&self) {
        let segs: Vec<Arc<Segment>> = {
            let mut st = self.state.lock().unwrap();
            st.closed = true;
            st.ring.iter().flatten().cloned().collect()
        };
        for s in segs {
            s.close();
        }
    }

    /// §7.1 step 3: DELETE of one seq. `Err` when the slot holds another seq.
    fn close_segment(&self, seq: i64) -> bool {
        let st = self.state.lock().unwrap();
        match &st.ring[slot_of(seq)] {
            Some(seg) if seg.seq == seq => {
                seg.close();
                true
            }
            _ => false,
        }
    }

    /// Publish one whole in-process message as the next segment.
    fn publish_message(&self, body: Bytes) {
        let seq = self.next_write();
        let seg = self.segment_for_post(seq, false);
        seg.append(body);
        self.mark_written(seq);
        seg.close();
    }
}

// ---------------------------------------------------------------------------------------------
// Server

struct Inner {
    config: ServerConfig,
    base: String,
    channels: Mutex<HashMap<String, Arc<Channel>>>,
}

/// The trickle server: channels plus the HTTP routes serving them. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct TrickleServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TrickleServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrickleServer")
            .field("base_path", &self.inner.base)
            .finish_non_exhaustive()
    }
}

fn normalize_base(base: &str) -> String {
    let mut b = String::with_capacity(base.len() + 2);
    if !base.starts_with('/') {
        b.push('/');
    }
    b.push_str(base);
    if !b.ends_with('/') {
        b.push('/');
    }
    b
}

enum Lookup {
    Found(Arc<Channel>),
    NotFound,
    Full,
}

impl TrickleServer {
    /// Creates the server (and the `_changes` channel when the changefeed is on).
    ///
    /// When called inside a tokio runtime it spawns the idle sweeper on that runtime (it stops
    /// by itself once every clone of the server is dropped). Outside a runtime no sweeper runs;
    /// call [`TrickleServer::sweep_idle`] yourself then.
    pub fn new(config: ServerConfig) -> Self {
        let base = normalize_base(&config.base_path);
        let server = Self {
            inner: Arc::new(Inner {
                config,
                base,
                channels: Mutex::new(HashMap::new()),
            }),
        };
        if server.inner.config.changefeed {
            server.inner.channels.lock().unwrap().insert(
                CHANGEFEED_CHANNEL.to_owned(),
                Channel::new("application/json"),
            );
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&server.inner);
            let every = server
                .inner
                .config
                .sweep_interval
                .max(Duration::from_millis(1));
            rt.spawn(sweeper(weak, every));
        }
        server
    }

    /// The configuration (base path normalised).
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The normalised base path (begins and ends with `/`).
    pub fn base_path(&self) -> &str {
        &self.inner.base
    }

    /// All routes under the base path, to serve alone or mount in a host's own router
    /// (`Router::merge`). A host serving it itself should set `TCP_NODELAY` on accepted
    /// connections, as [`serve`] does (`ListenerExt::tap_io`): without it, Nagle's algorithm
    /// and delayed ACKs can hold small chunks back for tens of milliseconds.
    pub fn router(&self) -> Router {
        let base = &self.inner.base;
        Router::new()
            .route(
                &format!("{base}{{channel}}"),
                post(post_channel).delete(delete_channel),
            )
            .route(
                &format!("{base}{{channel}}/{{seq}}"),
                post(post_segment).get(get_segment).delete(delete_segment),
            )
            .with_state(self.clone())
    }

    /// Creates a channel in-process with MIME type `mime` (as an orchestrator does). Creating an
    /// existing channel succeeds and leaves it unchanged. Reserved `_` names are allowed here.
    pub fn create_channel(&self, name: &str, mime: &str) -> Result<(), ServerError> {
        if !is_valid_channel_name(name) {
            return Err(ServerError::InvalidName(name.to_owned()));
        }
        match self.lookup_or_create(name, mime, true) {
            Lookup::Found(_) => Ok(()),
            Lookup::Full => Err(ServerError::TooManyChannels(self.inner.config.max_channels)),
            Lookup::NotFound => Err(ServerError::InvalidName(name.to_owned())),
        }
    }

    /// A snapshot of a channel (for monitoring and tests); `None` if there is no such channel.
    pub fn channel_info(&self, name: &str) -> Option<ChannelInfo> {
        let ch = self.channel(name)?;
        let st = ch.state.lock().unwrap();
        let mut segments: Vec<SegmentInfo> = st
            .ring
            .iter()
            .flatten()
            .map(|seg| {
                let ss = seg.state.lock().unwrap();
                SegmentInfo {
                    seq: seg.seq,
                    bytes: ss.len,
                    closed: ss.closed,
                    readers: seg.readers.load(Ordering::Relaxed),
                    writers: seg.writers.load(Ordering::Relaxed),
                }
            })
            .collect();
        segments.sort_by_key(|s| s.seq);
        Some(ChannelInfo {
            mime: ch.mime.clone(),
            next_write: st.next_write,
            closed: st.closed,
            idle: st.write_time.elapsed(),
            segments,
        })
    }

    /// Closes a channel in-process (waiting subscribers and publishers see EOS) and removes it.
    /// Returns false if there was no such channel.
    pub fn close_channel(&self, name: &str) -> bool {
        let removed = self.inner.channels.lock().unwrap().remove(name);
        match removed {
            Some(ch) => {
                ch.close();
                tracing::debug!(channel = name, "channel closed");
                self.changefeed("removed", name);
                true
            }
            None => false,
        }
    }

    /// Names of all channels (including internal ones such as `_changes`).
    pub fn channel_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .channels
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Closes and removes every channel (what happens when the server stops).
    pub fn close_all(&self) {
        let all: Vec<(String, Arc<Channel>)> =
            self.inner.channels.lock().unwrap().drain().collect();
        for (_, ch) in all {
            ch.close();
        }
    }

    /// Closes every non-internal channel whose last write is older than the idle timeout.
    /// Returns the names closed. Run periodically by the sweeper.
    pub fn sweep_idle(&self) -> Vec<String> {
        let timeout = self.inner.config.idle_timeout;
        let idle: Vec<String> = self
            .inner
            .channels
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, ch)| {
                !is_reserved_channel_name(name)
                    && ch.state.lock().unwrap().write_time.elapsed() >= timeout
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &idle {
            tracing::info!(channel = %name, "closing idle channel");
            self.close_channel(name);
        }
        idle
    }

    fn channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.inner.channels.lock().unwrap().get(name).cloned()
    }

    fn lookup_or_create(&self, name: &str, mime: &str, create: bool) -> Lookup {
        let created = {
            let mut map = self.inner.channels.lock().unwrap();
            if let Some(ch) = map.get(name) {
                return Lookup::Found(ch.clone());
            }
            if !create {
                return Lookup::NotFound;
            }
            // Only count (skipping internal channels) when the map could be full.
            if !is_reserved_channel_name(name) && map.len() >= self.inner.config.max_channels {
                let count = map.keys().filter(|k| !is_reserved_channel_name(k)).count();
                if count >= self.inner.config.max_channels {
                    return Lookup::Full;
                }
            }
            let ch = Channel::new(mime);
            map.insert(name.to_owned(), ch.clone());
            ch
        };
        tracing::debug!(channel = name, mime, "channel created");
        self.changefeed("added", name);
        Lookup::Found(created)
    }

    /// Channel for a client POST: existing, or auto-created when allowed.
    fn lookup_for_post(&self, name: &str, mime: &str) -> Lookup {
        let create = self.inner.config.auto_create && !is_reserved_channel_name(name);
        self.lookup_or_create(name, mime, create)
    }

    fn changefeed(&self, what: &str, name: &str) {
        if !self.inner.config.changefeed || name == CHANGEFEED_CHANNEL {
            return;
        }
        if let Some(ch) = self.channel(CHANGEFEED_CHANNEL) {
            let msg = serde_json::json!({ what: [name] }).to_string();
            tracing::info!(change = %msg, "changefeed");
            ch.publish_message(Bytes::from(msg));
        }
    }
}

async fn sweeper(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        TrickleServer { inner }.sweep_idle();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP handlers

fn hv_i64(v: i64) -> HeaderValue {
    HeaderValue::from(v)
}

fn text(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        body,
    )
        .into_response()
}

const H_SEQ: HeaderName = HeaderName::from_static("lp-trickle-seq");
const H_LATEST: HeaderName = HeaderName::from_static("lp-trickle-latest");
const H_CLOSED: HeaderName = HeaderName::from_static("lp-trickle-closed");

fn with_header(mut resp: Response, name: HeaderName, value: HeaderValue) -> Response {
    resp.headers_mut().insert(name, value);
    resp
}

fn connection_close(resp: Response) -> Response {
    with_header(resp, header::CONNECTION, HeaderValue::from_static("close"))
}

fn closed_value() -> HeaderValue {
    HeaderValue::from_static("terminated")
}

fn invalid_name() -> Response {
    text(
        StatusCode::BAD_REQUEST,
        "Invalid stream name: use 1 to 256 characters of A-Z a-z 0-9 _ -",
    )
}

fn stream_not_found() -> Response {
    text(StatusCode::NOT_FOUND, "Stream not found")
}

fn too_many_channels() -> Response {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "Too many streams: the server's channel limit is reached",
    )
}

fn invalid_idx() -> Response {
    text(StatusCode::BAD_REQUEST, "Invalid idx")
}

fn too_large() -> Response {
    connection_close(text(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Segment too large: it exceeds the server's per-segment size cap",
    ))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Parses a seq path element: `Ok(n)` for integers ≥ `min`, `Err` with the 400 response.
fn parse_seq(raw: &str, min: i64) -> Result<i64, BadSeq> {
    match raw.parse::<i64>() {
        Ok(n) if n >= min => Ok(n),
        Ok(_) => Err(BadSeq::Negative),
        Err(_) => Err(BadSeq::NotInteger),
    }
}

enum BadSeq {
    NotInteger,
    Negative,
}

impl IntoResponse for BadSeq {
    fn into_response(self) -> Response {
        match self {
            BadSeq::NotInteger => invalid_idx(),
            BadSeq::Negative => text(
                StatusCode::BAD_REQUEST,
                "Invalid idx: negative seq other than -1 (next) and -2 (current) is not supported",
            ),
        }
    }
}

/// `POST {base}{channel}`: create.
async fn post_channel(
    State(server): State<TrickleServer>,
    Path(channel): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !is_valid_channel_name(&channel) {
        return invalid_name();
    }
    let mime = header_str(&headers, HEADER_EXPECT_CONTENT).unwrap_or(DEFAULT_MIME);
    match server.lookup_for_post(&channel, mime) {
        Lookup::Found(_) => StatusCode::OK.into_response(),
        Lookup::NotFound => stream_not_found(),
        Lookup::Full => too_many_channels(),
    }
}

/// `DELETE {base}{channel}`: close and remove.
async fn delete_channel(
    State(server): State<TrickleServer>,
    Path(channel): Path<String>,
) -> Response {
    if server.close_channel(&channel) {
        StatusCode::OK.into_response()
    } else {
        text(StatusCode::BAD_REQUEST, "Invalid stream")
    }
}

/// `DELETE {base}{channel}/{seq}`: close one segment.
async fn delete_segment(
    State(server): State<TrickleServer>,
    Path((channel, seq)): Path<(String, String)>,
) -> Response {
    let Some(ch) = server.channel(&channel) else {
        return stream_not_found();
    };
    let seq = match parse_seq(&seq, 0) {
        Ok(s) => s,
        Err(bad) => return bad.into_response(),
    };
    if ch.close_segment(seq) {
        tracing::debug!(channel, seq, "segment deleted");
        StatusCode::OK.into_response()
    } else {
        text(StatusCode::BAD_REQUEST, "Nonexistent segment")
    }
}

/// `GET {base}{channel}/next` and `GET {base}{channel}/{seq}`.
async fn get_segment(
    State(server): State<TrickleServer>,
    Path((channel, seq)): Path<(String, String)>,
) -> Response {
    let Some(ch) = server.channel(&channel) else {
        return stream_not_found();
    };
    if seq == "next" {
        let (next, closed) = {
            let st = ch.state.lock().unwrap();
            (st.next_write, st.closed)
        };
        let mut resp = with_header(next.to_string().into_response(), H_LATEST, hv_i64(next));
        if closed {
            resp = with_header(resp, H_CLOSED, closed_value());
        }
        return resp;
    }
    let seq = match parse_seq(&seq, -2) {
        Ok(s) => s,
        Err(bad) => return bad.into_response(),
    };
    let (seq, target) = ch.segment_for_get(seq);
    let seg = match target {
        GetTarget::Segment(seg) => seg,
        GetTarget::Missing { latest, closed } => {
            let status = if closed {
                StatusCode::OK
            } else {
                StatusCode::from_u16(STATUS_SEGMENT_NOT_FOUND).unwrap_or(StatusCode::NOT_FOUND)
            };
            let mut resp = with_header(
                with_header(text(status, "Entry not found"), H_LATEST, hv_i64(latest)),
                H_SEQ,
                hv_i64(seq),
            );
            if closed {
                resp = with_header(resp, H_CLOSED, closed_value());
            }
            return resp;
        }
    };
    let mut reader = seg.reader();
    // Nothing at all (not even headers) goes out until the first chunk exists.
    let first = reader.next_chunk().await;
    let (latest, closed) = {
        let st = ch.state.lock().unwrap();
        (st.next_write, st.closed)
    };
    let Some(first) = first else {
        // §8.5: closed with zero bytes.
        let mut resp = with_header(
            with_header(StatusCode::OK.into_response(), H_SEQ, hv_i64(seq)),
            H_LATEST,
            hv_i64(latest),
        );
        if closed {
            resp = with_header(resp, H_CLOSED, closed_value());
        }
        return resp;
    };
    tracing::trace!(channel, seq, "subscriber streaming");
    let rest = futures::stream::unfold(reader, |mut r| async move {
        r.next_chunk()
            .await
            .map(|c| (Ok::<Bytes, std::convert::Infallible>(c), r))
    });
    let body = Body::from_stream(futures::stream::once(async { Ok(first) }).chain(rest));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(H_SEQ, hv_i64(seq));
    if let Ok(v) = HeaderValue::from_str(&ch.mime) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if latest != seq {
        h.insert(H_LATEST, hv_i64(latest));
    }
    resp
}

/// `POST {base}{channel}/{seq}`: publish a segment (§7).
async fn post_segment(
    State(server): State<TrickleServer>,
    Path((channel, seq)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !is_valid_channel_name(&channel) {
        return invalid_name();
    }
    let seq = match parse_seq(&seq, -1) {
        Ok(s) => s,
        Err(bad) => return bad.into_response(),
    };
    let cap = server.inner.config.max_segment_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > cap) {
        tracing::warn!(
            channel,
            seq,
            cap,
            "segment refused: Content-Length over the cap"
        );
        return too_large();
    }
    let mime = header_str(&headers, header::CONTENT_TYPE.as_str()).unwrap_or(DEFAULT_MIME);
    let ch = match server.lookup_for_post(&channel, mime) {
        Lookup::Found(ch) => ch,
        Lookup::NotFound => return connection_close(stream_not_found()),
        Lookup::Full => return too_many_channels(),
    };
    if ch.is_closed() {
        // Raced with a close: the channel has ended.
        return with_header(
            connection_close(StatusCode::OK.into_response()),
            H_CLOSED,
            closed_value(),
        );
    }
    let seq = if seq == -1 { ch.next_write() } else { seq };
    let reset = header_str(&headers, HEADER_RESET).is_some();
    let seg = ch.segment_for_post(seq, reset);
    let _writer = WriterGuard::new(&seg);
    let mut changed = seg.changed.subscribe();
    // A re-POST to an already closed segment appends (§7.8); only a close that happens while
    // this POST waits releases it.
    let releasable = !seg.is_closed();
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    // The cap is per segment: a re-POST appends to what is already there.
    let already = seg.state.lock().unwrap().len;

    // §7.3: wait for the first byte, or for the segment to be closed under us.
    let first = loop {
        tokio::select! {
            biased;
            item = stream.next() => match item {
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                other => break other,
            },
            res = changed.changed(), if releasable => {
                if res.is_err() || seg.is_closed() {
                    break None;
                }
            }
        }
    };
    let mut next = first;
    loop {
        match next {
            Some(Ok(chunk)) => {
                if chunk.is_empty() {
                    next = stream.next().await;
                    continue;
                }
                if already + written + chunk.len() as u64 > cap {
                    tracing::warn!(channel, seq, cap, "segment cut: body over the size cap");
                    seg.close();
                    return too_large();
                }
                if written == 0 {
                    ch.mark_written(seq);
                } else {
                    ch.touch();
                }
                written += chunk.len() as u64;
                seg.append(chunk);
            }
            Some(Err(err)) => {
                // §7.7: the segment stays open; a DELETE, overwrite, reset or close ends it.
                tracing::debug!(channel, seq, %err, "publisher body read error");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "Server error");
            }
            None => break,
        }
        next = stream.next().await;
    }
    let mut resp = with_header(StatusCode::OK.into_response(), H_SEQ, hv_i64(seq));
    if written == 0 {
        // §7.5: empty EOF (or released preconnect).
        ch.mark_written(seq);
        seg.close();
        resp = connection_close(resp);
        if ch.is_closed() {
            resp = with_header(resp, H_CLOSED, closed_value());
        }
        tracing::debug!(channel, seq, "empty segment");
    } else {
        seg.close();
        tracing::debug!(channel, seq, bytes = written, "segment written");
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// Serving

/// A running server started by [`serve`].
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    server: TrickleServer,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}{base}{channel}`: the channel URL clients use.
    pub fn url(&self, channel: &str) -> String {
        format!("http://{}{}{}", self.addr, self.server.base_path(), channel)
    }

    /// The server (for in-process channel management).
    pub fn server(&self) -> &TrickleServer {
        &self.server
    }

    /// Closes every channel (releasing waiting requests), stops accepting, and waits (at most
    /// 5 s) for open connections to finish before dropping them.
    pub async fn shutdown(mut self) {
        self.server.close_all();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let abort = self.task.abort_handle();
        match tokio::time::timeout(Duration::from_secs(5), &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::warn!(%err, "trickle server ended with an error"),
            Ok(Err(err)) => tracing::warn!(%err, "trickle server task failed"),
            Err(_) => {
                tracing::warn!("trickle server connections still open after 5 s; dropping them");
                abort.abort();
            }
        }
    }
}

/// Serves `server.router()` on `listener` in a spawned task (TCP_NODELAY on every connection).
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: TrickleServer,
) -> std::io::Result<ServerHandle> {
    use axum::serve::ListenerExt;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "cannot set TCP_NODELAY");
        }
    });
    let router = server.router();
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(%addr, base = server.base_path(), "trickle server listening");
    Ok(ServerHandle {
        addr,
        server,
        shutdown: Some(tx),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads exactly `n` bytes (all already appended, so no wait is involved).
    async fn read_n(r: &mut SegmentReader, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            let c = r.next_chunk().await.expect("data");
            out.extend_from_slice(&c);
        }
        assert_eq!(out.len(), n, "read past the data");
        out
    }

    #[tokio::test]
    async fn readers_follow_the_tail_across_seals() {
        let seg = Segment::new(0);
        let mut a = seg.reader();
        seg.append(Bytes::from_static(b"ab"));
        assert_eq!(&a.next_chunk().await.unwrap()[..], b"ab");
        // Fill the tail past SMALL_CHUNK: it is sealed; reader `a` continues at offset 2.
        let fill = vec![7u8; SMALL_CHUNK];
        seg.append(Bytes::from(fill.clone()[..SMALL_CHUNK - 1].to_vec()));
        let mut b = seg.reader();
        seg.append(Bytes::from(fill.clone())); // large: stored as its own chunk
        seg.append(Bytes::from_static(b"z"));
        let mut want = b"ab".to_vec();
        want.extend_from_slice(&fill[..SMALL_CHUNK - 1]);
        want.extend_from_slice(&fill);
        want.push(b'z');
        assert_eq!(read_n(&mut a, want.len() - 2).await, want[2..]);
        assert_eq!(read_n(&mut b, want.len()).await, want);
        seg.close();
        assert!(a.next_chunk().await.is_none());
        assert!(b.next_chunk().await.is_none());
        let st = seg.state.lock().unwrap();
        assert_eq!(st.len, want.len() as u64);
        assert!(st.tail.is_empty(), "close seals the tail");
        assert_eq!(st.chunks.len(), 3);
    }

    #[test]
    fn base_path_normalisation() {
        assert_eq!(normalize_base("/"), "/");
        assert_eq!(normalize_base(""), "/");
        assert_eq!(normalize_base("ai/trickle"), "/ai/trickle/");
        assert_eq!(normalize_base("/ai/trickle/"), "/ai/trickle/");
    }
}
