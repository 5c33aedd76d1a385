#!/usr/bin/env python3
"""gif-fr's CPU inference against onnxruntime's, on the same IResNet.

What a user without a GPU compares `gif-fr embed` with is insightface's own
Python package, which runs its IResNet models with onnxruntime's CPU
execution provider. This script:

1. draws seeded random weights for insightface's iresnet (r18 / r34 / r50 /
   r100; BatchNorm statistics random too, so that folding them matters)
   and writes them as an insightface-named safetensors file (PyTorch
   layouts: OIHW convolutions, fc.weight over the NCHW flattening);
2. builds the same network as an ONNX graph with the onnx package's helpers
   (Conv, BatchNormalization, PRelu, Add, Flatten, Gemm: the graph
   insightface's exported models have) and runs it with onnxruntime at each
   thread count (intra-op threads; graph optimizations on, which fold
   Conv + BatchNormalization as insightface's users get them);
3. runs `gif-fr embed` on the same images with RAYON_NUM_THREADS at the
   same thread counts, R + 1 batches, and reads its steady-state time per
   batch from its last line (the median batch after the first: the
   process start, the weight loading and the one-time folding are not
   counted; onnxruntime's session creation and first run are not counted
   either);
4. checks that the embeddings agree and prints the table: seconds per batch
   for each, and gif-fr's time as a multiple of onnxruntime's.

Setup (onnxruntime and onnx from the Python package index; no PyTorch):

    python3 -m venv /tmp/ortenv
    /tmp/ortenv/bin/pip install numpy onnx onnxruntime
    cargo build --release
    /tmp/ortenv/bin/python benches/ort_backbone.py --arch r50 --batch 1,8,32 --threads 1,2

Timings: each run's median batch (of --reps after a first, untimed one),
then the median over --trials runs, the two engines interleaved so that a
noisy machine affects both alike.
"""
import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

LAYERS = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3]}
WIDTHS = [64, 128, 256, 512]
EMB = 512
SIZE = 112


