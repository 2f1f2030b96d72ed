// SPDX-License-Identifier: MPL-2.0
//! The trickle server (`docs/trickle.md`, "Concepts" to "Server limits"): an axum [`Router`]
//! serving the trickle endpoints under a base path, plus in-process channel management for hosts
//! that run with auto-create off.
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
//! The reference server sends an unsolicited `100 Continue` every 10 s on a preconnected POST whose
//! body has not started (`docs/trickle.md`, "Status codes", 1xx). hyper 1 offers no way for a
//! handler to emit informational responses (it only answers `Expect: 100-continue` itself, when the
//! body is first polled), so this server does not send the keepalive. The POST simply keeps waiting
//! without limit; clients do not need the keepalive (it exists for intermediaries that cut silent
//! connections).
//!
//! # Limits: the server holds under abuse
//!
//! Memory is bounded by the ring of 5 segments per channel, the per-segment size cap
//! ([`ServerConfig::max_segment_bytes`]) and the channel cap ([`ServerConfig::max_channels`]).
//! Connections, waiting requests and stalled transfers are bounded by the limits below, each a
//! [`ServerConfig`] field (zero turns it off). The connection-level ones are applied by
//! [`serve_router`], the one serving function that [`serve`] and the daemon's port both use, so
//! where the router is mounted in a host's app they cover the host's whole port.
//!
//! | limit | default | beyond it |
//! |---|---|---|
//! | `max_connections` (connection level) | 4096 | the connection is accepted, answered `503 Service Unavailable` with `Connection: close` and a text body, and closed |
//! | `header_read_timeout` (connection level) | 10 s | `408 Request Timeout` + close if part of a head arrived, else closed silently |
//! | `body_idle_timeout` (POST: handler; responses: connection level) | 30 s | POST: segment closed, `408` + `Connection: close`; response: connection dropped |
//! | `max_waiting_subscribers_per_channel` | 128 | `503` with a text body |
//! | `max_waiting_subscribers` (all channels) | 2048 | `503` with a text body |
//!
//! None of them is a whole-request timeout (`docs/trickle.md`, "Server limits"): a request that is
//! legitimately waiting (a preconnected POST before its first byte, a GET before its segment has
//! data) is never timed. The exact rules:
//!
//! - **Connections.** Over the cap a refused connection gets its 503 at once (one non-blocking
//!   write), a FIN, and its request is drained for at most 0.5 s so that closing does not reset
//!   the answer away before the client reads it; at most [`REFUSAL_SLOTS`] refusals linger at
//!   once, beyond that a connection is closed without an answer. Open sockets therefore stay
//!   below `max_connections + REFUSAL_SLOTS + 1`. [`serve_router`] warns at start when
//!   `RLIMIT_NOFILE` is lower than `max_connections + 256` ([`raise_fd_limit`] raises it).
//! - **Request head** (`header_read_timeout`): hyper 1's `http1::Builder::header_read_timeout`
//!   with a tokio timer. hyper starts the clock when it begins reading a request head: at
//!   accept, and again when a keep-alive connection has finished its previous response (so it
//!   is also the keep-alive idle limit). It is one fixed deadline, not reset by partial bytes
//!   (a slowloris drip does not extend it), and stops once the head is complete (a request
//!   waiting in its handler is never affected). When it fires, hyper only ends the connection
//!   future with an error (`Error::is_timeout`): it writes no response (its automatic
//!   400/431/414 answers are for parse errors) and would just drop the socket. [`serve_router`]
//!   takes the socket back (`into_parts`): when hyper holds part of a request head
//!   (`Parts::read_buf` not empty) it writes `408 Request Timeout` with `Connection: close` and
//!   closes (the client is mid-request, so the answer cannot be mistaken); a connection that
//!   sent nothing (fresh, or idle between keep-alive requests) is closed silently, because a
//!   408 there can cross a request the client is sending at that moment and be taken for its
//!   answer. (Go's net/http and nginx close every such connection silently.)
//! - **POST body** (`body_idle_timeout`): the wait for the first body byte is never timed (a
//!   preconnected POST legitimately waits for the publisher's next keyframe; `docs/trickle.md`,
//!   "Publishing a segment", step 2). From the first non-empty chunk on, each next chunk (or the
//!   end of the body) must arrive within the timeout; if not, the segment is closed (its
//!   subscribers get the bytes so far and a clean end of their chunked body) and the POST is
//!   answered `408 Request Timeout` with `Connection: close`.
//! - **Abandoned segment** (`body_idle_timeout`; a deviation from the reference, `docs/trickle.md`,
//!   "Publishing a segment", step 6): when a POST body fails after the segment has bytes (the
//!   publisher disconnects mid-body, a bad chunk), the POST is answered 500 and the segment stays
//!   open as in the reference, so that a re-POST can append to it (`docs/trickle.md`, "Seq rules",
//!   re-POST appends) or a DELETE end it; but once no byte has arrived for the timeout while no
//!   POST is attached, it is closed, so its subscribers get the bytes so far and a clean end
//!   instead of hanging until the ring slot is reused.
//! - **Response write** (`body_idle_timeout`, connection level): a socket write that cannot
//!   make progress (the peer stopped reading and the socket buffers are full) for the timeout
//!   drops the connection, and with it the response body: for a subscriber, its place in the
//!   segment. Waiting for data to send (a GET waiting for its segment or its next chunk) is not
//!   a stuck write and is never timed; a slow reader that takes some bytes at least once per
//!   timeout is never dropped.
//! - **Waiting subscribers** (`max_waiting_subscribers_per_channel`, `max_waiting_subscribers`): a
//!   GET counts as waiting from the moment it finds its segment without data (a precreated future
//!   segment, or one whose publisher has sent no byte yet) until the first byte arrives, the
//!   segment closes or the client goes away: the time during which it has been sent no response
//!   headers. One beyond either cap is answered `503 Service Unavailable` with a text body naming
//!   the cap (clients retry: `docs/trickle.md`, subscriber rule S3.5). A subscriber already
//!   streaming is not counted (the connection cap bounds those).

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

