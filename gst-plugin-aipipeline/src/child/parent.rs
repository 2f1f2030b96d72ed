// SPDX-License-Identifier: MPL-2.0
//! The parent side: finding the child program, starting children (on the spawner thread),
//! talking to a running child, keeping its log lines, and ending it.

use std::collections::VecDeque;
use std::ffi::{CStr, OsString};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::shm::{INPUT_OFFSET, InputArea, OUT_SLOTS, SLOT_LEN, Shm};
use super::wire::{
    BatchItem, FrameReq, InputLayout, LoadSpec, Recv, Reply, Request, recv_msg, send_msg,
};
use super::{BIN_NAME, CTRL_FD, ENV_INPUT_FD, ENV_PARENT, INPUT_FD, SHM_FD, SUBCOMMAND, errno};
use crate::pipeline::Params;

/// libgomp's idle policy, read once when the child loads libtorch. Its default lets worker
/// threads spin between parallel regions, which doubled the CPU of a live stream (one short
/// region per frame); the child gets `PASSIVE` unless the parent's environment sets it.
const ENV_OMP_WAIT_POLICY: &str = "OMP_WAIT_POLICY";
const DEFAULT_OMP_WAIT_POLICY: &str = "PASSIVE";
/// Child log lines kept by the parent.
pub const LOG_LINES: usize = 50;
/// How long a graceful shutdown may take before SIGKILL.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);
/// How often a frame's wait checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(100);

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
    /// The child's device ran out of memory on a frame ([`crate::model::is_out_of_memory`]):
    /// it is alive, but every frame would fail the same way, so it is replaced.
    #[error("inference child ran out of memory: {0}")]
    OutOfMemory(String),
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

/// How to start the child: program and leading arguments.
#[derive(Clone, Debug)]
pub struct ChildCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The input area every child started with this command inherits (fd 5): frames whose
    /// buffers are its slots go to the child without a copy. None: every frame is copied.
    pub input: Option<Arc<InputArea>>,
}

