// SPDX-License-Identifier: MPL-2.0
//! Generates the small TorchScript test models committed under `testdata/pipelines/`.
//!
//! ```text
//! cargo run -p gst-plugin-aipipeline --example make_test_models [OUT_DIR]
//! ```
//!
//! Every model takes a (1, H, W, 3) float frame (BHWC, [0, 1]) unless its manifest says
//! otherwise. Tracing records shape-independent graphs, so the models work at any size.

use std::path::PathBuf;

use tch::nn::{self, Module};
use tch::{CModule, Device, Kind, Tensor};

fn trace(
    dir: &std::path::Path,
    file: &str,
    inputs: &[Tensor],
    f: &mut dyn FnMut(&[Tensor]) -> Tensor,
) -> anyhow::Result<()> {
    let mut closure = |xs: &[Tensor]| vec![f(xs)];
    let m = CModule::create_by_tracing(
        file.trim_end_matches(".pt"),
        "forward",
        inputs,
        &mut closure,
    )?;
    let path = dir.join(file);
    m.save(&path)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/pipelines"));
    std::fs::create_dir_all(&dir)?;
    tch::manual_seed(20);
    let _guard = tch::no_grad_guard();
    let frame = Tensor::rand([1, 8, 8, 3], (Kind::Float, Device::Cpu));

    // identity: out = x (a real op so the graph has a node).
    trace(&dir, "identity.pt", &[frame.shallow_clone()], &mut |xs| {
        &xs[0] * 1.0
    })?;
    // invert: out = 1 - x.
    trace(&dir, "invert.pt", &[frame.shallow_clone()], &mut |xs| {
        xs[0].neg() + 1.0
    })?;
    // negate, used with layout = "nchw" and range = "-1_1": in [0, 1] terms it inverts too.
    let nchw = frame.permute([0, 3, 1, 2]).contiguous();
    trace(&dir, "negate.pt", &[nchw], &mut |xs| xs[0].neg())?;
    // gain: out = x * gain + bias, gain a scalar param, bias a 3-vector param.
    let gain = Tensor::from(1.5f32);
    let bias = Tensor::from_slice(&[0.1f32, 0.0, -0.1]);
    trace(
        &dir,
        "gain.pt",
        &[frame.shallow_clone(), gain, bias],
        &mut |xs| &xs[0] * &xs[1] + &xs[2],
    )?;
    // convnet: a small fixed-weight conv net (3 -> 8 -> 3, 3x3, ReLU, sigmoid).
    let mut vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root();
    let cfg = nn::ConvConfig {
        padding: 1,
        ..Default::default()
    };
    let net = nn::seq()
        .add(nn::conv2d(&p / "c1", 3, 8, 3, cfg))
        .add_fn(|x| x.relu())
        .add(nn::conv2d(&p / "c2", 8, 3, 3, cfg))
        .add_fn(|x| x.sigmoid());
    // Weights become constants of the traced graph: they must not require grad.
    vs.freeze();
    trace(&dir, "convnet.pt", &[frame.shallow_clone()], &mut |xs| {
        net.forward(&xs[0].permute([0, 3, 1, 2]))
            .permute([0, 2, 3, 1])
    })?;
    // badshape: a single-channel output (wrong shape for the frame contract).
    trace(&dir, "badshape.pt", &[frame.shallow_clone()], &mut |xs| {
        xs[0].mean_dim(3, true, Kind::Float)
    })?;
    // baddtype: returns 8-bit integers (wrong dtype for the frame contract).
    trace(&dir, "baddtype.pt", &[frame.shallow_clone()], &mut |xs| {
        (&xs[0] * 255.0).to_kind(Kind::Uint8)
    })?;
    // failsbright: out = x, but it indexes a 5-entry table with floor(10 * max(x)), so a frame
    // brighter than 0.5 fails at run time (index out of range) while darker ones (and the
    // all-zero warm-up frame) pass: a model for per-frame error handling.
    let table = Tensor::zeros([5], (Kind::Float, Device::Cpu));
    let dark = &frame * 0.1;
    trace(&dir, "failsbright.pt", &[dark], &mut |xs| {
        let idx = (xs[0].max() * 10.0).to_kind(Kind::Int64).reshape([1]);
        &xs[0] + table.index_select(0, &idx)
    })?;
    // persample (last: it draws random numbers, which must not shift the models above):
    // out = x * gain + bias with gain per sample (manifest `per_sample`): one frame takes a
    // 0-dim gain, a batch of B frames a (B,) gain, one per frame; bias a 3-vector shared by
    // the batch. Traced on a batch of 2 (the reshape to (-1, 1, 1, 1) is recorded
    // with -1, so any batch size and the 0-dim gain work).
    let frames = Tensor::rand([2, 8, 8, 3], (Kind::Float, Device::Cpu));
    let gains = Tensor::from_slice(&[1.5f32, 0.5]);
    let bias = Tensor::from_slice(&[0.1f32, 0.0, -0.1]);
    trace(&dir, "persample.pt", &[frames, gains, bias], &mut |xs| {
        &xs[0] * xs[1].reshape([-1, 1, 1, 1]) + &xs[2]
    })?;
    Ok(())
}
