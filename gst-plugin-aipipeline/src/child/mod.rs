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
//! - fd 4: the frame area, a `memfd` holding the output slots (u8 RGB, width×height×3, some
//!   lent downstream as output buffers) and, after them, the copied input planes. The parent
//!   grows it when a frame needs more room and says so in each `frame` message (`shm-size`);
//!   the child remaps it then.
//! - fd 5 (only when `RIVULET_AIPIPELINE_INPUT_FD` says so; an element with its own child,
//!   not a batch group): the element's input area, a second `memfd` holding the input slots,
//!   the memory of the buffers of the pool the element proposes upstream ([`ShmInputPool`]).
//!   Every child of the element inherits the same area, restarts included. When a frame's
//!   buffer is one of those slots (one memory, every plane inside it), its `frame` message
//!   carries `input-size` and the planes' offsets in this area: the child reads the planes
//!   where upstream wrote them (mapped read-only; remapped when the area grew), with no copy.
//!   Any other buffer is copied into the frame area as before, with identical results.
//!
//! See `shm` for the layout of both areas and how slots are kept from reuse while a buffer
//! uses them.
//!
//! The child runs the same conversion and model code as the in-process element
//! ([`crate::model::run_frame`]), so results are identical. Its stderr goes to
//! a pipe the parent keeps the last [`LOG_LINES`] lines of (reported with a restart).
//!
//! Parent death: the child gets `PR_SET_PDEATHSIG(SIGKILL)` (set between fork and exec, on the
//! element's long-lived spawner thread, since the signal follows the forking *thread*), and a
//! watchdog thread exits when `getppid()` changes; control socket EOF also ends it.
//!
//! The pieces: `wire` (the control messages and their framing on the socket), `shm` (the
//! memfd shared memory), `pool` (the proposed input pool), `parent` (starting the child and talking to it, from the element's
//! side) and `run` (the child's main loop).

use std::os::fd::RawFd;

mod parent;
mod pool;
mod run;
mod shm;
mod wire;

pub use parent::{ChildCommand, ChildError, ChildProc, LOG_LINES, Spawner};
pub use pool::ShmInputPool;
pub use run::run;
pub use shm::{InputArea, InputSlot};
pub use wire::{BatchItem, FrameReq, InputLayout, LoadSpec, WireParams};

/// First argument of the child process (`rivulet-inference aipipeline-child`, or the daemon's
/// `rivulet aipipeline-child`).
pub const SUBCOMMAND: &str = "aipipeline-child";
/// File name of the helper binary looked up when `child-path` is unset.
pub const BIN_NAME: &str = "rivulet-inference";
/// Environment variable carrying the parent's pid to the child (watchdog).
const ENV_PARENT: &str = "RIVULET_AIPIPELINE_PARENT_PID";
/// Environment variable set (to [`INPUT_FD`]) when the child gets an input area.
const ENV_INPUT_FD: &str = "RIVULET_AIPIPELINE_INPUT_FD";
const CTRL_FD: RawFd = 3;
const SHM_FD: RawFd = 4;
const INPUT_FD: RawFd = 5;

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}