mod conn;
pub use conn::{ConnectionLimits, ConnectionStats, REFUSAL_SLOTS, raise_fd_limit, serve_router};

/// Name of the changefeed channel (`docs/trickle.md`, "Close, idle sweep, changefeed").
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
    /// Most connections served at once on the port (connection level: where the router is
    /// mounted in a host's app, the whole port). One more is accepted, answered 503 with
    /// `Connection: close` and closed. 0: no limit.
    pub max_connections: usize,
    /// A connection must deliver a complete request head within this time of being accepted
    /// or of finishing its previous response (so it also closes idle keep-alive connections);
    /// partial bytes do not extend it. A connection holding part of a head is answered 408, an
    /// idle one is closed silently. Zero: no timeout.
    pub header_read_timeout: Duration,
    /// Idle-body timeout, both directions. POST: once the body has delivered its first byte, no
    /// further byte for this long closes the segment (readers get the bytes so far and a clean end)
    /// and answers 408; the wait for the first byte is never timed (preconnect). A segment whose
    /// POST body failed after some bytes (`docs/trickle.md`, "Publishing a segment", step 6) is
    /// closed once no byte has arrived for this long and no other POST is attached. Responses
    /// (connection level): a write that makes no progress for this long (the peer stopped reading)
    /// drops the connection; waiting for data to send is never timed. Zero: no timeout.
    pub body_idle_timeout: Duration,
    /// Most GETs per channel waiting for the first byte of a segment (no response sent yet);
    /// one more is answered 503. 0: no limit.
    pub max_waiting_subscribers_per_channel: usize,
    /// Most GETs waiting for a first byte over all channels; one more is answered 503.
    /// 0: no limit.
    pub max_waiting_subscribers: usize,
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
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            max_waiting_subscribers_per_channel: DEFAULT_MAX_WAITING_SUBSCRIBERS_PER_CHANNEL,
            max_waiting_subscribers: DEFAULT_MAX_WAITING_SUBSCRIBERS,
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

    /// The connection-level limits for [`serve_router`]: `max_connections`,
    /// `header_read_timeout`, and `body_idle_timeout` as the response write idle timeout.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            write_idle_timeout: self.body_idle_timeout,
        }
    }
}

