#!/usr/bin/env python3
"""PyTorch (cuDNN, channels_last) at the shapes of benches/backbone.rs: each
IResNet convolution's forward, data gradient and weight gradient at B = 128,
in fp32 (TF32 off, as the crate's f32 kernels) and bf16; and whole networks
(insightface's iresnet structure, defined below): r50 / r100 inference
images/s and r50's training step. cudnn.benchmark is on (cuDNN picks its
fastest algorithm per shape), timing by CUDA events after a warm-up.

With --ours backbone.csv (written by `GIF_FR_BACKBONE_OUT=DIR cargo bench
--bench backbone`) the shapes are taken from that file and the ratios are
printed: gif-fr's speed as a percentage of cuDNN's at the same operand type
(100% = as fast; the issue's targets: f32 convolutions >= 50% of cuDNN
fp32, bf16 (tensor-core) ones >= 50% of cuDNN bf16). Networks: gif-fr's
f32 and bf16-convolution networks against PyTorch's f32 and bf16 autocast.

Run on the GPU machine: python3 benches/torch_backbone.py [--quick]
[--ours DIR/backbone.csv] [--csv out.csv]
"""
import argparse
import csv
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

OPS = ("forward", "data grad", "weight grad")


def default_layers(b, quick):
    v = [("conv1", b, 112, 3, 64, 3, 1)]
    for i, (hw, c_in, c) in enumerate([(112, 64, 64), (56, 64, 128), (28, 128, 256), (14, 256, 512)]):
        s = i + 1
        v += [
            (f"layer{s}.0.conv1", b, hw, c_in, c, 3, 1),
            (f"layer{s}.0.conv2", b, hw, c, c, 3, 2),
            (f"layer{s}.0.downsample", b, hw, c_in, c, 1, 2),
            (f"layer{s}.1.conv1", b, hw // 2, c, c, 3, 1),
        ]
    if quick:
        keep = {"conv1", "layer1.1.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer3.0.conv2",
                "layer3.0.downsample", "layer3.1.conv1", "layer4.1.conv1"}
        v = [l for l in v if l[0] in keep]
    return v


def read_ours(path):
    """gif-fr's GPU rows: {(kind, name, op, dtype, b): seconds} and the layer list."""
    times, layers = {}, []
    with open(path) as f:
        for r in csv.DictReader(f):
            if not r["device"].startswith("cuda"):
                continue
            b = int(r["b"])
            times[(r["kind"], r["name"], r["op"], r["dtype"], b)] = float(r["seconds"])
            if r["kind"] == "conv" and r["op"] == "forward" and r["dtype"] == "f32":
                layers.append((r["name"], b, int(r["hw"]), int(r["c_in"]), int(r["c_out"]), int(r["k"]), int(r["stride"])))
    return times, layers


def cuda_time(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def time_conv(layer, dtype, iters):
    _, b, hw, c_in, c_out, k, stride = layer
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(hw * c_in + k)
    cl = torch.channels_last
    x = torch.rand(b, c_in, hw, hw, device=dev, generator=g).to(dtype).contiguous(memory_format=cl)
    w = (torch.rand(c_out, c_in, k, k, device=dev, generator=g) - 0.5).to(dtype).contiguous(memory_format=cl)
    pad = k // 2
    y = F.conv2d(x, w, stride=stride, padding=pad)
    dy = torch.rand_like(y).contiguous(memory_format=cl)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            dy, x, w, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], 1, mask)

    fns = {
        "forward": lambda: F.conv2d(x, w, stride=stride, padding=pad),
        "data grad": backward([True, False, False]),
        "weight grad": backward([False, True, False]),
    }
    return {op: cuda_time(fns[op], iters) for op in OPS}


