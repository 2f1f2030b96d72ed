// SPDX-License-Identifier: MPL-2.0
//! Bounded HTTP/1.1 serving: the accept loop and per-connection limits shared by the standalone
//! trickle server ([`super::serve`]) and the daemon's port ([`serve_router`]).
//!
//! What is bounded here, per listening port (see the [`super`] module docs for the rules):
//! - open connections ([`ConnectionLimits::max_connections`]): one over the cap is accepted,
//!   answered `503 Service Unavailable` with `Connection: close` and closed;
//! - the request head ([`ConnectionLimits::header_read_timeout`]): hyper's header read timeout;
//!   a connection holding part of a request head is answered `408 Request Timeout`;
//! - a stuck response write ([`ConnectionLimits::write_idle_timeout`]): the connection is
//!   dropped, which drops the response body (a subscriber's place in its segment).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

/// Connections refused over the cap that may linger at once (writing the 503 and draining the
/// client's request so that closing does not reset the connection before the client has read
/// the answer). Beyond it a refused connection is closed at once, without an answer.
pub const REFUSAL_SLOTS: usize = 64;

/// How long a refused connection is drained at most before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// The most bytes drained from a refused connection.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

/// File descriptors kept free beyond `max_connections` when checking `RLIMIT_NOFILE` (the
/// listener, refusals, the process's own files and sockets).
const FD_RESERVE: u64 = 256;

/// Connection-level limits of one listening port ([`serve_router`]). A zero value turns that
/// limit off. [`Default`] is the same as [`super::ServerConfig::default`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Time a connection has to deliver a complete request head, counted from when it was
    /// accepted or finished its previous response (so it also closes idle keep-alive
    /// connections). Not reset by partial bytes.
    pub header_read_timeout: Duration,
    /// A response write that makes no progress (the peer does not read) for this long drops
    /// the connection.
    pub write_idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        super::ServerConfig::default().connection_limits()
    }
}

/// Live counters of a port served by [`serve_router`]. Cheap to clone (an `Arc`).
#[derive(Debug, Clone, Default)]
pub struct ConnectionStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    open: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    write_timeouts: AtomicU64,
}

impl ConnectionStats {
    /// Connections being served now (refused ones not counted).
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Connections accepted for serving so far.
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Connections refused (503) because the cap was reached.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Connections closed because their request head did not arrive in time.
    pub fn header_timeouts(&self) -> u64 {
        self.inner.header_timeouts.load(Ordering::Relaxed)
    }

    /// Connections dropped because a response write made no progress in time.
    pub fn write_timeouts(&self) -> u64 {
        self.inner.write_timeouts.load(Ordering::Relaxed)
    }
}

/// Counts a connection as open while it lives (also when its task is aborted).
struct OpenGuard(ConnectionStats);

impl OpenGuard {
    fn new(stats: &ConnectionStats) -> Self {
        stats.inner.open.fetch_add(1, Ordering::Relaxed);
        stats.inner.accepted.fetch_add(1, Ordering::Relaxed);
        Self(stats.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.inner.open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Serves `router` over HTTP/1.1 on `listener` with the connection `limits`, until `shutdown`
/// resolves; then stops accepting, lets every open connection finish its current request
/// (keep-alive off) and returns once they have all closed. Dropping (or aborting) the future
/// drops every connection at once.
///
/// Every accepted connection gets `TCP_NODELAY`. The limits apply to everything served on the
/// port: mounted in a host's router (as the daemon does), the host's own routes too.
pub async fn serve_router<F>(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    stats: ConnectionStats,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let cap = if limits.max_connections == 0 {
        Semaphore::MAX_PERMITS
    } else {
        limits.max_connections.min(Semaphore::MAX_PERMITS)
    };
    check_fd_limit(limits.max_connections);
    let permits = Arc::new(Semaphore::new(cap));
    let refusals = Arc::new(Semaphore::new(REFUSAL_SLOTS));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(nonzero(limits.header_read_timeout));
    let builder = Arc::new(builder);
    let service = TowerToHyperService::new(router);
    let (close_tx, close_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut last_full_warning: Option<Instant> = None;
    let mut refused_since_warning: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(err) = done
                    && err.is_panic()
                {
                    tracing::error!(%err, "a connection task panicked");
                }
            }
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _peer)) => tcp,
                    Err(err) if is_connection_error(&err) => continue,
                    Err(err) => {
                        // EMFILE/ENFILE and the like: back off instead of spinning.
                        tracing::warn!(%err, "cannot accept a connection; retrying in 100 ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if let Err(err) = tcp.set_nodelay(true) {
                    tracing::debug!(%err, "cannot set TCP_NODELAY");
                }
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tasks.spawn(serve_connection(
                            tcp,
                            builder.clone(),
                            service.clone(),
                            limits,
                            stats.clone(),
                            close_rx.clone(),
                            permit,
                        ));
                    }
                    Err(_) => {
                        stats.inner.refused.fetch_add(1, Ordering::Relaxed);
                        refused_since_warning += 1;
                        if last_full_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            tracing::warn!(
                                max_connections = limits.max_connections,
                                refused = refused_since_warning,
                                "connection limit reached: refusing new connections with 503"
                            );
                            last_full_warning = Some(Instant::now());
                            refused_since_warning = 0;
                        }
                        if let Ok(slot) = refusals.clone().try_acquire_owned() {
                            tasks.spawn(refuse(tcp, limits.max_connections, slot));
                        }
                        // else: too many refusals in flight; dropping `tcp` closes it.
                    }
                }
            }
        }
    }
    drop(listener);
    let _ = close_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Accept errors that concern one connection only (axum's list): go on accepting.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn serve_connection(
    tcp: TcpStream,
    builder: Arc<http1::Builder>,
    service: TowerToHyperService<Router>,
    limits: ConnectionLimits,
    stats: ConnectionStats,
    mut close: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let _open = OpenGuard::new(&stats);
    let io = ConnIo::new(tcp, nonzero(limits.write_idle_timeout));
    let mut conn = builder.serve_connection(io, service).with_upgrades();
    let mut closing = *close.borrow();
    if closing {
        Pin::new(&mut conn).graceful_shutdown();
    }
    let result = loop {
        tokio::select! {
            r = &mut conn => break r,
            changed = close.changed(), if !closing => {
                closing = true;
                if changed.is_ok() {
                    Pin::new(&mut conn).graceful_shutdown();
                }
            }
        }
    };
    let Err(err) = result else {
        return;
    };
    let Some(parts) = conn.into_parts() else {
        return; // upgraded
    };
    if parts.io.write_timed_out {
        stats.inner.write_timeouts.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            timeout_ms = limits.write_idle_timeout.as_millis() as u64,
            "dropped a connection whose peer stopped reading"
        );
    } else if err.is_timeout() {
        stats.inner.header_timeouts.fetch_add(1, Ordering::Relaxed);
        // hyper closes the connection without an answer. A client that sent part of a request
        // head gets a 408; an idle one (nothing sent, or an idle keep-alive connection) is
        // closed silently: a 408 there could be read as the answer to a request the client
        // sends at the same moment.
        let partial = !parts.read_buf.is_empty();
        tracing::debug!(partial, "request head timeout");
        if partial {
            let body = format!(
                "Request Timeout: the request head did not arrive within {} ms",
                limits.header_read_timeout.as_millis()
            );
            answer_and_close(parts.io.inner.into_inner(), 408, "Request Timeout", &body).await;
        }
    } else {
        tracing::trace!(%err, "connection ended with an error");
    }
}