/// Default [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default [`ServerConfig::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ServerConfig::body_idle_timeout`].
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`ServerConfig::max_waiting_subscribers_per_channel`].
pub const DEFAULT_MAX_WAITING_SUBSCRIBERS_PER_CHANNEL: usize = 128;
/// Default [`ServerConfig::max_waiting_subscribers`].
pub const DEFAULT_MAX_WAITING_SUBSCRIBERS: usize = 2048;

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
    /// When the last byte arrived (for closing abandoned segments).
    last_append: Option<Instant>,
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
            st.last_append = Some(Instant::now());
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
    /// GETs waiting for the first byte of a segment of this channel.
    pub waiting_subscribers: usize,
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
    /// GETs waiting for the first byte of a segment ([`WaitSlot`]).
    waiting: AtomicUsize,
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
            waiting: AtomicUsize::new(0),
        })
    }

    fn is_closed(&self) -> bool {
        self.state.lock().unwrap().closed
    }

    /// The segment a POST to `seq` writes into, and its seq (`-1` resolved to `nextWrite`):
    /// reused, or a new one replacing and closing whatever older segment held the slot. With
    /// `reset` (`Lp-Trickle-Reset`), every ring segment with a lower seq is closed; segments
    /// ahead of it (preconnects) are left alone. Resolution, slot and reset happen under one
    /// lock, as in the reference, so a concurrent write cannot slip between them. See
    /// `docs/trickle.md`, "Publishing a segment".
    fn segment_for_post(&self, seq: i64, reset: bool) -> (i64, Arc<Segment>) {
        let mut st = self.state.lock().unwrap();
        let seq = if seq == -1 { st.next_write } else { seq };
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
        (seq, seg)
    }

    /// Resolves a GET's seq and applies the precreation rule (`docs/trickle.md`, "Seq rules").
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

    /// The first byte arrived for `seq`: `nextWrite = seq + 1` (also backwards: a publisher
    /// that restarts at a lower seq moves the write head back, as in the reference).
    fn mark_written(&self, seq: i64) {
        let mut st = self.state.lock().unwrap();
        st.next_write = seq.saturating_add(1);
        st.write_time = Instant::now();
    }

    /// `seq` ended with zero bytes (an empty body, or a preconnect released by a close): it
    /// consumes its seq, `nextWrite = seq + 1`, but (a Rivulet refinement) never backwards: a
    /// preconnect released late, by a reset or a ring overwrite, must not pull the write head
    /// back behind segments already written. See `docs/trickle.md`, "Empty writes".
    fn mark_written_empty(&self, seq: i64) {
        let mut st = self.state.lock().unwrap();
        st.next_write = st.next_write.max(seq.saturating_add(1));
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

    /// DELETE of one seq (`docs/trickle.md`, "Endpoints"). `Err` when the slot holds another seq.
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
        let (seq, seg) = self.segment_for_post(-1, false);
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
    /// GETs waiting for a first byte, all channels together ([`WaitSlot`]).
    waiting: AtomicUsize,
}

/// Increments `counter` unless it has reached `cap` (0: no cap).
fn try_increment(counter: &AtomicUsize, cap: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (cap == 0 || n < cap).then_some(n + 1)
        })
        .is_ok()
}

/// A GET's place among the subscribers waiting for a first byte; given back on drop (the
/// first byte arrived, the segment closed, or the client went away).
struct WaitSlot {
    inner: Arc<Inner>,
    channel: Arc<Channel>,
}

/// Which waiting-subscriber cap refused a GET.
enum WaitFull {
    Channel(usize),
    Total(usize),
}

impl WaitSlot {
    fn acquire(inner: &Arc<Inner>, channel: &Arc<Channel>) -> Result<Self, WaitFull> {
        let per_channel = inner.config.max_waiting_subscribers_per_channel;
        let total = inner.config.max_waiting_subscribers;
        if !try_increment(&channel.waiting, per_channel) {
            return Err(WaitFull::Channel(per_channel));
        }
        if !try_increment(&inner.waiting, total) {
            channel.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(WaitFull::Total(total));
        }
        Ok(Self {
            inner: inner.clone(),
            channel: channel.clone(),
        })
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.channel.waiting.fetch_sub(1, Ordering::AcqRel);
        self.inner.waiting.fetch_sub(1, Ordering::AcqRel);
    }
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
                waiting: AtomicUsize::new(0),
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
    /// (`Router::merge`). A host serving it itself should do so with [`serve_router`] and
    /// [`ServerConfig::connection_limits`], as [`serve`] does: that applies the connection cap,
    /// the header and write timeouts, and sets `TCP_NODELAY` (without it, Nagle's algorithm
    /// and delayed ACKs can hold small chunks back for tens of milliseconds).
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
            waiting_subscribers: ch.waiting.load(Ordering::Acquire),
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

