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
//! ([`crate::model::run_frame`]), so results are identical. Its stderr goes to
//! a pipe the parent keeps the last [`LOG_LINES`] lines of (reported with a restart).
//!
//! Parent death: the child gets `PR_SET_PDEATHSIG(SIGKILL)` (set between fork and exec, on the
//! element's long-lived spawner thread, since the signal follows the forking *thread*), and a
//! watchdog thread exits when `getppid()` changes; control socket EOF also ends it.
//!
//! The pieces: `wire` (the control messages and their framing on the socket), `shm` (the
//! memfd shared memory), `parent` (starting the child and talking to it, from the element's
//! side) and `run` (the child's main loop).

use std::os::fd::RawFd;

mod parent;
mod run;
mod shm;
mod wire;

pub use parent::{ChildCommand, ChildError, ChildProc, LOG_LINES, Spawner};
pub use run::run;
pub use wire::{BatchItem, FrameReq, InputLayout, LoadSpec, WireParams};

/// First argument of the child process (`rivulet-inference aipipeline-child`, or the daemon's
/// `rivulet aipipeline-child`).
pub const SUBCOMMAND: &str = "aipipeline-child";
/// File name of the helper binary looked up when `child-path` is unset.
pub const BIN_NAME: &str = "rivulet-inference";
/// Environment variable carrying the parent's pid to the child (watchdog).
const ENV_PARENT: &str = "RIVULET_AIPIPELINE_PARENT_PID";
const CTRL_FD: RawFd = 3;
const SHM_FD: RawFd = 4;

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}
