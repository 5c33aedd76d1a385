#!/usr/bin/env python3
"""Converts an insightface IResNet checkpoint (.pth, a PyTorch state dict as
saved by insightface's arcface_torch, e.g. backbone.pth) to safetensors for
gif-fr (`IResNet::load`, `gif-fr embed --weights`).

    python3 scripts/pth_to_safetensors.py backbone.pth backbone.safetensors

Keeps every name and PyTorch layout (gif-fr converts OIHW convolutions and
the fc columns itself); floats are written as F32, integers
(num_batches_tracked) as I64. Needs PyTorch only (the safetensors package
is used when installed, else a small writer of the same format; numpy is
not needed).
"""
import ctypes
import json
import struct
import sys

import torch


def state_dict(path):
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if hasattr(obj, "state_dict"):
        obj = obj.state_dict()
    out = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k  # DataParallel
        if not torch.is_tensor(v):
            continue
        out[k] = v.detach().to(torch.float32 if v.is_floating_point() else torch.int64).contiguous()
    return out


def write(tensors, path):
    try:
        from safetensors.torch import save_file

        save_file(tensors, path)
        return
    except ImportError:
        pass
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        data = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())  # no numpy needed
        dtype = "F32" if t.dtype == torch.float32 else "I64"
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    tensors = state_dict(sys.argv[1])
    write(tensors, sys.argv[2])
    print(f"wrote {len(tensors)} tensors to {sys.argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
