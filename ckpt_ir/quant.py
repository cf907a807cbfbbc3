"""Block-quantized HF checkpoints (``quantization_config`` in config.json).

Reading: FP8 block-scaled (``quant_method: fp8``: ``X.weight`` float8_e4m3fn with one inverse scale
per ``weight_block_size`` tile in ``X.weight_scale_inv``, fp32 or ue8m0) and MXFP4 (``quant_method:
mxfp4``: ``X_blocks`` packed e2m1 pairs with one e8m0 exponent per 32 values in ``X_scales``) become
one lazy :class:`~ckpt_ir.ir.expr.Dequantize` expression per weight, under the weight's plain name,
so the families see an ordinary checkpoint.  The ``dequantize`` pass casts them to the compute dtype.
"""

from __future__ import annotations

from typing import Any

from ckpt_ir.errors import FormatError, VerifyError
from ckpt_ir.ir import expr as E

FP8_SCALE = "_scale_inv"  # X.weight -> X.weight_scale_inv
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"


def quant_method(cfg: dict[str, Any] | None) -> str | None:
    """The config's ``quantization_config.quant_method`` (``fp8``, ``mxfp4``), or None."""
    q = (cfg or {}).get("quantization_config")
    return q.get("quant_method") if isinstance(q, dict) else None


def dequantize_tensors(raw: dict[str, E.Load], cfg: dict[str, Any], where: str) -> dict[str, E.Expr]:
    """``raw`` with every quantized weight and its scales replaced by one Dequantize expression
    (fp32) under the weight's name; unquantized tensors pass through."""
    method = quant_method(cfg)
    if method is None:
        return dict(raw)
    if method == "fp8":
        return _fp8(raw, cfg["quantization_config"], where)
    if method == "mxfp4":
        return _mxfp4(raw)
    raise FormatError(
        f"{where}: quantization_config.quant_method {method!r} is not supported (fp8 block-scaled and "
        f"mxfp4 are); dequantize the checkpoint with its own tools first"
    )


def _fp8(raw: dict[str, E.Load], qcfg: dict[str, Any], where: str) -> dict[str, E.Expr]:
    block = qcfg.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise FormatError(
            f"{where}: quantization_config.weight_block_size is {block!r}; only block-scaled fp8 "
            f"([rows, cols] of positive integers) is supported"
        )
    out: dict[str, E.Expr] = {}
    for key, load in raw.items():
        if key.endswith(FP8_SCALE):
            wkey = key[: -len(FP8_SCALE)]
            if wkey not in raw:
                raise FormatError(
                    f"{load.path}: scale tensor {key} has no weight {wkey}; the checkpoint is incomplete"
                )
            continue
        scale = raw.get(key + FP8_SCALE)
        if scale is None:
            if load.dtype.startswith("F8_"):
                raise FormatError(
                    f"{load.path}: fp8 tensor {key} has no {key + FP8_SCALE}; the checkpoint is "
                    f"incomplete (re-download the missing shard)"
                )
            out[key] = load
            continue
        if load.dtype != "F8_E4M3":
            raise FormatError(f"{load.path}: tensor {key} is {load.dtype} but has a scale; expected F8_E4M3")
        try:
            out[key] = E.Dequantize(load, scale, tuple(block), "fp8")
        except VerifyError as e:
            raise FormatError(f"{scale.path}: scale tensor {scale.key} does not fit {key}: {e}") from None
    return out


def _mxfp4(raw: dict[str, E.Load]) -> dict[str, E.Expr]:
    out: dict[str, E.Expr] = {}
    for key, load in raw.items():
        if key.endswith(MX_SCALES) and key[: -len(MX_SCALES)] + MX_BLOCKS in raw:
            continue
        if not key.endswith(MX_BLOCKS):
            out[key] = load
            continue
        base = key[: -len(MX_BLOCKS)]
        scale = raw.get(base + MX_SCALES)
        if scale is None:
            raise FormatError(
                f"{load.path}: mxfp4 tensor {key} has no {base + MX_SCALES}; the checkpoint is incomplete"
            )
        try:
            deq: E.Expr = E.Dequantize(load, scale, (1, 32), "mxfp4")
        except VerifyError as e:
            raise FormatError(f"{scale.path}: scale tensor {scale.key} does not fit {key}: {e}") from None
        # experts are stored [experts, out, in]; the bf16 checkpoint (and transformers) hold [experts, in, out]
        out[base] = E.Transpose(deq, 1, 2) if len(deq.shape) == 3 else deq
    return out


def is_dequantized(e: E.Expr) -> bool:
    return any(isinstance(n, E.Dequantize) for n in E.walk(e))
