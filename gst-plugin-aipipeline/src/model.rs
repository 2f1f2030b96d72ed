// SPDX-License-Identifier: MPL-2.0
//! Loaded pipelines: `noop`, or a TorchScript module with its layout, range and extra inputs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::frame;
use crate::pipeline::{
    InputKind, InputSpec, Kind as PipelineKind, Layout, Params, PipelineDef, Range, Value,
};

/// Why a model could not be loaded (an element error at start, a warning on reload).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("pipeline '{0}' needs a TorchScript model: set the model property or the model param")]
    NoModel(String),
    #[error("model file {0} does not exist")]
    Missing(PathBuf),
    #[error(
        "cannot load TorchScript model {path}: {err} (is it a TorchScript file saved with torch.jit.save?)"
    )]
    Load { path: PathBuf, err: String },
    #[error("model {path} failed its warm-up run: {err}")]
    Warmup { path: PathBuf, err: FrameError },
    #[error("pipeline '{pipeline}': {msg}")]
    Params { pipeline: String, msg: String },
    #[error("cannot start the model loader thread: {0}")]
    Thread(String),
}

/// Why one frame could not be processed (a warning; the frame is skipped).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("torch error: {0}")]
    Torch(#[from] tch::TchError),
    #[error("model returned shape {got:?}, expected {expected:?} (layout {layout:?})")]
    Shape {
        got: Vec<i64>,
        expected: Vec<i64>,
        layout: Layout,
    },
    #[error("model returned dtype {0:?}, expected a floating-point tensor")]
    Dtype(Kind),
}

/// Whether a libtorch error text reports that the device ran out of memory (CUDA's caching
/// allocator: "CUDA out of memory. Tried to allocate …", raised as `torch.OutOfMemoryError`).
/// The element answers such an error by restarting the engine (a fresh child, or a fresh model
/// in-process) instead of skipping frames that would all fail the same way.
pub fn is_out_of_memory(msg: &str) -> bool {
    msg.contains("CUDA out of memory") || msg.contains("OutOfMemoryError")
}

impl FrameError {
    /// See [`is_out_of_memory`].
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, FrameError::Torch(e) if is_out_of_memory(&e.to_string()))
    }
}

/// A TorchScript model ready to run.
pub struct TorchModel {
    module: tch::CModule,
    path: PathBuf,
    layout: Layout,
    range: Range,
    inputs: Vec<InputSpec>,
    extra: Vec<Tensor>,
    device: Device,
    half: bool,
    warmup: Duration,
}

/// A loaded pipeline.
pub enum Runner {
    Noop,
    Torch(Box<TorchModel>),
}