class Block(nn.Module):
    """insightface's IBasicBlock: BN, conv3x3, BN, PReLU, conv3x3(stride), BN, + identity."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """insightface's iresnet.py structure and state-dict names (conv1, bn1,
    prelu, layer1..layer4, bn2, dropout, fc, features)."""

    def __init__(self, layers, dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(Block(inplanes, planes, 2 if j == 0 else 1))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


ARCHS = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3]}


def time_net(arch, b, dtype, training, iters):
    dev = torch.device("cuda")
    net = IResNet(ARCHS[arch]).to(dev).to(memory_format=torch.channels_last)
    x = torch.rand(b, 3, 112, 112, device=dev).contiguous(memory_format=torch.channels_last) * 2 - 1
    auto = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    if training:
        net.train()
        d = torch.rand(b, 512, device=dev)

        def step():
            net.zero_grad(set_to_none=True)
            with auto:
                e = net(x)
            e.float().backward(d)
    else:
        net.eval()

        def step():
            with torch.no_grad(), auto:
                net(x)
    s = cuda_time(step, iters)
    del net
    torch.cuda.empty_cache()
    return s


def pct(ours, theirs):
    return f"{100.0 * theirs / ours:.0f}%" if ours and theirs else "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ours")
    ap.add_argument("--csv")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch_backbone.py: no CUDA device; nothing to time", file=sys.stderr)
        return 0
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, layers = read_ours(args.ours) if args.ours else ({}, [])
    b = layers[0][1] if layers else 128
    if not layers:
        layers = default_layers(b, args.quick)
    iters = 5 if args.quick else 20
    conv = []
    for layer in layers:
        for dtype, dname in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            for op, s in time_conv(layer, dtype, iters).items():
                conv.append((layer, dname, op, s))
    nets = []
    archs = ["r50"] if args.quick else ["r50", "r100"]
    for arch in archs:
        for dtype, dname in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            nets.append((arch, dname, "inference", time_net(arch, b, dtype, False, iters)))
        if arch == "r50":
            for dtype, dname in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
                nets.append((arch, dname, "training step", time_net(arch, b, dtype, True, iters)))
    name = torch.cuda.get_device_name()
    print(f"\n### cuDNN convolutions, channels_last ({name}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()})\n")
    print("% = gif-fr's speed as a share of cuDNN's at the same operand type (time_cuDNN / time_gif-fr)\n")
    print("| layer | B | HxW | C_in -> C_out | k / s | op | cuDNN f32 | gif-fr f32 | % | cuDNN bf16 | gif-fr bf16 | % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ms = lambda v: f"{v * 1e3:.3f} ms" if v else "-"
    for layer in layers:
        lname, lb, hw, c_in, c_out, k, stride = layer
        for op in OPS:
            f32 = next(s for (l, d, o, s) in conv if l == layer and d == "f32" and o == op)
            bf = next(s for (l, d, o, s) in conv if l == layer and d == "bf16" and o == op)
            mine = ours.get(("conv", lname, op, "f32", lb))
            mine_bf = ours.get(("conv", lname, op, "bf16", lb))
            print(f"| {lname} | {lb} | {hw}x{hw} | {c_in} -> {c_out} | {k} / {stride} | {op} | {ms(f32)} | {ms(mine)} "
                  f"| {pct(mine, f32)} | {ms(bf)} | {ms(mine_bf)} | {pct(mine_bf, bf)} |")
    print(f"\n### PyTorch IResNet networks, channels_last ({name})\n")
    print("| arch | B | pass | dtype | time per batch | images/s | gif-fr images/s | gif-fr % |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, dname, what, s in nets:
        mine = ours.get(("net", arch, what, dname, b))
        mine_cell = f"{b / mine:.0f}" if mine else "-"
        print(f"| {arch} | {b} | {what} | {dname} | {s * 1e3:.1f} ms | {b / s:.0f} | {mine_cell} | {pct(mine, s)} |")
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("kind,name,op,dtype,b,seconds\n")
            for (lname, lb, *_), d, op, s in conv:
                f.write(f"conv,{lname},{op},{d},{lb},{s:.6e}\n")
            for arch, d, what, s in nets:
                f.write(f"net,{arch},{what},{d},{b},{s:.6e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
