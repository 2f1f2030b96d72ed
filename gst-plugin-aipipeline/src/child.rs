// SPDX-License-Identifier: MPL-2.0
//! Inference in a child process (`aipipeline isolation=process`).
//!
//! The element (parent) starts a helper process, by default `rivulet-inference`, with the
//! argument [`SUBCOMMAND`]; the daemon's `rivulet` binary accepts the same argument and runs
//! [`run`], so `child-path` may point to either. Two file descriptors are inherited:
//!
//! - fd 3: one end of a Unix `SOCK_SEQPACKET` socket pair carrying small JSON messages (one per
//!   packet): `load`, `frame`, `params`, `shutdown` from the parent; `loaded`, `load-failed`,
//!   `frame-done`, `frame-error`, `params-done`, `params-error` from the child. Every request
//!   but `shutdown` gets exactly one reply.
//! - fd 4: a `memfd` shared memory area holding the input frame's planes and, after them, the
//!   output slot (u8 RGB, width×height×3). The parent grows it when a frame needs more room and
//!   says so in each `frame` message (`shm-size`); the child remaps it then.
//!
//! The child runs the same conversion and model code as the in-process element
//! ([`crate::frame`], [`crate::model::process`]), so results are identical. Its stderr goes to
//! a pipe the parent keeps the last [`LOG_LINES`] lines of (reported with a restart).
//!
//! Parent death: the child gets `PR_SET_PDEATHSIG(SIGKILL)` (set between fork and exec, on the
//! element's long-lived spawner thread, since the signal follows the forking *thread*), and a
//! watchdog thread exits when `getppid()` changes; control socket EOF also ends it.

use std::collections::VecDeque;
use std::ffi::{CStr, OsString};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::device::{self, DeviceSpec};
use crate::frame::{self, PixelLayout, YuvMatrix};
use crate::model::{self, Runner};
use crate::pipeline::{Params, PipelineDef, Registry, Value};

/// First argument of the child process (`rivulet-inference aipipeline-child`, or the daemon's
/// `rivulet aipipeline-child`).
pub const SUBCOMMAND: &str = "aipipeline-child";
/// File name of the helper binary looked up when `child-path` is unset.
pub const BIN_NAME: &str = "rivulet-inference";
/// Environment variable carrying the parent's pid to the child (watchdog).
const ENV_PARENT: &str = "RIVULET_AIPIPELINE_PARENT_PID";
/// libgomp's idle policy, read once when the child loads libtorch. Its default lets worker
/// threads spin between parallel regions, which doubled the CPU of a live stream (one short
/// region per frame); the child gets `PASSIVE` unless the parent's environment sets it.
const ENV_OMP_WAIT_POLICY: &str = "OMP_WAIT_POLICY";
const DEFAULT_OMP_WAIT_POLICY: &str = "PASSIVE";
const CTRL_FD: RawFd = 3;
const SHM_FD: RawFd = 4;
/// Largest control message.
const MAX_MSG: usize = 64 * 1024;
/// Child log lines kept by the parent.
pub const LOG_LINES: usize = 50;
/// How long a graceful shutdown may take before SIGKILL.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);
/// Watchdog period in the child.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(250);
/// How often a frame's wait checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// What the child loads: the element's settings that select the pipeline, plus params JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadSpec {
    pub pipeline: String,
    pub model: Option<String>,
    pub pipelines_dir: Option<String>,
    pub device: String,
    pub fp16: bool,
    /// Params JSON, used when `resolved` is None.
    pub params: String,
    /// Params as the parent resolved them (exactly what the in-process element would use).
    pub resolved: Option<WireParams>,
}

/// [`Params`] on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireParams {
    width: u32,
    height: u32,
    show_reloading_frame: bool,
    model: Option<PathBuf>,
    values: Vec<(String, WireValue)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum WireValue {
    Number(f64),
    Vector(Vec<f64>),
    Bool(bool),
    Text(String),
}

impl From<&Params> for WireParams {
    fn from(p: &Params) -> Self {
        WireParams {
            width: p.width,
            height: p.height,
            show_reloading_frame: p.show_reloading_frame,
            model: p.model.clone(),
            values: p
                .values
                .iter()
                .map(|(k, v)| {
                    let w = match v {
                        Value::Number(x) => WireValue::Number(*x),
                        Value::Vector(x) => WireValue::Vector(x.clone()),
                        Value::Bool(x) => WireValue::Bool(*x),
                        Value::Text(x) => WireValue::Text(x.clone()),
                    };
                    (k.clone(), w)
                })
                .collect(),
        }
    }
}