impl Runner {
    /// Loads the pipeline for `params` on `device` and warms it up with one frame of the
    /// params' size. Blocking: call from `start()` or the loader thread, never the streaming
    /// thread, with no lock held.
    pub fn load(
        def: &PipelineDef,
        params: &Params,
        device: Device,
        half: bool,
    ) -> Result<Runner, LoadError> {
        if def.kind == PipelineKind::Noop {
            return Ok(Runner::Noop);
        }
        let _guard = tch::no_grad_guard();
        let path = params
            .model
            .clone()
            .ok_or_else(|| LoadError::NoModel(def.name.clone()))?;
        if !path.is_file() {
            return Err(LoadError::Missing(path));
        }
        let mut module =
            tch::CModule::load_on_device(&path, device).map_err(|e| LoadError::Load {
                path: path.clone(),
                err: e.to_string(),
            })?;
        module.f_set_eval().map_err(|e| LoadError::Load {
            path: path.clone(),
            err: e.to_string(),
        })?;
        if half {
            // CModule::to has no fallible variant: turn its panic on a C++ exception into an
            // error.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                module.to(device, Kind::Half, false)
            }))
            .map_err(|_| LoadError::Load {
                path: path.clone(),
                err: "cannot convert the model to fp16 on this device; use precision=fp32".into(),
            })?;
        }
        let mut m = TorchModel {
            module,
            path: path.clone(),
            layout: def.layout,
            range: def.range,
            inputs: def.inputs.clone(),
            extra: Vec::new(),
            device,
            half,
            warmup: Duration::ZERO,
        };
        m.set_params(params).map_err(|msg| LoadError::Params {
            pipeline: def.name.clone(),
            msg,
        })?;
        let zeros = Tensor::f_zeros(
            [1, params.height as i64, params.width as i64, 3],
            (Kind::Float, device),
        )
        .map_err(|e| LoadError::Warmup {
            path: path.clone(),
            err: e.into(),
        })?;
        // Three runs: the TorchScript profiling executor optimises on the second one, so the
        // JIT work happens here rather than on the first real frames; the last one is timed.
        for _ in 0..3 {
            let t0 = Instant::now();
            let _ = m.forward(&zeros).map_err(|err| LoadError::Warmup {
                path: path.clone(),
                err,
            })?;
            m.warmup = t0.elapsed();
        }
        Ok(Runner::Torch(Box::new(m)))
    }

    /// Duration of the warm-up forward (an upper estimate of the per-frame latency).
    pub fn warmup_time(&self) -> Duration {
        match self {
            Runner::Noop => Duration::ZERO,
            Runner::Torch(m) => m.warmup,
        }
    }

    /// Applies params that need no reload (e.g. values feeding extra inputs).
    pub fn set_params(&mut self, params: &Params) -> Result<(), String> {
        match self {
            Runner::Noop => Ok(()),
            Runner::Torch(m) => m.set_params(params),
        }
    }
}

impl TorchModel {
    fn set_params(&mut self, params: &Params) -> Result<(), String> {
        self.extra = self.extras_for(params)?;
        Ok(())
    }

    /// The extra inputs (after the frame) for one frame with `params`, on the model's device:
    /// a scalar 0-dim, a vector (len,), per-sample inputs too.
    pub fn extras_for(&self, params: &Params) -> Result<Vec<Tensor>, String> {
        self.extras(&[params], false)
    }

    /// The extra inputs for one forward of a batch whose samples have `samples` (in sample
    /// order; params [`PipelineDef::batchable`] with each other): a per-sample input stacked,
    /// (B, len) for a vector and (B,) for a scalar (also for B = 1), the others as for one
    /// frame.
    pub fn extras_for_batch(&self, samples: &[&Params]) -> Result<Vec<Tensor>, String> {
        self.extras(samples, true)
    }

