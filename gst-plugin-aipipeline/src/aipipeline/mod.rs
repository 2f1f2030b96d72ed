// SPDX-License-Identifier: MPL-2.0
//! `aipipeline`: runs a pipeline (a TorchScript model, or `noop`) on every video frame.
//!
//! Raw video of any size in a packed RGB-family format comes in; the element scales it to cover
//! and centre-crops it to the pipeline's width×height on the device, runs the pipeline on an
//! inference thread fed by a one-slot mailbox (a new frame replaces a waiting one, so the
//! streaming thread never blocks on inference), and pushes RGB (or RGBx/RGBA) at width×height
//! with the input timestamps. See the crate README for the element contract, the params and the
//! loading/online events.
//!
//! With `isolation=process` the pipeline runs in a child process (`child-path`, else the
//! `rivulet-inference` helper found next to the plugin's shared object, next to the running
//! program, then on `PATH`; see [`crate::child`]): frames cross through shared memory, and a
//! child that dies or hangs is replaced while frames keep flowing (loading/online events, an
//! `aipipeline-restart` message; beyond `max-restarts` an element error). A CUDA out-of-memory
//! error on a frame restarts the engine the same way (in-process: the model is reloaded).
//! With its own child (not a batch group) the element answers the ALLOCATION query with a
//! pool whose buffers live in shared memory the child maps: upstream writes frames where the
//! child reads them, and they are not copied (`input-zero-copy` in `stats`); other buffers
//! are copied, with identical results.
//!
//! With `batch-group` (and `isolation=process`), elements of this process with the same group
//! name and pipeline selection share one inference child that runs their frames as batches
//! (`max-batch`, `batch-timeout-ms`); see `batch.rs` and the crate README, "Batch groups".
//!
//! ```text
//! gst-launch-1.0 videotestsrc ! videoconvert ! aipipeline pipeline=noop ! videoconvert ! autovideosink
//! gst-launch-1.0 videotestsrc ! videoconvert ! aipipeline isolation=process pipeline=noop ! videoconvert ! autovideosink
//! ```

use gst::glib;
use gst::prelude::*;

mod batch;
mod imp;
mod loader;
mod mailbox;
mod stats;
mod worker;

pub(crate) use imp::log_child_line;

/// Structure name of the serialized custom downstream event sent when a (re)load starts.
/// Fields: `pipeline` (string), `reason` (string: "load" | "reload" | "restart"),
/// `show-picture` (bool).
pub const LOADING_EVENT: &str = "rivulet-loading";
/// Structure name of the serialized custom downstream event sent right before the first real
/// output frame after a (re)load. Fields: `pipeline` (string).
pub const ONLINE_EVENT: &str = "rivulet-online";
/// Structure name of the periodic statistics element message (same fields as `stats`).
pub const STATS_MESSAGE: &str = "aipipeline-stats";

/// Structure name of the element message posted when the inference child (isolation=process)
/// died, hung or ran out of device memory ("CUDA out of memory" in a frame's libtorch error),
/// or when the in-process model (isolation=none) ran out of device memory, and it is being
/// restarted (reloaded). Fields: `restart-count` (u32, restarts so far in this run), `reason`
/// (string), `logs` (string: the child's last stderr lines, newline-joined; empty in-process),
/// `pid` (u32: the lost child's pid; 0 in-process).
pub const RESTART_MESSAGE: &str = "aipipeline-restart";

/// Structure name of the details of the bus warning posted when accepted params hold keys the
/// pipeline does not know (they are ignored, as the runner ignores them). Fields: `pipeline`
/// (string), `keys` (array of strings, sorted). Posted once per new set of unknown keys.
pub const UNKNOWN_PARAMS_WARNING: &str = "rivulet-unknown-params";

/// `isolation` property: where inference runs.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum, Default)]
#[repr(u32)]
#[enum_type(name = "GstAiPipelineIsolation")]
pub enum Isolation {
    /// In the element's own process.
    #[default]
    #[enum_value(name = "None: inference runs in this process", nick = "none")]
    None = 0,
    /// In a child process (the `rivulet-inference` helper), restarted when it dies or hangs.
    #[enum_value(
        name = "Process: inference runs in a child process, restarted on a crash or hang",
        nick = "process"
    )]
    Process = 1,
}

/// Read-only `status` property.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum, Default)]
#[repr(u32)]
#[enum_type(name = "GstAiPipelineStatus")]
pub enum Status {
    /// A model is being loaded (at start or in the background during a reload).
    #[default]
    #[enum_value(name = "Loading: a model is being loaded", nick = "loading")]
    Loading = 0,
    /// Frames are processed by the pipeline.
    #[enum_value(name = "Ready: frames are processed", nick = "ready")]
    Ready = 1,
    /// Start failed (see the error message).
    #[enum_value(name = "Error: the pipeline could not be started", nick = "error")]
    Error = 2,
}

/// `precision` property.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, glib::Enum, Default)]
#[repr(u32)]
#[enum_type(name = "GstAiPipelinePrecision")]
pub enum Precision {
    /// 32-bit floats.
    #[default]
    #[enum_value(name = "FP32: 32-bit floats", nick = "fp32")]
    Fp32 = 0,
    /// 16-bit floats (CUDA only; the CPU uses fp32).
    #[enum_value(name = "FP16: 16-bit floats (CUDA only)", nick = "fp16")]
    Fp16 = 1,
}

glib::wrapper! {
    pub struct AiPipeline(ObjectSubclass<imp::AiPipeline>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    Status::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    Precision::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    Isolation::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "aipipeline",
        gst::Rank::NONE,
        AiPipeline::static_type(),
    )
}
