"""Dtypes are plain strings in the IR (safetensors spelling, e.g. ``BF16``) so that planning never
needs torch.  Conversions to torch happen only where bytes are produced."""

from __future__ import annotations

import math

from ckpt_ir.errors import UsageError

ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,  # power-of-two scales (ue8m0) of block-quantized weights
}
FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# the smallest |x| a cast to each dtype rounds to infinity: its largest finite value plus half a unit
# in the last place (a tie rounds to the even neighbour, which is infinity)
OVERFLOW_AT = {"F32": 2.0**128 - 2.0**103, "BF16": 2.0**128 - 2.0**119, "F16": 65520.0}


def narrows(src: str, dst: str) -> bool:
    """Whether a cast from ``src`` to ``dst`` can turn a finite value into an infinity: ``dst``'s
    range is smaller than ``src``'s (fp32 or bf16 to fp16, fp32 to bf16, fp64 to any of them)."""
    return dst in OVERFLOW_AT and OVERFLOW_AT[dst] < OVERFLOW_AT.get(src, math.inf)


# user spellings accepted by --dtype and cast{dtype=..}
_ALIASES = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
    "fp64": "F64",
    "float64": "F64",
}

_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
_FROM_TORCH = {v: k for k, v in _TORCH_NAMES.items()}


def parse_dtype(text: str) -> str:
    """User spelling (``bf16``, ``float32``, ``BF16``) -> IR dtype; UsageError otherwise."""
    key = text.strip()
    if key.upper() in ITEMSIZE:
        return key.upper()
    if key.lower() in _ALIASES:
        return _ALIASES[key.lower()]
    raise UsageError(f"unknown dtype {text!r}: use one of bf16, fp16, fp32")


def itemsize(dtype: str) -> int:
    return ITEMSIZE[dtype]


def to_torch(dtype: str):
    import torch

    return getattr(torch, _TORCH_NAMES[dtype])


def from_torch(torch_dtype) -> str:
    name = str(torch_dtype).removeprefix("torch.")
    try:
        return _FROM_TORCH[name]
    except KeyError:
        raise UsageError(f"unsupported tensor dtype {torch_dtype}") from None


def torch_name(dtype: str) -> str:
    """torch's name of a dtype (``bfloat16``), as pickles of ``torch.dtype`` record it."""
    return _TORCH_NAMES[dtype]


def hf_config_name(dtype: str) -> str:
    """How HF config.json spells a dtype (``bfloat16``)."""
    return _TORCH_NAMES[dtype]


def from_name(name: str) -> str:
    """torch-style name (``bfloat16``, ``torch.float16``) -> IR dtype."""
    return parse_dtype(_FROM_TORCH.get(name.removeprefix("torch."), name.removeprefix("torch.")))