    /// GETs waiting for the first byte of a segment, over all channels (capped by
    /// [`ServerConfig::max_waiting_subscribers`]).
    pub fn waiting_subscribers(&self) -> usize {
        self.inner.waiting.load(Ordering::Acquire)
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

fn text_owned(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        body,
    )
        .into_response()
}

fn too_many_waiting(full: WaitFull) -> Response {
    let body = match full {
        WaitFull::Channel(cap) => format!(
            "Service Unavailable: too many subscribers waiting on this channel (the server's \
             limit of {cap} per channel is reached); retry later"
        ),
        WaitFull::Total(cap) => format!(
            "Service Unavailable: too many subscribers waiting (the server's limit of {cap} \
             is reached); retry later"
        ),
    };
    text_owned(StatusCode::SERVICE_UNAVAILABLE, body)
}

fn body_idle(timeout: Duration) -> Response {
    connection_close(text_owned(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "Request Timeout: no body data for {} ms; the segment was closed with the bytes \
             received so far",
            timeout.as_millis()
        ),
    ))
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

/// `GET {base}{channel}/next` (go-livepeer 2026): 200 with the channel's `nextWrite` as the
/// plain-text body and in `Lp-Trickle-Latest`, plus `Lp-Trickle-Closed` when the channel is
/// closed. Read only: it creates no segment and moves no counter. See `docs/trickle.md`,
/// "The next seq".
fn next_response(ch: &Channel) -> Response {
    let (next, closed) = {
        let st = ch.state.lock().unwrap();
        (st.next_write, st.closed)
    };
    let mut resp = with_header(next.to_string().into_response(), H_LATEST, hv_i64(next));
    if closed {
        resp = with_header(resp, H_CLOSED, closed_value());
    }
    resp
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
        return next_response(&ch);
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
    // A GET that is going to wait for the first byte takes a waiting slot, kept until the first
    // chunk (or the end) arrives.
    let slot = {
        let st = seg.state.lock().unwrap();
        st.len == 0 && !st.closed
    }
    .then(|| WaitSlot::acquire(&server.inner, &ch))
    .transpose();
    let slot = match slot {
        Ok(slot) => slot,
        Err(full) => {
            tracing::debug!(channel, seq, "subscriber refused: waiting cap reached");
            return too_many_waiting(full);
        }
    };
    let mut reader = seg.reader();
    // Nothing at all (not even headers) goes out until the first chunk exists.
    let first = reader.next_chunk().await;
    drop(slot);
    let (latest, closed) = {
        let st = ch.state.lock().unwrap();
        (st.next_write, st.closed)
    };
    let Some(first) = first else {
        // Closed with zero bytes (`docs/trickle.md`, "Subscribing", step 4).
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

/// `POST {base}{channel}/{seq}`: publish a segment (`docs/trickle.md`, "Publishing a segment").
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
    let reset = header_str(&headers, HEADER_RESET).is_some();
    let (seq, seg) = ch.segment_for_post(seq, reset);
    if reset {
        tracing::debug!(channel, seq, "Lp-Trickle-Reset: older segments closed");
    }
    let _writer = WriterGuard::new(&seg);
    let mut changed = seg.changed.subscribe();
    // A re-POST to an already closed segment appends (`docs/trickle.md`, "Seq rules"); only a close
    // that happens while this POST waits releases it.
    let releasable = !seg.is_closed();
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    // The cap is per segment: a re-POST appends to what is already there.
    let already = seg.state.lock().unwrap().len;

    // Wait for the first byte (`docs/trickle.md`, "Publishing a segment", step 2), or for the
    // segment to be closed under us.
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
    // Once the body flows, each further chunk must come within the idle-body timeout.
    let idle = Some(server.inner.config.body_idle_timeout).filter(|d| !d.is_zero());
    let mut next = first;
    loop {
        match next {
            Some(Ok(chunk)) if chunk.is_empty() => {}
            Some(Ok(chunk)) => {
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
                // The segment stays open (`docs/trickle.md`, "Publishing a segment", step 6); a
                // DELETE, overwrite, reset or close ends it, and (Rivulet) the idle-body timeout
                // once no byte has come for that long.
                tracing::debug!(channel, seq, %err, "publisher body read error");
                if let Some(limit) = idle
                    && already + written > 0
                {
                    close_when_abandoned(&seg, limit);
                }
                return text(StatusCode::INTERNAL_SERVER_ERROR, "Server error");
            }
            None => break,
        }
        next = match idle {
            None => stream.next().await,
            Some(limit) => match tokio::time::timeout(limit, stream.next()).await {
                Ok(item) => item,
                Err(_) => {
                    tracing::info!(
                        channel,
                        seq,
                        bytes = written,
                        timeout_ms = limit.as_millis() as u64,
                        "publisher body idle: segment closed, answering 408"
                    );
                    seg.close();
                    return body_idle(limit);
                }
            },
        };
    }
    let mut resp = with_header(StatusCode::OK.into_response(), H_SEQ, hv_i64(seq));
    if written == 0 {
        // Empty EOF (or a released preconnect): the seq is consumed all the same.
        ch.mark_written_empty(seq);
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

/// Closes `seg` once no byte has arrived for `limit` and no POST is attached to it, unless
/// something else closes it first (its POST body failed after some bytes: `docs/trickle.md`,
/// "Publishing a segment", step 6).
fn close_when_abandoned(seg: &Arc<Segment>, limit: Duration) {
    let weak = Arc::downgrade(seg);
    tokio::spawn(async move {
        loop {
            let Some(seg) = weak.upgrade() else {
                return; // gone from the ring and from every reader
            };
            let last = {
                let st = seg.state.lock().unwrap();
                if st.closed {
                    return;
                }
                st.last_append.unwrap_or_else(Instant::now)
            };
            let due = last + limit;
            let wait = if Instant::now() < due {
                due
            } else if seg.writers.load(Ordering::Relaxed) == 0 {
                tracing::debug!(seq = seg.seq, "abandoned segment closed");
                seg.close();
                return;
            } else {
                // A re-POST is attached (`docs/trickle.md`, "Seq rules"): its own rules apply; look
                // again later.
                Instant::now() + limit
            };
            drop(seg);
            tokio::time::sleep_until(wait.into()).await;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Serving

/// A running server started by [`serve`].
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    server: TrickleServer,
    connections: ConnectionStats,
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

    /// The port's connection counters (open, refused, timeouts).
    pub fn connections(&self) -> &ConnectionStats {
        &self.connections
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

/// Serves `server.router()` on `listener` in a spawned task, through [`serve_router`] with the
/// server's [`ServerConfig::connection_limits`] (TCP_NODELAY on every connection).
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: TrickleServer,
) -> std::io::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let router = server.router();
    let limits = server.config().connection_limits();
    let connections = ConnectionStats::default();
    let task = tokio::spawn(serve_router(
        listener,
        router,
        limits,
        connections.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    tracing::info!(%addr, base = server.base_path(), "trickle server listening");
    Ok(ServerHandle {
        addr,
        server,
        connections,
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

    #[tokio::test]
    async fn next_on_a_closed_channel_says_so() {
        let ch = Channel::new("video/MP2T");
        let (seq, seg) = ch.segment_for_post(-1, false);
        assert_eq!(seq, 0);
        seg.append(Bytes::from_static(b"x"));
        ch.mark_written(seq);
        // Open: no Lp-Trickle-Closed.
        let open = next_response(&ch);
        assert_eq!(open.status(), StatusCode::OK);
        assert!(open.headers().get(H_CLOSED).is_none());
        // Closed (the race window before the channel leaves the map): the same answer plus
        // Lp-Trickle-Closed.
        ch.close();
        let closed = next_response(&ch);
        assert_eq!(closed.status(), StatusCode::OK);
        assert_eq!(closed.headers()[H_LATEST], "1");
        assert_eq!(closed.headers()[H_CLOSED], "terminated");
        let body = axum::body::to_bytes(closed.into_body(), 64).await.unwrap();
        assert_eq!(&body[..], b"1");
    }

    #[test]
    fn reset_closes_lower_segments_only_and_resolves_minus_one() {
        let ch = Channel::new("video/MP2T");
        let (_, s0) = ch.segment_for_post(0, false);
        s0.append(Bytes::from_static(b"a"));
        ch.mark_written(0);
        let (_, s2) = ch.segment_for_post(2, false); // a preconnect ahead
        let (seq, s1) = ch.segment_for_post(-1, true);
        assert_eq!(seq, 1, "-1 resolves to nextWrite");
        assert!(s0.is_closed(), "older segment closed by the reset");
        assert!(
            !s1.is_closed() && !s2.is_closed(),
            "target and ahead left open"
        );
    }

    #[test]
    fn base_path_normalisation() {
        assert_eq!(normalize_base("/"), "/");
        assert_eq!(normalize_base(""), "/");
        assert_eq!(normalize_base("ai/trickle"), "/ai/trickle/");
        assert_eq!(normalize_base("/ai/trickle/"), "/ai/trickle/");
    }
}