impl From<WireParams> for Params {
    fn from(w: WireParams) -> Self {
        Params {
            width: w.width,
            height: w.height,
            show_reloading_frame: w.show_reloading_frame,
            model: w.model,
            values: w
                .values
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        WireValue::Number(x) => Value::Number(x),
                        WireValue::Vector(x) => Value::Vector(x),
                        WireValue::Bool(x) => Value::Bool(x),
                        WireValue::Text(x) => Value::Text(x),
                    };
                    (k, v)
                })
                .collect(),
        }
    }
}

/// Input frame layout in shared memory.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum InputLayout {
    Packed {
        bpp: i64,
        first: i64,
        bgr: bool,
    },
    Yuv420 {
        nv12: bool,
        kr: f64,
        kb: f64,
        full_range: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FrameReq {
    shm_size: u64,
    layout: InputLayout,
    width: u32,
    height: u32,
    /// (offset, length, stride) per plane.
    planes: Vec<(u64, u64, u64)>,
    out_w: u32,
    out_h: u32,
    out_offset: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum Request {
    Load(LoadSpec),
    Frame(FrameReq),
    Params { params: WireParams },
    Shutdown,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum Reply {
    Loaded {
        warmup_us: u64,
        device: String,
    },
    LoadFailed {
        msg: String,
    },
    /// `compute_us`: the child's time for the frame (conversion, pipeline, output copy).
    FrameDone {
        compute_us: u64,
    },
    FrameError {
        msg: String,
    },
    ParamsDone,
    ParamsError {
        msg: String,
    },
}

/// Why a request to the child failed.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The child is gone (exited, killed, crashed) or the socket broke.
    #[error("inference child died: {0}")]
    Died(String),
    /// No reply within the timeout.
    #[error("inference child hung: no reply in {0} ms")]
    Hung(u128),
    /// The wait was given up on request (the element's `restart-child`): replace the child.
    #[error("inference child replaced on request (restart-child)")]
    Cancelled,
    /// The child reported an error for this request (it is still alive).
    #[error("{0}")]
    Failed(String),
}

impl ChildError {
    /// The child is unusable and must be replaced.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ChildError::Failed(_))
    }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

// ---- shared memory ----

struct Shm {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value; access goes through &self / &mut self.
unsafe impl Send for Shm {}

impl Shm {
    fn create() -> std::io::Result<Shm> {
        // SAFETY: plain syscall with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"rivulet-aipipeline".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: fd was just returned to us and is owned by nobody else.
        Ok(Shm {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            ptr: std::ptr::null_mut(),
            len: 0,
        })
    }

    fn unmap(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: ptr/len describe a mapping made by `map` and not yet unmapped.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
        self.ptr = std::ptr::null_mut();
        self.len = 0;
    }

    /// Maps `len` bytes of the fd (the fd must already be that large).
    fn map(&mut self, len: usize) -> std::io::Result<()> {
        self.unmap();
        if len == 0 {
            return Ok(());
        }
        // SAFETY: a fresh shared mapping of our own fd; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        self.ptr = p.cast();
        self.len = len;
        Ok(())
    }

    fn grow(&mut self, len: usize) -> std::io::Result<()> {
        // SAFETY: ftruncate on our own fd.
        if unsafe { libc::ftruncate(self.fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(errno());
        }
        self.map(len)
    }

    fn bytes(&self) -> &[u8] {
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: ptr/len is a live mapping owned by self; the other process only writes to it
        // while we wait for its reply (one request at a time), never while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        if self.ptr.is_null() {
            return &mut [];
        }
        // SAFETY: as in `bytes`, exclusively borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        self.unmap();
    }
}

// ---- control socket ----

fn send_msg<T: Serialize>(fd: RawFd, msg: &T) -> std::io::Result<()> {
    let buf = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    // SAFETY: buf is a valid slice; MSG_NOSIGNAL turns a closed peer into EPIPE.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(errno());
    }
    Ok(())
}

enum Recv<T> {
    Msg(T),
    Eof,
    Timeout,
}

/// Receives one message; `timeout` None waits forever. Interrupted waits are retried.
fn recv_msg<T: for<'de> Deserialize<'de>>(
    fd: RawFd,
    timeout: Option<Duration>,
) -> std::io::Result<Recv<T>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Recv::Timeout);
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = errno();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue; // the deadline check above decides
        }
        let mut buf = vec![0u8; MAX_MSG];
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = errno();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(Recv::Eof);
        }
        buf.truncate(n as usize);
        return serde_json::from_slice(&buf)
            .map(Recv::Msg)
            .map_err(std::io::Error::other);
    }
}