def random_state(arch, seed):
    """insightface iresnet state dict (numpy, PyTorch layouts), seeded."""
    rng = np.random.default_rng(seed)
    st = {}

    def conv(name, c_out, c_in, k):
        fan_in = c_in * k * k
        st[name] = (rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bn(name, c, fixed_weight=False):
        st[f"{name}.weight"] = (np.ones(c) if fixed_weight else rng.uniform(0.8, 1.2, c)).astype(np.float32)
        st[f"{name}.bias"] = rng.uniform(-0.1, 0.1, c).astype(np.float32)
        st[f"{name}.running_mean"] = rng.uniform(-0.1, 0.1, c).astype(np.float32)
        st[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)

    def prelu(name, c):
        st[name] = rng.uniform(0.15, 0.35, c).astype(np.float32)

    conv("conv1.weight", 64, 3, 3)
    bn("bn1", 64)
    prelu("prelu.weight", 64)
    inplanes = 64
    for s, (n, planes) in enumerate(zip(LAYERS[arch], WIDTHS)):
        for i in range(n):
            p = f"layer{s + 1}.{i}"
            c_in = inplanes if i == 0 else planes
            bn(f"{p}.bn1", c_in)
            conv(f"{p}.conv1.weight", planes, c_in, 3)
            bn(f"{p}.bn2", planes)
            prelu(f"{p}.prelu.weight", planes)
            conv(f"{p}.conv2.weight", planes, planes, 3)
            bn(f"{p}.bn3", planes)
            if i == 0:
                conv(f"{p}.downsample.0.weight", planes, c_in, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    bn("bn2", 512)
    fan_in = 512 * 7 * 7
    st["fc.weight"] = (rng.standard_normal((EMB, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
    st["fc.bias"] = rng.uniform(-0.1, 0.1, EMB).astype(np.float32)
    bn("features", EMB, fixed_weight=True)
    return st


def write_safetensors(path, st):
    """The safetensors format: u64 header length, JSON header, raw data."""
    header, offset, blobs = {}, 0, []
    for name in sorted(st):
        a = np.ascontiguousarray(st[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a.tobytes())
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def onnx_model(arch, st):
    """insightface's iresnet as an ONNX graph (NCHW, opset 17)."""
    nodes, inits = [], []
    count = [0]

    def name(prefix):
        count[0] += 1
        return f"{prefix}_{count[0]}"

    def init(key, array):
        inits.append(numpy_helper.from_array(array, key))
        return key

    def conv(x, key, stride):
        w = st[key]
        k = w.shape[2]
        y = name("conv")
        nodes.append(helper.make_node("Conv", [x, init(key, w)], [y], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        return y

    def bn(x, prefix):
        y = name("bn")
        ins = [x] + [init(f"{prefix}.{f}", st[f"{prefix}.{f}"]) for f in ("weight", "bias", "running_mean", "running_var")]
        nodes.append(helper.make_node("BatchNormalization", ins, [y], epsilon=1e-5))
        return y

    def prelu(x, key):
        y = name("prelu")
        nodes.append(helper.make_node("PRelu", [x, init(key, st[key].reshape(-1, 1, 1))], [y]))
        return y

    x = conv("input", "conv1.weight", 1)
    x = prelu(bn(x, "bn1"), "prelu.weight")
    for s, n in enumerate(LAYERS[arch]):
        for i in range(n):
            p = f"layer{s + 1}.{i}"
            stride = 2 if i == 0 else 1
            out = conv(bn(x, f"{p}.bn1"), f"{p}.conv1.weight", 1)
            out = prelu(bn(out, f"{p}.bn2"), f"{p}.prelu.weight")
            out = bn(conv(out, f"{p}.conv2.weight", stride), f"{p}.bn3")
            identity = bn(conv(x, f"{p}.downsample.0.weight", stride), f"{p}.downsample.1") if i == 0 else x
            y = name("add")
            nodes.append(helper.make_node("Add", [out, identity], [y]))
            x = y
    x = bn(x, "bn2")
    flat = name("flatten")
    nodes.append(helper.make_node("Flatten", [x], [flat], axis=1))
    fc = name("fc")
    nodes.append(helper.make_node("Gemm", [flat, init("fc.weight", st["fc.weight"]), init("fc.bias", st["fc.bias"])],
                                  [fc], transB=1))
    out = bn(fc, "features")
    nodes.append(helper.make_node("Identity", [out], ["embedding"]))
    graph = helper.make_graph(
        nodes, f"iresnet_{arch}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMB])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def ort_session(model_path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])


def time_ort(sess, x, reps):
    """The median seconds of `reps` runs after a first one."""
    sess.run(None, {"input": x})
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_gif_fr(exe, arch, weights, images, out, batch, threads):
    """The median seconds per batch after the first that gif-fr embed
    reports (`... later batches of B: median S s per batch)`)."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [exe, "embed", "--arch", arch, "--weights", weights, "--images", images, "--out", out,
           "--batch", str(batch), "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"gif-fr embed failed ({r.returncode}):\n{r.stderr}")
    m = re.search(r"median ([0-9.]+) s per batch", r.stderr)
    if not m:
        sys.exit(f"gif-fr embed printed no steady-state timing:\n{r.stderr}")
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="r50", help="comma-separated: r18, r34, r50, r100")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=4, help="timed batches per run (after a first, untimed one)")
    ap.add_argument("--trials", type=int, default=3, help="timings per case (the median is reported)")
    ap.add_argument("--gif-fr", default="target/release/gif-fr", help="the gif-fr binary (cargo build --release)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if not os.path.exists(args.gif_fr):
        sys.exit(f"{args.gif_fr} not found: run `cargo build --release` first (or pass --gif-fr)")
    rows = []
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}")
    print("| arch | batch | threads | gif-fr s/batch | onnxruntime s/batch | gif-fr / ort | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            st = random_state(arch, args.seed)
            weights = os.path.join(tmp, f"{arch}.safetensors")
            write_safetensors(weights, st)
            model_path = os.path.join(tmp, f"{arch}.onnx")
            onnx.save(onnx_model(arch, st), model_path)
            rng = np.random.default_rng(args.seed + 1)
            for b in map(int, args.batch.split(",")):
                x = rng.uniform(-1, 1, (b * (args.reps + 1), 3, SIZE, SIZE)).astype(np.float32)
                many = os.path.join(tmp, "many.npy")
                np.save(many, x)
                out = os.path.join(tmp, "out.npy")
                for t in map(int, args.threads.split(",")):
                    sess = ort_session(model_path, t)
                    ours, theirs = [], []
                    for _ in range(args.trials):
                        ours.append(run_gif_fr(args.gif_fr, arch, weights, many, out, b, t))
                        theirs.append(time_ort(sess, x[:b], args.reps))
                    ref = sess.run(None, {"input": x})[0]
                    got = np.load(out)
                    diff = float(np.abs(got - ref).max() / np.abs(ref).max())
                    g, o = statistics.median(ours), statistics.median(theirs)
                    rows.append({"arch": arch, "batch": b, "threads": t, "gif_fr_s": g, "ort_s": o,
                                 "ratio": g / o, "max_rel_diff": diff})
                    print(f"| {arch} | {b} | {t} | {g:.4f} | {o:.4f} | {g / o:.2f}x | {diff:.1e} |", flush=True)
                    if diff > 1e-3:
                        sys.exit(f"the embeddings disagree: max |gif-fr - ort| / max |ort| = {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