impl ChildCommand {
    /// `program aipipeline-child`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: vec![SUBCOMMAND.into()],
            input: None,
        }
    }

    /// The same command, its children inheriting `area` (see [`ChildCommand::input`]).
    pub fn with_input(self, area: Arc<InputArea>) -> Self {
        Self {
            input: Some(area),
            ..self
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
    /// Output slots lent downstream (bit i: slot i), shared with the lent memories.
    busy: Arc<AtomicU32>,
    /// The slot reserved for the last frame's output, not lent (yet).
    reserved: Option<usize>,
    /// The input area this child inherited (fd 5), if any.
    input: Option<Arc<InputArea>>,
    /// The last frame's planes were read from their input slot, not copied.
    last_zero_copy: bool,
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
        let input_child = cmd.input.as_ref().map(|a| high(a.raw_fd())).transpose()?;
        drop(theirs);
        let (c, s) = (ctrl_child.as_raw_fd(), shm_child.as_raw_fd());
        let i = input_child.as_ref().map(|f| f.as_raw_fd());
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
                if let Some(i) = i
                    && libc::dup2(i, INPUT_FD) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if input_child.is_some() {
            command.env(ENV_INPUT_FD, INPUT_FD.to_string());
        } else {
            command.env_remove(ENV_INPUT_FD);
        }
        if std::env::var_os(ENV_OMP_WAIT_POLICY).is_none_or(|v| v.is_empty()) {
            command.env(ENV_OMP_WAIT_POLICY, DEFAULT_OMP_WAIT_POLICY);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", cmd.program.display()))?;
        drop(ctrl_child);
        drop(shm_child);
        drop(input_child);
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
            busy: Arc::new(AtomicU32::new(0)),
            reserved: None,
            input: cmd.input.clone(),
            last_zero_copy: false,
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

    /// Runs one frame: copies the planes into shared memory (unless they are in an input slot
    /// of the child's input area, see [`ChildCommand::input`]) and waits for the child; the u8 RGB
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
        let out_len = out_w as usize * out_h as usize * 3;
        if out_len > SLOT_LEN {
            return Err(ChildError::Failed(format!(
                "output {out_w}x{out_h} does not fit a shared-memory slot"
            )));
        }
        // Planes in an input slot of this child's input area (upstream used the proposed
        // pool) are read where they are; anything else is copied into the frame area.
        let in_slot = self.input.as_ref().and_then(|a| a.locate(planes));
        self.last_zero_copy = in_slot.is_some();
        let (descr, input_size) = match in_slot {
            Some((offsets, size)) => (
                (offsets.iter().zip(planes).zip(strides))
                    .map(|((o, p), s)| (*o, p.len() as u64, *s as u64))
                    .collect(),
                Some(size),
            ),
            None => (self.copy_input(planes, strides)?, None),
        };
        // The output slots (the copy path grows the area past them anyway).
        if self.shm.len < INPUT_OFFSET {
            self.shm
                .grow(INPUT_OFFSET.next_multiple_of(1 << 20))
                .map_err(|e| ChildError::Failed(format!("cannot grow shared memory: {e}")))?;
        }
        // The slot for this frame's output: one that can be lent downstream if one is free
        // (reserved until lent or the next frame), else the scratch slot.
        self.release_reserved();
        let slot = (0..OUT_SLOTS)
            .find(|i| self.busy.fetch_or(1 << i, Ordering::AcqRel) & (1 << i) == 0)
            .inspect(|i| self.reserved = Some(*i))
            .unwrap_or(OUT_SLOTS);
        let out_offset = slot * SLOT_LEN;
        let req = Request::Frame(FrameReq {
            shm_size: self.shm.len as u64,
            layout,
            width,
            height,
            planes: descr,
            out_w,
            out_h,
            out_offset: out_offset as u64,
            input_size,
        });
        self.last_out = 0..0;
        match self.call_or_cancel(&req, timeout, cancelled)? {
            Reply::FrameDone { compute_us } => {
                self.last_out = out_offset..out_offset + out_len;
                self.last_compute = Duration::from_micros(compute_us);
                Ok(())
            }
            Reply::FrameError { msg } if crate::model::is_out_of_memory(&msg) => {
                Err(ChildError::OutOfMemory(msg))
            }
            Reply::FrameError { msg } => Err(ChildError::Failed(msg)),
            other => Err(ChildError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// Copies a frame's planes into the frame area's input part (after every output slot),
    /// growing it when needed; returns the planes' (offset, length, stride).
    fn copy_input(
        &mut self,
        planes: &[&[u8]],
        strides: &[usize],
    ) -> Result<Vec<(u64, u64, u64)>, ChildError> {
        const ALIGN: usize = 64;
        let mut descr = Vec::with_capacity(planes.len());
        let mut off = INPUT_OFFSET;
        for (p, s) in planes.iter().zip(strides) {
            descr.push((off as u64, p.len() as u64, *s as u64));
            off = (off + p.len()).next_multiple_of(ALIGN);
        }
        let need = off;
        if need > self.shm.len {
            let size = need.next_multiple_of(1 << 20);
            self.shm
                .grow(size)
                .map_err(|e| ChildError::Failed(format!("cannot grow shared memory: {e}")))?;
        }
        for (p, (o, l, _)) in planes.iter().zip(&descr) {
            self.shm
                .region_mut(*o as usize..(*o + *l) as usize)
                .copy_from_slice(p);
        }
        Ok(descr)
    }

    /// Whether the last frame's planes went to the child without a copy (they were in an
    /// input slot of this child's input area).
    pub fn last_input_zero_copy(&self) -> bool {
        self.last_zero_copy
    }

    /// Batches (a batch group): copies one frame's planes into the input area at `*cursor`
    /// (advanced; start at [`ChildProc::BATCH_START`]), growing the area, and describes the
    /// item whose output goes to slot `slot` (0..=[`ChildProc::MAX_BATCH`] - 1) with `params`.
    #[allow(clippy::too_many_arguments)] // as frame
    pub fn put_batch_item(
        &mut self,
        cursor: &mut usize,
        planes: &[&[u8]],
        strides: &[usize],
        (width, height): (u32, u32),
        layout: InputLayout,
        (out_w, out_h): (u32, u32),
        slot: usize,
        params: &Params,
    ) -> Result<BatchItem, ChildError> {
        const ALIGN: usize = 64;
        if out_w as usize * out_h as usize * 3 > SLOT_LEN || slot >= Self::MAX_BATCH {
            return Err(ChildError::Failed(format!(
                "output {out_w}x{out_h} (slot {slot}) does not fit shared memory"
            )));
        }
        let mut descr = Vec::with_capacity(planes.len());
        let mut off = (*cursor).max(INPUT_OFFSET);
        for (p, s) in planes.iter().zip(strides) {
            descr.push((off as u64, p.len() as u64, *s as u64));
            off = (off + p.len()).next_multiple_of(ALIGN);
        }
        if off > self.shm.len {
            self.shm
                .grow(off.next_multiple_of(1 << 20))
                .map_err(|e| ChildError::Failed(format!("cannot grow shared memory: {e}")))?;
        }
        for (p, (o, l, _)) in planes.iter().zip(&descr) {
            self.shm
                .region_mut(*o as usize..(*o + *l) as usize)
                .copy_from_slice(p);
        }
        *cursor = off;
        Ok(BatchItem {
            frame: FrameReq {
                shm_size: 0,
                layout,
                width,
                height,
                planes: descr,
                out_w,
                out_h,
                out_offset: (slot * SLOT_LEN) as u64,
                input_size: None,
            },
            params: params.into(),
        })
    }

    /// Runs a batch of items put with [`ChildProc::put_batch_item`]: one result per item
    /// (its output then in [`ChildProc::batch_output`]) and the number of model forwards the
    /// child ran for the batch, or why the whole batch failed.
    pub fn run_batch(
        &mut self,
        mut items: Vec<BatchItem>,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Vec<Result<(), String>>, u32), ChildError> {
        let n = items.len();
        for it in &mut items {
            it.frame.shm_size = self.shm.len as u64;
        }
        match self.call_or_cancel(&Request::Batch { items }, timeout, cancelled)? {
            Reply::BatchDone {
                compute_us,
                errors,
                forwards,
            } if errors.len() == n => {
                self.last_compute = Duration::from_micros(compute_us);
                if let Some(msg) = errors
                    .iter()
                    .flatten()
                    .find(|m| crate::model::is_out_of_memory(m))
                {
                    return Err(ChildError::OutOfMemory(msg.clone()));
                }
                Ok((
                    errors.into_iter().map(|e| e.map_or(Ok(()), Err)).collect(),
                    forwards,
                ))
            }
            Reply::FrameError { msg } => Err(ChildError::Failed(msg)),
            other => Err(ChildError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// The output (`len` bytes, tightly packed RGB) of batch slot `slot` after
    /// [`ChildProc::run_batch`].
    pub fn batch_output(&self, slot: usize, len: usize) -> &[u8] {
        self.shm.region(slot * SLOT_LEN..slot * SLOT_LEN + len)
    }

    /// Where a batch's inputs start.
    pub const BATCH_START: usize = INPUT_OFFSET;
    /// Most items in a batch (one output slot each).
    pub const MAX_BATCH: usize = OUT_SLOTS + 1;

    /// Frees the slot reserved for the last frame if it was not lent.
    fn release_reserved(&mut self) {
        if let Some(i) = self.reserved.take() {
            self.busy.fetch_and(!(1 << i), Ordering::AcqRel);
        }
    }

    /// The output of the last successful frame as memory for the buffer pushed downstream:
    /// the shared-memory slot the child wrote it into, lent until the memory is freed (no
    /// copy). None when every lendable slot was lent already (then copy [`ChildProc::output`]).
    pub fn lend_output(&mut self) -> Option<gst::Memory> {
        let slot = self.reserved.take()?;
        let len = self.last_out.len();
        match self.shm.lend(slot, len, &self.busy) {
            Some(lent) if self.last_out.start == slot * SLOT_LEN && len > 0 => {
                Some(gst::Memory::from_mut_slice(lent))
            }
            other => {
                drop(other);
                self.busy.fetch_and(!(1 << slot), Ordering::AcqRel);
                None
            }
        }
    }

    /// The child's own processing time for the last successful frame (the rest of a
    /// [`ChildProc::frame`] call is transport: copies, socket round trip, wake-ups).
    pub fn last_compute(&self) -> Duration {
        self.last_compute
    }

    /// The output of the last successful frame.
    pub fn output(&self) -> &[u8] {
        self.shm.region(self.last_out.clone())
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

    /// The child runs libgomp with passive waiting unless the parent says otherwise.
    #[test]
    fn the_child_gets_a_passive_openmp_wait_policy() {
        let cmd = ChildCommand {
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), "echo \"omp=$OMP_WAIT_POLICY\" >&2".into()],
            input: None,
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