// ---- parent side ----

/// How to start the child: program and leading arguments.
#[derive(Clone, Debug)]
pub struct ChildCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl ChildCommand {
    /// `program aipipeline-child`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: vec![SUBCOMMAND.into()],
        }
    }

    /// `child-path` if set, else `rivulet-inference` next to the plugin's shared object, next
    /// to the current executable, then on `PATH`.
    pub fn locate(child_path: Option<&str>) -> Result<Self, String> {
        if let Some(p) = child_path.filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            if !p.is_file() {
                return Err(format!("child-path {} is not a file", p.display()));
            }
            return Ok(Self::new(p));
        }
        let mut tried = Vec::new();
        let mut dirs = Vec::new();
        if let Some(d) = plugin_dir() {
            dirs.push(d);
        }
        if let Some(d) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            dirs.push(d);
        }
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        for d in dirs {
            let c = d.join(BIN_NAME);
            if c.is_file() {
                return Ok(Self::new(c));
            }
            tried.push(d.display().to_string());
        }
        Err(format!(
            "cannot find the {BIN_NAME} helper (looked next to the plugin, next to the program and on PATH: {}); set child-path",
            tried.join(", ")
        ))
    }
}

/// Directory of the shared object (or executable) this code lives in.
fn plugin_dir() -> Option<PathBuf> {
    // SAFETY: Dl_info is plain old data; all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let addr = plugin_dir as *const () as *const libc::c_void;
    // SAFETY: dladdr only reads the address; info is a valid out-pointer.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the dynamic loader.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes()));
    path.parent().map(Path::to_path_buf)
}

type Job = (ChildCommand, mpsc::SyncSender<Result<ChildProc, String>>);

/// A long-lived thread that forks the children: the parent-death signal is tied to the thread
/// that forked, so it must outlive the children (it ends when the element stops).
pub struct Spawner {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Spawner {
    pub fn new() -> Result<Arc<Spawner>, String> {
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("aipipeline-spawner".into())
            .spawn(move || {
                while let Ok((cmd, reply)) = rx.recv() {
                    let _ = reply.send(ChildProc::spawn_here(&cmd));
                }
            })
            .map_err(|e| format!("cannot start the spawner thread: {e}"))?;
        Ok(Arc::new(Spawner {
            tx: Mutex::new(Some(tx)),
            handle: Mutex::new(Some(handle)),
        }))
    }

