#!/usr/bin/env python3
"""End-to-end check of gif-fr against PyTorch on an insightface checkpoint:
builds insightface's iresnet (benches/torch_backbone.py, same structure and
state-dict names) with random weights and non-trivial BatchNorm running
statistics, saves its state dict as a .pth, converts it with
scripts/pth_to_safetensors.py, embeds random uint8 faces with
`gif-fr embed` (each requested device), and compares with PyTorch's eval
forward on the same normalized images (fp32, TF32 off). Exits 1 when any
embedding differs by more than 1e-3 of the largest one.

Needs PyTorch (not numpy; the GPU machine has it, this one does not):

    python3 scripts/check_insightface.py --gif-fr target/release/gif-fr [--arch r18]
        [--devices cpu,best] [--work DIR]
"""
import argparse
import ast
import ctypes
import os
import struct
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
for d in (here, os.path.join(here, "..", "benches")):
    sys.path.insert(0, d)

import torch  # noqa: E402
from torch_backbone import ARCHS, IResNet  # noqa: E402


def save_npy(path, t):
    """A contiguous uint8 or float32 tensor as .npy (format 1.0)."""
    descr = {torch.uint8: "|u1", torch.float32: "<f4"}[t.dtype]
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(t.shape)}, }}"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    t = t.contiguous()
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        f.write(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))


def load_npy_f32(path):
    data = open(path, "rb").read()
    assert data[:6] == b"\x93NUMPY", "not a .npy file"
    if data[6] == 1:
        hlen, start = struct.unpack("<H", data[8:10])[0], 10
    else:
        hlen, start = struct.unpack("<I", data[8:12])[0], 12
    header = ast.literal_eval(data[start:start + hlen].decode())
    assert header["descr"] == "<f4" and not header["fortran_order"], header
    payload = bytearray(data[start + hlen:])
    return torch.frombuffer(payload, dtype=torch.float32).reshape(header["shape"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gif-fr", required=True)
    ap.add_argument("--arch", default="r18")
    ap.add_argument("--devices", default="cpu,best")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--work")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="gif-fr-insightface-")
    os.makedirs(work, exist_ok=True)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    net = IResNet(ARCHS[args.arch])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)  # keeps the signal through the depth
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
                if name != "features":  # insightface keeps features.weight at 1
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            if isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.3)
    net.eval()
    pth = os.path.join(work, f"{args.arch}.pth")
    st = os.path.join(work, f"{args.arch}.safetensors")
    torch.save(net.state_dict(), pth)
    subprocess.run([sys.executable, os.path.join(here, "pth_to_safetensors.py"), pth, st], check=True)

    faces = torch.randint(0, 256, (args.batch, 112, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    faces_path = os.path.join(work, "faces.npy")
    save_npy(faces_path, faces)
    x = (faces.float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        want = net(x.permute(0, 3, 1, 2).contiguous())
    scale = float(want.abs().max())
    # The image-dependent part (the batch mean removed), which biases cannot mask.
    want_c = want - want.mean(0)
    scale_c = float(want_c.abs().max())

    print(f"\n### insightface checkpoint, end to end ({args.arch}, B = {args.batch}, torch {torch.__version__})\n")
    print("| gif-fr device | embed | max abs diff | / max abs | centred: / max abs | result |")
    print("|---|---|---|---|---|---|")
    failed = False
    for dev in args.devices.split(","):
        for extra in ([], ["--bf16"]):
            out = os.path.join(work, f"emb-{dev}{'-bf16' if extra else ''}.npy")
            cmd = [args.gif_fr, "embed", "--arch", args.arch, "--weights", st, "--images", faces_path,
                   "--out", out, "--device", dev] + extra
            r = subprocess.run(cmd, capture_output=True, text=True)
            label = "bf16 convs" if extra else "f32"
            if r.returncode != 0:
                print(f"| {dev} | {label} | - | - | - | FAILED: {r.stderr.strip()[:200]} |")
                failed = True
                continue
            got = load_npy_f32(out)
            if got.shape != want.shape:
                print(f"| {dev} | {label} | - | - | - | FAILED: shape {got.shape} |")
                failed = True
                continue
            diff = float((got - want).abs().max())
            diff_c = float(((got - got.mean(0)) - want_c).abs().max())
            # f32 must agree to rounding; bf16 convolutions to bf16's precision.
            tol = 2e-2 if extra else 1e-3
            ok = diff <= tol * scale and diff_c <= tol * scale_c
            failed |= not ok
            print(f"| {dev} | {label} | {diff:.3e} | {diff / scale:.3e} | {diff_c / scale_c:.3e} "
                  f"| {'ok' if ok else 'FAILED'} (bound {tol:g}) |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
