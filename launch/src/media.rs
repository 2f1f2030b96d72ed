// SPDX-License-Identifier: MPL-2.0
//! Media assembly: the one place that makes GStreamer elements for the daemon, and the one
//! place that makes an `aipipeline` from configuration. Live sessions, file jobs, stage graphs
//! and `rivulet check-pipeline` all build their elements here.
//!
//! Layer: above `config`, below `graph`, `session`, `jobs` and `check`; it never reaches up.

use crate::config::Config;
use gst::prelude::*;
use gstaipipeline::pipeline::SearchPath;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Makes an element of `factory` (named `name` when given).
pub fn make(factory: &str, name: Option<&str>) -> Result<gst::Element, String> {
    let mut b = gst::ElementFactory::make(factory);
    if let Some(n) = name {
        b = b.name(n);
    }
    b.build().map_err(|e| {
        format!("cannot create GStreamer element {factory}: {e} (is its plugin installed?)")
    })
}

/// Where an `aipipeline`'s inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inference {
    /// In the calling process.
    InProcess,
    /// As the daemon is configured (`RIVULET_ISOLATION`): a child process of this executable
    /// when isolation is on and this program serves children, with at most `max_restarts`
    /// restarts (`None`: the element's default).
    Configured { max_restarts: Option<u32> },
}

/// What an `aipipeline` is made of. [`AiSpec::from_config`] gives the daemon's settings
/// (device, search path); the builder methods change one setting each.
#[derive(Debug, Clone)]
pub struct AiSpec {
    pub name: Option<String>,
    pub pipeline: String,
    pub device: String,
    pub pipelines: SearchPath,
    /// Params JSON (`None`, or an empty object: the pipeline's defaults).
    pub params: Option<Value>,
    /// A TorchScript file in place of the manifest's (`check-pipeline --model`).
    pub model: Option<PathBuf>,
    /// `max-latency-ms` (`None`: the element's default).
    pub max_latency_ms: Option<u32>,
    /// With `max_latency_ms`: late frames pass unprocessed instead of being dropped.
    pub pass_late_frames: bool,
    /// `batch-group`: elements of one group running the same model share one inference child
    /// (`None`: the element's own child). Applied only to isolated inference.
    pub batch_group: Option<String>,
    pub inference: Inference,
}

impl AiSpec {
    /// `pipeline` on `device`, found on `pipelines`, in process, with the element's defaults.
    pub fn new(pipeline: &str, device: &str, pipelines: &SearchPath) -> AiSpec {
        AiSpec {
            name: None,
            pipeline: pipeline.to_string(),
            device: device.to_string(),
            pipelines: pipelines.clone(),
            params: None,
            model: None,
            max_latency_ms: None,
            pass_late_frames: false,
            batch_group: None,
            inference: Inference::InProcess,
        }
    }

    /// `pipeline` on the daemon's device and search path, isolated as configured.
    pub fn from_config(cfg: &Config, pipeline: &str) -> AiSpec {
        AiSpec {
            inference: Inference::Configured { max_restarts: None },
            ..AiSpec::new(pipeline, &cfg.device, &cfg.pipelines)
        }
    }

    pub fn model(mut self, model: Option<PathBuf>) -> Self {
        self.model = model;
        self
    }

    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    pub fn params(mut self, params: &Value) -> Self {
        self.params = Some(params.clone());
        self
    }

    pub fn device(mut self, device: &str) -> Self {
        self.device = device.to_string();
        self
    }

    pub fn in_process(mut self) -> Self {
        self.inference = Inference::InProcess;
        self
    }

    pub fn max_restarts(mut self, n: u32) -> Self {
        self.inference = Inference::Configured {
            max_restarts: Some(n),
        };
        self
    }

    pub fn max_latency_ms(mut self, ms: u32, pass_late_frames: bool) -> Self {
        self.max_latency_ms = Some(ms);
        self.pass_late_frames = pass_late_frames;
        self
    }

    pub fn batch_group(mut self, group: Option<String>) -> Self {
        self.batch_group = group;
        self
    }
}