fn raw_response(status: u16, reason: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Writes a short answer without waiting (it fits an empty socket buffer; if not, it is
/// dropped) and closes the connection (FIN).
async fn answer_and_close(mut tcp: TcpStream, status: u16, reason: &str, body: &str) {
    let _ = tcp.try_write(raw_response(status, reason, body).as_bytes());
    let _ = tcp.shutdown().await;
}

/// Over the cap: answer 503 at once, then drain what the client sends for a moment so that
/// closing does not reset the connection (a reset can destroy the answer before it is read).
async fn refuse(mut tcp: TcpStream, max: usize, _slot: OwnedSemaphorePermit) {
    let body = format!(
        "Service Unavailable: too many connections (the server's limit of {max} open connections is reached); retry later"
    );
    let _ = tcp.try_write(raw_response(503, "Service Unavailable", &body).as_bytes());
    let _ = tcp.shutdown().await;
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_BYTES {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// The connection's I/O: the TCP stream plus the write idle timer. The timer is armed when a
/// write (or flush) cannot make progress and disarmed by the next one that does; when it fires
/// the write fails with `TimedOut`, so hyper drops the connection.
struct ConnIo {
    inner: TokioIo<TcpStream>,
    write_idle: Option<Duration>,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stall_armed: bool,
    write_timed_out: bool,
}

impl ConnIo {
    fn new(tcp: TcpStream, write_idle: Option<Duration>) -> Self {
        Self {
            inner: TokioIo::new(tcp),
            write_idle,
            stall: None,
            stall_armed: false,
            write_timed_out: false,
        }
    }

    fn watch_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stall_armed = false;
            return r;
        }
        let Some(limit) = self.write_idle else {
            return r;
        };
        if !self.stall_armed {
            let deadline = tokio::time::Instant::now() + limit;
            match &mut self.stall {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.stall_armed = true;
        }
        if let Some(sleep) = &mut self.stall
            && sleep.as_mut().poll(cx).is_ready()
        {
            self.write_timed_out = true;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response write made no progress within the write idle timeout",
            )));
        }
        Poll::Pending
    }
}

impl Read for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl Write for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch_write(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch_write(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn nofile_limit() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// Raises the soft `RLIMIT_NOFILE` of the process to `want` file descriptors, at most to the
/// hard limit (never lowers it), and returns the soft limit now in force. A server with
/// `max_connections` N needs about N + 256; `u64::MAX` asks for the hard limit.
pub fn raise_fd_limit(want: u64) -> io::Result<u64> {
    let mut lim = nofile_limit()?;
    let hard = if lim.rlim_max == libc::RLIM_INFINITY {
        // The kernel refuses more than fs.nr_open (1 Mi by default) anyway.
        1 << 20
    } else {
        lim.rlim_max
    };
    let target = want.min(hard);
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < target {
        lim.rlim_cur = target;
        // SAFETY: setrlimit only reads the struct it is given, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(nofile_limit()?.rlim_cur)
}

/// Warns when the process may run out of file descriptors before reaching the connection cap
/// (then new connections wait in the listen backlog instead of getting a 503).
fn check_fd_limit(max_connections: usize) {
    if max_connections == 0 {
        return;
    }
    let need = max_connections as u64 + FD_RESERVE;
    match nofile_limit() {
        Ok(lim) if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < need => {
            tracing::warn!(
                max_connections,
                soft_limit = lim.rlim_cur,
                "RLIMIT_NOFILE is below max_connections + {FD_RESERVE}: raise `ulimit -n` (or \
                 call raise_fd_limit) or lower max_connections"
            );
        }
        _ => {}
    }
}
