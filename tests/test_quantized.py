"""Block-quantized HF checkpoints: FP8 (block-scaled, fp32 or ue8m0 scales) and MXFP4 weights are
read as lazy dequantize expressions and written as ordinary bf16/fp32 checkpoints.  The oracle is
transformers' own dequantization (``Fp8Dequantize``, ``convert_moe_packed_tensors``) and its
``FineGrainedFP8Config(dequantize=True)`` loader."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from ckpt_ir.errors import CkptIrError
from ckpt_ir.ir import expr as E
from ckpt_ir.quant import dequantize_tensors

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def _skip_fp8(key: str, t: torch.Tensor) -> bool:
    """What the released FP8 checkpoints keep unquantized: embeddings, norms, lm_head, router gates."""
    return t.ndim != 2 or "embed" in key or "norm" in key or key.startswith("lm_head") or key.endswith("mlp.gate.weight")


def fp8_quantize(w: torch.Tensor, block: tuple[int, int], ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-block absmax quantization written from the format facts (edge blocks may be partial):
    only an input for the readers; the oracle is the dequantization."""
    rows, cols = w.shape
    b0, b1 = block
    pr, pc = -rows % b0, -cols % b1
    padded = torch.nn.functional.pad(w.float(), (0, pc, 0, pr))
    tiles = padded.reshape((rows + pr) // b0, b0, (cols + pc) // b1, b1)
    inv = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    if ue8m0:
        inv = torch.exp2(torch.ceil(torch.log2(inv)))
    q = (tiles / inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(rows + pr, cols + pc)[:rows, :cols].contiguous()
    return q, inv.to(torch.float8_e8m0fnu) if ue8m0 else inv


def make_fp8(src: str, dst: str, block: tuple[int, int] = (128, 128), ue8m0: bool = False) -> str:
    """An FP8 release of the HF checkpoint ``src``: quantized linears + weight_scale_inv + config."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if not name.endswith(".safetensors"):
            continue
        f = os.path.join(dst, name)
        sd = load_file(f)
        out = {}
        for k, t in sd.items():
            if _skip_fp8(k, t):
                out[k] = t
                continue
            out[k], out[k + "_scale_inv"] = fp8_quantize(t, block, ue8m0)
        save_file(out, f, metadata={"format": "pt"})
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(block),
        **({"scale_fmt": "ue8m0"} if ue8m0 else {}),
        "modules_to_not_convert": ["lm_head"],
    }
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    return dst


def transformers_dequantize(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """transformers' Fp8Dequantize on the weight padded to whole blocks (it refuses partial edge
    blocks; padding with zeros changes no kept element), cropped back."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    rows, cols = q.shape
    pr, pc = -rows % block[0], -cols % block[1]
    padded = torch.nn.functional.pad(q.view(torch.uint8), (0, pc, 0, pr)).view(torch.float8_e4m3fn)
    out = Fp8Dequantize(None)._dequantize_one(padded, s, output_dtype=dtype)
    return out[:rows, :cols]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def convert(src: str, dst: str, target: ck.Target) -> ck.Checkpoint:
    c = ck.load(src)
    out = ck.run(c, ck.derive_pipeline(c, target))
    ck.save(out, dst, target)
    return out


def check_against_transformers(fp8_dir: str, out_dir: str, dtype=torch.bfloat16) -> int:
    """Every tensor of ``out_dir`` equals the FP8 source dequantized by transformers (bit for bit),
    or the source tensor itself where it was not quantized.  Returns how many were dequantized."""
    cfg = json.load(open(os.path.join(fp8_dir, "config.json")))
    block = tuple(cfg["quantization_config"]["weight_block_size"])
    src: dict[str, torch.Tensor] = {}
    for n in os.listdir(fp8_dir):
        if n.endswith(".safetensors"):
            src.update(load_file(os.path.join(fp8_dir, n)))
    got: dict[str, torch.Tensor] = {}
    for n in os.listdir(out_dir):
        if n.endswith(".safetensors"):
            got.update(load_file(os.path.join(out_dir, n)))
    assert not any(k.endswith("_scale_inv") for k in got)
    want_keys = {k for k in src if not k.endswith("_scale_inv")}
    assert set(got) == want_keys
    n = 0
    for k, t in got.items():
        if k + "_scale_inv" in src:
            want = transformers_dequantize(src[k], src[k + "_scale_inv"], block, dtype)
            n += 1
        else:
            want = src[k].to(dtype)
        assert t.dtype == want.dtype and t.shape == want.shape, k
        assert torch.equal(bits(t), bits(want)), k
    out_cfg = json.load(open(os.path.join(out_dir, "config.json")))
    assert "quantization_config" not in out_cfg
    return n