    fn extras(&self, samples: &[&Params], batch: bool) -> Result<Vec<Tensor>, String> {
        let Some(first) = samples.first() else {
            return Err("a batch without samples".into());
        };
        let mut extra = Vec::with_capacity(self.inputs.len());
        let kind = if self.half { Kind::Half } else { Kind::Float };
        for input in &self.inputs {
            let name = &input.param;
            let stacked = batch && input.per_sample;
            if batch
                && !stacked
                && samples
                    .iter()
                    .any(|p| p.values.get(name) != first.values.get(name))
            {
                // Not reached: the child stacks only batchable params.
                return Err(format!(
                    "param '{name}' differs between the samples of one forward but is not per_sample"
                ));
            }
            let take = if stacked { samples } else { &samples[..1] };
            let mut flat: Vec<f32> = Vec::with_capacity(take.len());
            let mut len = None;
            for p in take {
                match (input.kind, p.values.get(name)) {
                    (InputKind::Scalar, Some(Value::Number(v))) => flat.push(*v as f32),
                    (InputKind::Vector, Some(Value::Vector(v)))
                        if len.is_none_or(|l| l == v.len()) =>
                    {
                        len = Some(v.len());
                        flat.extend(v.iter().map(|x| *x as f32));
                    }
                    (_, other) => {
                        return Err(format!("param '{name}' has no usable value ({other:?})"));
                    }
                }
            }
            let t = Tensor::f_from_slice(&flat).map_err(|e| e.to_string())?;
            let t = match (input.kind, stacked) {
                (InputKind::Scalar, false) => t.f_reshape([0i64; 0]), // 0-dim
                (InputKind::Vector, true) => {
                    t.f_reshape([take.len() as i64, len.unwrap_or(0) as i64])
                }
                // A scalar per sample is (B,), one vector (len,): as built.
                _ => Ok(t),
            }
            .map_err(|e| e.to_string())?;
            extra.push(
                t.f_to_device(self.device)
                    .and_then(|t| t.f_to_kind(kind))
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(extra)
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs the model on a (1, H, W, 3) float [0, 1] frame; returns the same contract.
    pub fn forward(&self, frame: &Tensor) -> Result<Tensor, FrameError> {
        self.forward_with(frame, &self.extra)
    }

    /// Runs the model on a (B, H, W, 3) float [0, 1] batch with these extra inputs (from
    /// [`TorchModel::extras_for`] or, per sample, [`TorchModel::extras_for_batch`]); returns
    /// (B, H, W, 3).
    pub fn forward_with(&self, frame: &Tensor, extra: &[Tensor]) -> Result<Tensor, FrameError> {
        let size = frame.size();
        let (b, h, w) = (size[0], size[1], size[2]);
        let mut x = match self.range {
            Range::ZeroOne => frame.shallow_clone(),
            Range::MinusOneOne => frame.f_mul_scalar(2.0)?.f_sub_scalar_(1.0)?,
        };
        if self.layout == Layout::Nchw {
            x = x.f_permute([0, 3, 1, 2])?;
        }
        if self.half {
            x = x.f_to_kind(Kind::Half)?;
        }
        let y = if extra.is_empty() {
            self.module.forward_ts(&[x])?
        } else {
            let mut inputs = Vec::with_capacity(1 + extra.len());
            inputs.push(x);
            inputs.extend(extra.iter().map(Tensor::shallow_clone));
            self.module.forward_ts(&inputs)?
        };
        if !y.is_floating_point() {
            return Err(FrameError::Dtype(y.kind()));
        }
        let expected = match self.layout {
            Layout::Bhwc => vec![b, h, w, 3],
            Layout::Nchw => vec![b, 3, h, w],
        };
        let got = y.size();
        if got != expected {
            return Err(FrameError::Shape {
                got,
                expected,
                layout: self.layout,
            });
        }
        let mut y = if y.kind() == Kind::Float {
            y
        } else {
            y.f_to_kind(Kind::Float)?
        };
        if self.layout == Layout::Nchw {
            y = y.f_permute([0, 2, 3, 1])?;
        }
        if self.range == Range::MinusOneOne {
            y = y.f_add_scalar(1.0)?.f_mul_scalar_(0.5)?;
        }
        Ok(y)
    }
}

/// Where a frame's output goes: a packed RGB/RGBx/RGBA plane (the buffer pushed downstream,
/// or the inference child's output slot in shared memory).
pub struct FrameOut<'a> {
    pub data: &'a mut [u8],
    pub stride: usize,
    pub width: u32,
    pub height: u32,
    pub bpp: i64,
}

/// Runs one frame through a runner, from the mapped input straight into the output plane:
/// cover-crop to the output size, the pipeline, clamp and round back to 8 bits. The element
/// (in-process, and for pass-through frames with [`Runner::Noop`]) and the inference child both
/// call this, so their results are identical. `staging` holds the buffers reused from frame to
/// frame.
pub fn run_frame(
    runner: &Runner,
    staging: &mut frame::Staging,
    input: &frame::FrameIn<'_>,
    device: Device,
    out: FrameOut<'_>,
) -> Result<(), FrameError> {
    match runner {
        Runner::Noop => {
            let crop = frame::cover_crop(input.width, input.height, out.width, out.height);
            let rgb = frame::to_u8_frame(input.upload(crop, device)?, out.width, out.height)?;
            Ok(frame::download_rgb(
                &rgb, out.data, out.stride, out.width, out.height, out.bpp,
            )?)
        }
        Runner::Torch(m) => {
            let f = input.to_frame(staging, out.width, out.height, device)?;
            let y = m.forward(&f)?;
            drop(f);
            Ok(frame::write_frame(
                &y, out.data, out.stride, out.width, out.height, out.bpp,
            )?)
        }
    }
}