    /// Starts a child (forked on the spawner thread).
    pub fn spawn(&self, cmd: &ChildCommand) -> Result<ChildProc, String> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let tx = self.tx.lock().unwrap().clone();
        let Some(tx) = tx else {
            return Err("the element is stopping".into());
        };
        tx.send((cmd.clone(), rtx))
            .map_err(|_| "the spawner thread is gone".to_string())?;
        rrx.recv()
            .map_err(|_| "the spawner thread is gone".to_string())?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.tx.lock().unwrap().take();
        if let Some(h) = self.handle.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

/// A running inference child, owned by the element.
pub struct ChildProc {
    child: Child,
    ctrl: OwnedFd,
    shm: Shm,
    logs: Arc<Mutex<VecDeque<String>>>,
    log_thread: Option<JoinHandle<()>>,
    reaped: bool,
    device: String,
    /// Output slot of the last frame (range in shared memory).
    last_out: std::ops::Range<usize>,
    /// The child's own time for the last frame.
    last_compute: Duration,
}

/// Longest log line kept (longer ones are cut).
const MAX_LINE: usize = 2000;

/// Reads the child's stderr until EOF: every line is logged and the last [`LOG_LINES`] kept.
/// Reads whatever bytes come (invalid UTF-8 is replaced, overlong lines are cut), so the child
/// never blocks on a full pipe.
fn read_logs(mut stderr: impl Read, pid: u32, logs: &Mutex<VecDeque<String>>) {
    let mut buf = [0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let keep = |line: &[u8]| {
        let text = String::from_utf8_lossy(line).trim_end().to_string();
        crate::aipipeline::log_child_line(pid, &text);
        let mut l = logs.lock().unwrap();
        if l.len() >= LOG_LINES {
            l.pop_front();
        }
        l.push_back(text);
    };
    loop {
        let n = match stderr.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for chunk in buf[..n].split_inclusive(|b| *b == b'\n') {
            let room = MAX_LINE.saturating_sub(line.len());
            let body = chunk.strip_suffix(b"\n").unwrap_or(chunk);
            line.extend_from_slice(&body[..body.len().min(room)]);
            if chunk.ends_with(b"\n") {
                keep(&line);
                line.clear();
            }
        }
    }
    if !line.is_empty() {
        keep(&line);
    }
}

fn describe_status(st: std::process::ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => {
            // SAFETY: strsignal returns a static string or NULL.
            let name = unsafe { libc::strsignal(s) };
            let name = if name.is_null() {
                String::new()
            } else {
                // SAFETY: non-null NUL-terminated string from libc.
                unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned()
            };
            format!("killed by signal {s} ({name})")
        }
        _ => "ended".into(),
    }
}

impl ChildProc {
    fn spawn_here(cmd: &ChildCommand) -> Result<ChildProc, String> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid out-array of two ints.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } != 0
        {
            return Err(format!("socketpair: {}", errno()));
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let shm = Shm::create().map_err(|e| format!("memfd_create: {e}"))?;
        // Duplicates above the target numbers so the dup2 calls below cannot clobber each other.
        let high = |fd: RawFd| -> Result<OwnedFd, String> {
            // SAFETY: fcntl on a valid fd.
            let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            if d < 0 {
                return Err(format!("fcntl: {}", errno()));
            }
            // SAFETY: d is a new fd we own.
            Ok(unsafe { OwnedFd::from_raw_fd(d) })
        };
        let ctrl_child = high(theirs.as_raw_fd())?;
        let shm_child = high(shm.fd.as_raw_fd())?;
        drop(theirs);
        let (c, s) = (ctrl_child.as_raw_fd(), shm_child.as_raw_fd());
        let parent = std::process::id();
        let mut command = Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .env(ENV_PARENT, parent.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls (prctl, dup2, getppid, kill) between fork and
        // exec; no allocation.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may already have died between fork and prctl.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                if libc::dup2(c, CTRL_FD) < 0 || libc::dup2(s, SHM_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if std::env::var_os(ENV_OMP_WAIT_POLICY).is_none_or(|v| v.is_empty()) {
            command.env(ENV_OMP_WAIT_POLICY, DEFAULT_OMP_WAIT_POLICY);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", cmd.program.display()))?;
        drop(ctrl_child);
        drop(shm_child);
        let logs = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_LINES)));
        let log_thread = child.stderr.take().and_then(|stderr| {
            let logs = logs.clone();
            let pid = child.id();
            std::thread::Builder::new()
                .name("aipipeline-child-log".into())
                .spawn(move || read_logs(stderr, pid, &logs))
                .ok()
        });
        Ok(ChildProc {
            child,
            ctrl: ours,
            shm,
            logs,
            log_thread,
            reaped: false,
            device: String::new(),
            last_out: 0..0,
            last_compute: Duration::ZERO,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The device the child loaded on (after a successful load).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Why the child is gone (reaps it, waiting a bounded time for it to finish dying).
    fn death_reason(&mut self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    self.reaped = true;
                    return format!("{what}: {}", describe_status(st));
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return what.to_string(),
            }
        }
    }

    fn call(&mut self, req: &Request, timeout: Duration) -> Result<Reply, ChildError> {
        self.call_or_cancel(req, timeout, &|| false)
    }

    /// As `call`, but the wait ends early (`ChildError::Cancelled`) once `cancelled` holds;
    /// it is checked every 100 ms.
    fn call_or_cancel(
        &mut self,
        req: &Request,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Reply, ChildError> {
        let fd = self.ctrl.as_raw_fd();
        if let Err(e) = send_msg(fd, req) {
            return Err(ChildError::Died(
                self.death_reason(&format!("control socket: {e}")),
            ));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if cancelled() {
                return Err(ChildError::Cancelled);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChildError::Hung(timeout.as_millis()));
            }
            return match recv_msg::<Reply>(fd, Some(left.min(CANCEL_POLL))) {
                Ok(Recv::Timeout) => continue,
                Ok(Recv::Msg(r)) => Ok(r),
                Ok(Recv::Eof) => Err(ChildError::Died(self.death_reason("control socket closed"))),
                Err(e) => Err(ChildError::Died(
                    self.death_reason(&format!("control socket: {e}")),
                )),
            };
        }
    }

