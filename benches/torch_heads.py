#!/usr/bin/env python3
"""PyTorch's margin-softmax head at the shapes of benches/softmax_head.rs:
F.normalize + F.linear (cosine logits, B x N materialized) + ArcFace margin
on the target (insightface's formulation) + F.cross_entropy, forward and
backward, d = 512, B = 512, N = 2^10 ... 2^21, in fp32 (TF32 off, as the
crate's f32 kernels) and under bf16 autocast (fp32 weights cast for the
linear layer, as insightface trains: the crate's bf16 tensor-core path is
its counterpart). Prints the time per step and the peak extra memory of a step
(allocated beyond the weights and features, gradients included: the same
definition as the crate's benches), as a Markdown table and a CSV (--csv FILE).

Run on the GPU machine: python3 benches/torch_heads.py [--quick] [--csv out.csv]
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F


def step(x, w, labels, bf16=False, s=64.0, m=0.5):
    u = F.normalize(x)
    wn = F.normalize(w)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        cos = F.linear(u, wn)
    cos = cos.float().clamp(-1, 1)
    target = cos.gather(1, labels[:, None])
    sin_t = (1.0 - target * target).clamp_min(1e-12).sqrt()
    cm, sm = math.cos(m), math.sin(m)
    phi = torch.where(target > -cm, target * cm - sin_t * sm, target - m * sm)
    logits = cos.scatter(1, labels[:, None], phi) * s
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csv")
    ap.add_argument("--precision", choices=["f32", "bf16", "both"], default="both")
    args = ap.parse_args()
    precisions = {"f32": [False], "bf16": [True], "both": [False, True]}[args.precision]
    if not torch.cuda.is_available():
        print("torch_heads.py: no CUDA device; nothing to time", file=sys.stderr)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    b, d = 512, 512
    logs = [10, 14, 18, 20, 21] if args.quick else [10, 12, 14, 16, 18, 20, 21]
    rows = []
    for p, bf16 in [(p, bf16) for bf16 in precisions for p in logs]:
        n = 1 << p
        g = torch.Generator(device=dev).manual_seed(p)
        w = (torch.randn(n, d, device=dev, generator=g) / math.sqrt(d)).requires_grad_()
        x = torch.randn(b, d, device=dev, generator=g).requires_grad_()
        labels = torch.randint(0, n, (b,), device=dev, generator=g)
        step(x, w, labels, bf16)  # warm-up
        torch.cuda.synchronize()
        w.grad = None
        x.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(x, w, labels, bf16)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        iters = 20 if p <= 16 else 5
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            w.grad = None
            x.grad = None
            step(x, w, labels, bf16)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
        rows.append((n, "bf16 autocast" if bf16 else "f32", ms, peak))
        del w, x
        torch.cuda.empty_cache()
    print(f"\n### PyTorch margin softmax, forward + backward ({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    print("peak extra memory: allocated during a step beyond the weights and features (gradients included)\n")
    print("| N | B | precision | time per step | peak extra memory |")
    print("|---|---|---|---|---|")
    for n, prec, ms, peak in rows:
        print(f"| {n} | {b} | {prec} | {ms:.3f} ms | {peak / 2**20:.1f} MiB |")
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("n,b,d,precision,seconds,peak_bytes\n")
            for n, prec, ms, peak in rows:
                f.write(f"{n},{b},{d},{prec},{ms / 1e3:.6e},{peak}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