/// Makes an `aipipeline` as `spec` says. `cfg` gives the isolation settings for
/// [`Inference::Configured`].
pub fn aipipeline(spec: &AiSpec, cfg: Option<&Config>) -> Result<gst::Element, String> {
    let ai = make("aipipeline", spec.name.as_deref())?;
    ai.set_property("pipeline", &spec.pipeline);
    ai.set_property_from_str("device", &spec.device);
    ai.set_property("pipelines-dir", spec.pipelines.to_list());
    if let Some(model) = &spec.model {
        ai.set_property("model", model.to_string_lossy().to_string());
    }
    if let Some(ms) = spec.max_latency_ms {
        ai.set_property("max-latency-ms", ms);
        if spec.pass_late_frames && ai.find_property("pass-late-frames").is_some() {
            ai.set_property("pass-late-frames", true);
        }
    }
    let isolated = match (spec.inference, cfg) {
        (Inference::Configured { max_restarts }, Some(cfg)) if isolate(&ai, cfg)? => {
            if let Some(n) = max_restarts {
                ai.set_property("max-restarts", n);
            }
            true
        }
        _ => false,
    };
    // A batch group shares an inference child: only for isolated inference.
    if isolated && let Some(group) = &spec.batch_group {
        ai.set_property("batch-group", group);
    }
    if let Some(params) = spec
        .params
        .as_ref()
        .filter(|p| p.as_object().is_none_or(|o| !o.is_empty()))
    {
        ai.set_property("params", params.to_string());
    }
    Ok(ai)
}

/// Set by the `rivulet` binary, whose `main()` serves the `aipipeline-child` argument.
static CHILD_HOST: AtomicBool = AtomicBool::new(false);

/// Declares that this executable runs the inference child when started with the
/// `aipipeline-child` argument (the `rivulet` binary), so `aipipeline`s can be isolated.
pub fn serve_inference_children() {
    CHILD_HOST.store(true, Ordering::SeqCst);
}

/// Runs `ai`'s inference in a child process when `RIVULET_ISOLATION=process` (the single
/// pipeline and every pipeline stage of a graph): the child is this executable, with the
/// configured hang timeout. True when isolated. A program that does not serve the child
/// (`serve_inference_children` not called: e.g. a test binary using the library) runs
/// inference in-process.
fn isolate(ai: &gst::Element, cfg: &Config) -> Result<bool, String> {
    if !cfg.isolation || !CHILD_HOST.load(Ordering::SeqCst) {
        return Ok(false);
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the daemon's executable for the inference child: {e}"))?;
    ai.set_property_from_str("isolation", "process");
    ai.set_property("child-path", exe.to_string_lossy().to_string());
    ai.set_property("hang-timeout-ms", cfg.hang_timeout_ms);
    Ok(true)
}

/// A queue of at most `buffers` frames (no byte or time bound).
pub fn frame_queue(buffers: u32) -> Result<gst::Element, String> {
    let q = make("queue", None)?;
    q.set_property("max-size-buffers", buffers);
    q.set_property("max-size-bytes", 0u32);
    q.set_property("max-size-time", 0u64);
    Ok(q)
}

/// A queue of at most a few frames in front of an encoder: the inference thread hands a frame
/// over and goes back to its mailbox instead of waiting for x264, and the muxer gets the
/// latency headroom it needs (it holds frames only while the encoder is behind, at most 4).
pub fn encoder_queue() -> Result<gst::Element, String> {
    frame_queue(4)
}

/// A sink pad of `element` for `kind` ("video"/"audio"): a static pad of that name, else a
/// request pad from the `kind_%u` or `kind` template.
pub fn sink_pad(element: &gst::Element, kind: &str) -> Option<gst::Pad> {
    element
        .static_pad(kind)
        .or_else(|| element.request_pad_simple(&format!("{kind}_%u")))
        .or_else(|| element.request_pad_simple(kind))
        .or_else(|| element.static_pad("sink"))
}

/// Links a decoded audio pad to `sink`'s audio pad through audioconvert, audioresample and a
/// 1 s queue, in a running `pipeline`; returns that audio pad of `sink`.
pub fn link_audio(
    pipeline: &gst::Pipeline,
    pad: &gst::Pad,
    sink: &gst::Element,
) -> Result<gst::Pad, String> {
    let convert = make("audioconvert", None)?;
    let resample = make("audioresample", None)?;
    let queue = make("queue", None)?;
    queue.set_property("max-size-buffers", 0u32);
    queue.set_property("max-size-bytes", 0u32);
    queue.set_property("max-size-time", 1_000_000_000u64);
    let chain = [&convert, &resample, &queue];
    pipeline.add_many(chain).map_err(|e| e.to_string())?;
    gst::Element::link_many(chain).map_err(|e| e.to_string())?;
    let sink_pad = sink_pad(sink, "audio").ok_or("tricklesink has no audio pad")?;
    queue
        .static_pad("src")
        .ok_or("no src pad")?
        .link(&sink_pad)
        .map_err(|e| format!("{e:?}"))?;
    for e in chain {
        e.sync_state_with_parent().map_err(|e| e.to_string())?;
    }
    pad.link(&convert.static_pad("sink").ok_or("no sink pad")?)
        .map_err(|e| format!("{e:?}"))?;
    Ok(sink_pad)
}
