// SPDX-License-Identifier: MPL-2.0
//! The control protocol between the element and its inference child: the messages (JSON, one
//! per `SOCK_SEQPACKET` packet) and how they are sent and received.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::errno;
use crate::pipeline::{Params, Value};

/// Largest control message.
const MAX_MSG: usize = 64 * 1024;

/// What the child loads: the element's settings that select the pipeline, plus params JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadSpec {
    pub pipeline: String,
    pub model: Option<String>,
    /// The search path, colon-separated (`SearchPath::to_list`); `None`: the default.
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
pub struct FrameReq {
    pub(super) shm_size: u64,
    pub(super) layout: InputLayout,
    pub(super) width: u32,
    pub(super) height: u32,
    /// (offset, length, stride) per plane.
    pub(super) planes: Vec<(u64, u64, u64)>,
    pub(super) out_w: u32,
    pub(super) out_h: u32,
    pub(super) out_offset: u64,
    /// Set when the planes are in the input area (fd 5) rather than the frame area: its
    /// length, which the child maps (at least). The plane offsets are then offsets there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) input_size: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub(super) enum Request {
    Load(LoadSpec),
    Frame(FrameReq),
    Params {
        params: WireParams,
    },
    /// Frames of several elements (a batch group) run as one batch: each item's output goes
    /// to its own slot; items of the same size whose params differ at most in per-sample
    /// inputs share one forward.
    Batch {
        items: Vec<BatchItem>,
    },
    Shutdown,
}

/// One frame of a [`Request::Batch`] with the params of the element it came from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BatchItem {
    pub(super) frame: FrameReq,
    pub(super) params: WireParams,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub(super) enum Reply {
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
    /// One entry per item: None when it succeeded, else its error; `forwards`: the model
    /// forwards the batch took (0 for `noop`).
    BatchDone {
        compute_us: u64,
        errors: Vec<Option<String>>,
        forwards: u32,
    },
    ParamsDone,
    ParamsError {
        msg: String,
    },
}

pub(super) fn send_msg<T: Serialize>(fd: RawFd, msg: &T) -> std::io::Result<()> {
    let buf = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    // SAFETY: buf is a valid slice; MSG_NOSIGNAL turns a closed peer into EPIPE.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(errno());
    }
    Ok(())
}

pub(super) enum Recv<T> {
    Msg(T),
    Eof,
    Timeout,
}

/// Receives one message; `timeout` None waits forever. Interrupted waits are retried.
pub(super) fn recv_msg<T: for<'de> Deserialize<'de>>(
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
        thread_local! {
            /// One receive buffer per thread, reused for every message (no 64 KiB zeroed
            /// allocation per frame).
            static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_MSG]);
        }
        let got = BUF.with_borrow_mut(|buf| {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            match n {
                n if n < 0 => Err(errno()),
                0 => Ok(None),
                n => serde_json::from_slice(&buf[..n as usize])
                    .map(Some)
                    .map_err(std::io::Error::other),
            }
        });
        return match got {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
            Ok(None) => Ok(Recv::Eof),
            Ok(Some(m)) => Ok(Recv::Msg(m)),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