    /// Loads the pipeline; waits up to `timeout`, checking `cancelled` every 200 ms.
    pub fn load(
        &mut self,
        spec: &LoadSpec,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Duration, ChildError> {
        let fd = self.ctrl.as_raw_fd();
        if let Err(e) = send_msg(fd, &Request::Load(spec.clone())) {
            return Err(ChildError::Died(
                self.death_reason(&format!("control socket: {e}")),
            ));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if cancelled() {
                return Err(ChildError::Failed("cancelled".into()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChildError::Hung(timeout.as_millis()));
            }
            match recv_msg::<Reply>(fd, Some(left.min(Duration::from_millis(200)))) {
                Ok(Recv::Timeout) => continue,
                Ok(Recv::Msg(Reply::Loaded { warmup_us, device })) => {
                    self.device = device;
                    return Ok(Duration::from_micros(warmup_us));
                }
                Ok(Recv::Msg(Reply::LoadFailed { msg })) => return Err(ChildError::Failed(msg)),
                Ok(Recv::Msg(other)) => {
                    return Err(ChildError::Failed(format!("unexpected reply {other:?}")));
                }
                Ok(Recv::Eof) => {
                    return Err(ChildError::Died(self.death_reason("control socket closed")));
                }
                Err(e) => {
                    return Err(ChildError::Died(
                        self.death_reason(&format!("control socket: {e}")),
                    ));
                }
            }
        }
    }

    /// Applies params that need no reload.
    pub fn set_params(&mut self, params: &Params, timeout: Duration) -> Result<(), ChildError> {
        match self.call(
            &Request::Params {
                params: params.into(),
            },
            timeout,
        )? {
            Reply::ParamsDone => Ok(()),
            Reply::ParamsError { msg } => Err(ChildError::Failed(msg)),
            other => Err(ChildError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// Runs one frame: copies the planes into shared memory and waits for the child; the u8 RGB
    /// output (out_w×out_h×3, tightly packed) is then in [`ChildProc::output`].
    #[allow(clippy::too_many_arguments)] // the frame's geometry, as frame::upload_* take it
    pub fn frame(
        &mut self,
        planes: &[&[u8]],
        strides: &[usize],
        width: u32,
        height: u32,
        layout: InputLayout,
        out_w: u32,
        out_h: u32,
        timeout: Duration,
    ) -> Result<(), ChildError> {
        self.frame_or_cancel(
            planes,
            strides,
            width,
            height,
            layout,
            out_w,
            out_h,
            timeout,
            &|| false,
        )
    }

    /// As [`ChildProc::frame`]; the wait for the reply ends early with
    /// [`ChildError::Cancelled`] once `cancelled` holds (checked every 100 ms), so a hung child
    /// can be replaced on request without waiting for the hang timeout.
    #[allow(clippy::too_many_arguments)] // as frame
    pub fn frame_or_cancel(
        &mut self,
        planes: &[&[u8]],
        strides: &[usize],
        width: u32,
        height: u32,
        layout: InputLayout,
        out_w: u32,
        out_h: u32,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), ChildError> {
        const ALIGN: usize = 64;
        let mut descr = Vec::with_capacity(planes.len());
        let mut off = 0usize;
        for (p, s) in planes.iter().zip(strides) {
            descr.push((off as u64, p.len() as u64, *s as u64));
            off = (off + p.len()).next_multiple_of(ALIGN);
        }
        let out_offset = off;
        let out_len = out_w as usize * out_h as usize * 3;
        let need = out_offset + out_len;
        if need > self.shm.len {
            let size = need.next_multiple_of(1 << 20);
            self.shm
                .grow(size)
                .map_err(|e| ChildError::Failed(format!("cannot grow shared memory: {e}")))?;
        }
        {
            let mem = self.shm.bytes_mut();
            for (p, (o, l, _)) in planes.iter().zip(&descr) {
                mem[*o as usize..(*o + *l) as usize].copy_from_slice(p);
            }
        }
        let req = Request::Frame(FrameReq {
            shm_size: self.shm.len as u64,
            layout,
            width,
            height,
            planes: descr,
            out_w,
            out_h,
            out_offset: out_offset as u64,
        });
        self.last_out = 0..0;
        match self.call_or_cancel(&req, timeout, cancelled)? {
            Reply::FrameDone { compute_us } => {
                self.last_out = out_offset..need;
                self.last_compute = Duration::from_micros(compute_us);
                Ok(())
            }
            Reply::FrameError { msg } => Err(ChildError::Failed(msg)),
            other => Err(ChildError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// The child's own processing time for the last successful frame (the rest of a
    /// [`ChildProc::frame`] call is transport: copies, socket round trip, wake-ups).
    pub fn last_compute(&self) -> Duration {
        self.last_compute
    }

    /// The output of the last successful frame.
    pub fn output(&self) -> &[u8] {
        self.shm.bytes().get(self.last_out.clone()).unwrap_or(&[])
    }

    /// Sends SIGKILL (if still running), reaps the child and returns its last log lines.
    pub fn kill(mut self) -> Vec<String> {
        self.kill_now();
        self.logs()
    }

    fn kill_now(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
        if let Some(h) = self.log_thread.take() {
            let _ = h.join();
        }
    }

    /// The last log lines of the child.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().iter().cloned().collect()
    }
}

impl Drop for ChildProc {
    /// Graceful shutdown: `shutdown`, wait at most 2 s for the exit, then SIGKILL; reaped.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = send_msg(self.ctrl.as_raw_fd(), &Request::Shutdown);
            let deadline = Instant::now() + SHUTDOWN_WAIT;
            while Instant::now() < deadline {
                match self.child.try_wait() {
                    Ok(Some(_)) | Err(_) => {
                        self.reaped = true;
                        break;
                    }
                    Ok(None) => {
                        // The socket hangs up when the child exits: wait for that, bounded.
                        let mut pfd = libc::pollfd {
                            fd: self.ctrl.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd.
                        unsafe { libc::poll(&mut pfd, 1, 20) };
                        if pfd.revents & libc::POLLIN != 0 {
                            // Drain a stray reply so the next poll waits again.
                            let _ = recv_msg::<serde_json::Value>(
                                self.ctrl.as_raw_fd(),
                                Some(Duration::from_millis(1)),
                            );
                        }
                    }
                }
            }
        }
        self.kill_now();
    }
}

// ---- child side ----

fn say(msg: &str) {
    eprintln!("{BIN_NAME}[{}]: {msg}", std::process::id());
}

struct Loaded {
    def: PipelineDef,
    runner: Runner,
    device: tch::Device,
}

fn load(spec: &LoadSpec) -> Result<(Loaded, Duration), String> {
    let dspec = spec
        .device
        .parse::<DeviceSpec>()
        .map_err(|e| e.to_string())?;
    let device = device::resolve(dspec)?;
    let half = spec.fp16 && device.is_cuda();
    let dir = spec.pipelines_dir.as_ref().map(PathBuf::from);
    let registry = Registry::scan(dir.as_deref());
    let def = registry
        .resolve(&spec.pipeline, spec.model.as_ref().map(PathBuf::from))
        .ok_or_else(|| {
            format!(
                "Unknown pipeline '{}'. Known pipelines: {}",
                spec.pipeline,
                registry.names().join(", ")
            )
        })?;
    let params = match &spec.resolved {
        Some(w) => Params::from(w.clone()),
        None => def.parse_params(&spec.params).map_err(|e| {
            format!(
                "Invalid params {} for pipeline '{}': {e}",
                spec.params, def.name
            )
        })?,
    };
    say(&format!(
        "loading pipeline '{}' on {} ({}x{})",
        def.name,
        device::describe(device),
        params.width,
        params.height
    ));
    let t0 = Instant::now();
    let runner = Runner::load(&def, &params, device, half).map_err(|e| e.to_string())?;
    say(&format!(
        "pipeline '{}' loaded in {:?}",
        def.name,
        t0.elapsed()
    ));
    let warm = runner.warmup_time();
    Ok((
        Loaded {
            def,
            runner,
            device,
        },
        warm,
    ))
}

fn frame_in_child(loaded: &Loaded, shm: &mut Shm, req: &FrameReq) -> Result<(), String> {
    if req.shm_size as usize != shm.len {
        shm.map(req.shm_size as usize)
            .map_err(|e| format!("cannot map shared memory: {e}"))?;
    }
    let mem = shm.bytes_mut();
    let out_len = req.out_w as usize * req.out_h as usize * 3;
    let out_end = (req.out_offset as usize)
        .checked_add(out_len)
        .filter(|e| *e <= mem.len())
        .ok_or("output slot outside shared memory")?;
    if req.planes.len() > 3 || req.planes.is_empty() {
        return Err("1 to 3 planes expected".into());
    }
    if req.planes.iter().any(|(o, l, _)| o + l > req.out_offset) {
        return Err("input plane overlaps the output slot".into());
    }
    let (input, output) = mem.split_at_mut(req.out_offset as usize);
    let output = &mut output[..out_end - req.out_offset as usize];
    let mut planes: [&[u8]; 3] = [&[]; 3];
    let mut strides = [0usize; 3];
    for (i, (o, l, s)) in req.planes.iter().enumerate() {
        planes[i] = &input[*o as usize..(*o + *l) as usize];
        strides[i] = *s as usize;
    }
    let n = req.planes.len();
    let crop = frame::cover_crop(req.width, req.height, req.out_w, req.out_h);
    let rgb = match req.layout {
        InputLayout::Packed { bpp, first, bgr } => frame::upload_rgb(
            planes[0],
            strides[0],
            req.width,
            req.height,
            PixelLayout { bpp, first, bgr },
            crop,
            loaded.device,
        ),
        InputLayout::Yuv420 {
            nv12,
            kr,
            kb,
            full_range,
        } => frame::upload_yuv420(
            &planes[..n],
            &strides[..n],
            req.width,
            req.height,
            nv12,
            YuvMatrix { kr, kb, full_range },
            crop,
            loaded.device,
        ),
    }
    .map_err(|e| e.to_string())?;
    let out = model::process(&loaded.runner, rgb, req.out_w, req.out_h)
        .map_err(|e| format!("Pipeline '{}' failed on a frame: {e}", loaded.def.name))?;
    frame::download_rgb(
        &out,
        output,
        req.out_w as usize * 3,
        req.out_w,
        req.out_h,
        3,
    )
    .map_err(|e| format!("Cannot write an output frame: {e}"))
}

/// The child's main function: serves requests on fd 3 until `shutdown` or EOF. Returns the
/// exit status.
pub fn run() -> i32 {
    let parent: Option<u32> = std::env::var(ENV_PARENT).ok().and_then(|p| p.parse().ok());
    let Some(parent) = parent else {
        eprintln!(
            "{BIN_NAME} is started by the aipipeline element (isolation=process), not by hand"
        );
        return 2;
    };
    // SAFETY: plain syscalls. PDEATHSIG is also set before exec; setting it again is harmless.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() as u32 != parent {
            return 1;
        }
    }
    for fd in [CTRL_FD, SHM_FD] {
        // SAFETY: F_GETFD only queries the fd.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            eprintln!("{BIN_NAME}: fd {fd} is not open: started without the aipipeline element?");
            return 2;
        }
    }
    let watchdog = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            loop {
                std::thread::sleep(WATCHDOG_PERIOD);
                // SAFETY: getppid has no preconditions.
                if unsafe { libc::getppid() } as u32 != parent {
                    say("parent process gone: exiting");
                    // SAFETY: immediate exit without running destructors (the main thread may
                    // be inside libtorch).
                    unsafe { libc::_exit(1) };
                }
            }
        });
    if let Err(e) = watchdog {
        say(&format!("cannot start the watchdog: {e}"));
        return 1;
    }
    // SAFETY: fds 3 and 4 were set up by the parent for us (checked open above) and nothing
    // else in this process owns them.
    let ctrl = unsafe { OwnedFd::from_raw_fd(CTRL_FD) };
    let mut shm = Shm {
        // SAFETY: as above.
        fd: unsafe { OwnedFd::from_raw_fd(SHM_FD) },
        ptr: std::ptr::null_mut(),
        len: 0,
    };
    let _no_grad = tch::no_grad_guard();
    let fd = ctrl.as_raw_fd();
    let mut loaded: Option<Loaded> = None;
    loop {
        let req = match recv_msg::<Request>(fd, None) {
            Ok(Recv::Msg(r)) => r,
            Ok(Recv::Eof) => return 0,
            Ok(Recv::Timeout) => continue,
            Err(e) => {
                say(&format!("bad control message: {e}"));
                return 1;
            }
        };
        let started = Instant::now();
        let reply = match req {
            Request::Shutdown => return 0,
            Request::Load(spec) => match load(&spec) {
                Ok((l, warm)) => {
                    let device = device::describe(l.device);
                    loaded = Some(l);
                    Reply::Loaded {
                        warmup_us: warm.as_micros() as u64,
                        device,
                    }
                }
                Err(msg) => {
                    say(&format!("load failed: {msg}"));
                    Reply::LoadFailed { msg }
                }
            },
            Request::Frame(f) => match &loaded {
                None => Reply::FrameError {
                    msg: "no pipeline loaded".into(),
                },
                Some(l) => match frame_in_child(l, &mut shm, &f) {
                    Ok(()) => Reply::FrameDone {
                        compute_us: started.elapsed().as_micros() as u64,
                    },
                    Err(msg) => Reply::FrameError { msg },
                },
            },
            Request::Params { params } => match loaded.as_mut() {
                None => Reply::ParamsError {
                    msg: "no pipeline loaded".into(),
                },
                Some(l) => match l.runner.set_params(&Params::from(params)) {
                    Ok(()) => Reply::ParamsDone,
                    Err(msg) => Reply::ParamsError { msg },
                },
            },
        };
        if let Err(e) = send_msg(fd, &reply) {
            say(&format!("cannot reply: {e}"));
            return 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_keep_the_last_lines_cut_long_ones_and_survive_bad_utf8() {
        let mut input = Vec::new();
        for i in 0..(LOG_LINES + 10) {
            input.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        input.extend_from_slice(b"bad \xff utf8\n");
        input.extend_from_slice(&vec![b'x'; MAX_LINE * 3]);
        input.extend_from_slice(b"\nno newline at the end");
        let logs = Mutex::new(VecDeque::new());
        read_logs(std::io::Cursor::new(input), 1, &logs);
        let logs: Vec<String> = logs.into_inner().unwrap().into_iter().collect();
        assert_eq!(logs.len(), LOG_LINES);
        assert_eq!(logs[LOG_LINES - 3], "bad \u{fffd} utf8");
        assert_eq!(logs[LOG_LINES - 2].len(), MAX_LINE);
        assert_eq!(logs[LOG_LINES - 1], "no newline at the end");
        assert_eq!(logs[0], "line 13");
    }

    #[test]
    fn params_cross_the_wire_unchanged() {
        let mut values = std::collections::BTreeMap::new();
        values.insert("gain".to_string(), Value::Number(0.5));
        values.insert("bias".to_string(), Value::Vector(vec![0.1, 0.2, 0.3]));
        values.insert("on".to_string(), Value::Bool(true));
        values.insert("prompt".to_string(), Value::Text("a cat".into()));
        let p = Params {
            width: 512,
            height: 384,
            show_reloading_frame: false,
            model: Some(PathBuf::from("/m.pt")),
            values,
        };
        let wire = serde_json::to_string(&WireParams::from(&p)).unwrap();
        let back: WireParams = serde_json::from_str(&wire).unwrap();
        assert_eq!(Params::from(back), p);
    }

    /// The child runs libgomp with passive waiting unless the parent says otherwise.
    #[test]
    fn the_child_gets_a_passive_openmp_wait_policy() {
        let cmd = ChildCommand {
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), "echo \"omp=$OMP_WAIT_POLICY\" >&2".into()],
        };
        let mut child = ChildProc::spawn_here(&cmd).unwrap();
        // Let it print and exit by itself (kill would stop it at once), then collect its logs.
        child.child.wait().unwrap();
        let logs = child.kill();
        let want = match std::env::var(ENV_OMP_WAIT_POLICY) {
            Ok(v) if !v.is_empty() => v,
            _ => DEFAULT_OMP_WAIT_POLICY.to_string(),
        };
        assert!(
            logs.iter().any(|l| l.ends_with(&format!("omp={want}"))),
            "{logs:?}"
        );
    }

    #[test]
    fn a_missing_child_path_is_a_clear_error() {
        let e = ChildCommand::locate(Some("/nonexistent/x")).unwrap_err();
        assert!(e.contains("child-path /nonexistent/x is not a file"), "{e}");
    }
}
