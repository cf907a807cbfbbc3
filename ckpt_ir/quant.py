"""Block-quantized HF checkpoints (``quantization_config`` in config.json).

Reading: FP8 block-scaled (``quant_method: fp8``: ``X.weight`` float8_e4m3fn with one inverse scale
per ``weight_block_size`` tile in ``X.weight_scale_inv``, fp32 or ue8m0; without a
``weight_block_size`` one scale per weight, and the static activation scales ``X.activation_scale``
of W8A8 inference, which hold no part of the weights, left out: Ministral 3's releases), MXFP4 (``quant_method:
mxfp4``: ``X_blocks`` packed e2m1 pairs with one e8m0 exponent per 32 values in ``X_scales``) and
INT4 pack-quantized (``quant_method: compressed-tensors``, ``format: pack-quantized``: ``X.weight_packed``
int32 words of eight offset-binary nibbles, ``X.weight_scale`` one scale per ``group_size`` values of a
row, ``X.weight_shape``; Kimi-K2.5's routed experts) become one lazy :class:`~ckpt_ir.ir.expr.Dequantize` expression per weight, under the weight's plain name,
so the families see an ordinary checkpoint.  The ``dequantize`` pass casts them to the compute dtype.
"""

from __future__ import annotations

import math
import re
from typing import Any

import attrs

from ckpt_ir.errors import FormatError, VerifyError
from ckpt_ir.ir import expr as E

FP8_SCALE = "_scale_inv"  # X.weight -> X.weight_scale_inv
ACTIVATION_SCALE = ".activation_scale"  # X.activation_scale: W8A8's static input scale (Ministral 3)
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
INT4_PACKED, INT4_SCALE, INT4_SHAPE = "_packed", "_scale", "_shape"  # X.weight -> X.weight_packed, ...


def quant_config(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    """The config's ``quantization_config``: at its top level, or in a multi-module model's
    ``text_config`` (the language model alone quantized), or None."""
    cfg = cfg or {}
    for where in (cfg, cfg.get("text_config")):
        q = where.get("quantization_config") if isinstance(where, dict) else None
        if isinstance(q, dict):
            return q
    return None


def without_quant_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` without its quantization_config (top level and ``text_config``'s)."""
    out = {k: v for k, v in cfg.items() if k != "quantization_config"}
    if isinstance(out.get("text_config"), dict) and "quantization_config" in out["text_config"]:
        out["text_config"] = {k: v for k, v in out["text_config"].items() if k != "quantization_config"}
    return out


def quant_method(cfg: dict[str, Any] | None) -> str | None:
    """The config's ``quantization_config.quant_method`` (``fp8``, ``mxfp4``,
    ``compressed-tensors``), or None."""
    q = quant_config(cfg)
    return q.get("quant_method") if q is not None else None


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
    if method == "compressed-tensors":
        return _int4(raw, _int4_group(quant_config(cfg) or {}, where))
    raise FormatError(
        f"{where}: quantization_config.quant_method {method!r} is not supported (fp8 block-scaled, "
        f"mxfp4 and compressed-tensors int4 pack-quantized are); dequantize the checkpoint with its own tools first"
    )


def _int4_group(qcfg: dict[str, Any], where: str) -> int:
    """The group size of a compressed-tensors config that ckpt-ir reads: pack-quantized, every
    config group's weights 4-bit symmetric ints in groups of one size."""
    groups = qcfg.get("config_groups")
    weights = [g.get("weights") for g in groups.values()] if isinstance(groups, dict) else []
    ok = (
        qcfg.get("format") == "pack-quantized"
        and weights
        and all(
            isinstance(w, dict)
            and w.get("num_bits") == 4
            and w.get("type") == "int"
            and w.get("symmetric", True)
            and w.get("strategy") == "group"
            for w in weights
        )
    )
    sizes = {w.get("group_size") for w in weights} if ok else set()
    if len(sizes) != 1 or not isinstance(next(iter(sizes)), int) or next(iter(sizes)) <= 0:
        raise FormatError(
            f"{where}: quantization_config (compressed-tensors) is not int4 pack-quantized with one "
            f"group size (format pack-quantized, weights num_bits 4, type int, symmetric, strategy group); "
            f"dequantize the checkpoint with its own tools first"
        )
    return next(iter(sizes))


def _int4(raw: dict[str, E.Load], group: int) -> dict[str, E.Expr]:
    """``X.weight_packed`` + ``X.weight_scale`` (+ ``X.weight_shape``) -> ``X.weight``, dequantized
    as Megatron-Bridge's ``dequantize_int4`` computes it (``models/conversion/quantization_utils.py``
    493-544: the weight is [rows, 8 x packed columns], ``weight_shape`` unused)."""
    out: dict[str, E.Expr] = {}
    for key, load in raw.items():
        for suffix in (INT4_SCALE, INT4_SHAPE):
            if key.endswith(suffix) and key[: -len(suffix)] + INT4_PACKED in raw:
                break
        else:
            if not key.endswith(INT4_PACKED):
                out[key] = load
                continue
            base = key[: -len(INT4_PACKED)]
            scale = raw.get(base + INT4_SCALE)
            if scale is None or base + INT4_SHAPE not in raw:
                missing = base + (INT4_SCALE if scale is None else INT4_SHAPE)
                raise FormatError(
                    f"{load.path}: int4 tensor {key} has no {missing}; the checkpoint is incomplete "
                    f"(re-download the missing shard)"
                )
            try:
                out[base] = E.Dequantize(load, scale, (1, group), "int4")
            except VerifyError as e:
                raise FormatError(f"{scale.path}: scale tensor {scale.key} does not fit {key}: {e}") from None
    return out


def _block(qcfg: dict[str, Any], where: str) -> tuple[int, int] | None:
    """The config's ``weight_block_size`` (rows, cols); None where it has none: one scale per
    tensor (Ministral 3's releases; transformers' FP8Linear with ``block_size`` None)."""
    block = qcfg.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise FormatError(
            f"{where}: quantization_config.weight_block_size is {block!r}; fp8 is read block-scaled "
            f"([rows, cols] of positive integers) or with one scale per tensor (no weight_block_size)"
        )
    return (block[0], block[1])


def _fp8(raw: dict[str, E.Load], qcfg: dict[str, Any], where: str) -> dict[str, E.Expr]:
    block = _block(qcfg, where)
    out: dict[str, E.Expr] = {}
    for key, load in raw.items():
        if key.endswith(FP8_SCALE):
            wkey = key[: -len(FP8_SCALE)]
            if wkey not in raw:
                raise FormatError(
                    f"{load.path}: scale tensor {key} has no weight {wkey}; the checkpoint is incomplete"
                )
            continue
        if key.endswith(ACTIVATION_SCALE) and key[: -len(ACTIVATION_SCALE)] + ".weight" + FP8_SCALE in raw:
            continue  # a static activation scale of W8A8 inference: no part of the weights
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
        tile: tuple[int, int] | None = block
        if tile is None:  # one scale for the whole weight: a single tile
            if len(load.shape) != 2 or math.prod(scale.shape) != 1:
                raise FormatError(
                    f"{scale.path}: scale tensor {scale.key} has shape {list(scale.shape)}, but the config has no "
                    f"weight_block_size (one scale per 2-D weight); give the release's weight_block_size"
                )
            tile = (load.shape[0], load.shape[1])
        grid: E.Expr = scale if block is not None else E.Reshape(scale, (1, 1))
        try:
            out[key] = E.Dequantize(load, grid, tile, "fp8")
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


# what the FP8 releases keep unquantized besides 1-D tensors: embeddings, norms, the output head
# (DeepSeek's MTP copy of it too) and the MoE router gates (HF ``mlp.gate``, canonical ``mlp.router``;
# a canonical ``mlp.gate`` is a dense MLP's gate projection)
_KEEP = re.compile(r"(embed|norm|head\.weight$|\.router\.weight$)")
_HF_ROUTER = re.compile(r"(mlp|block_sparse_moe)\.gate\.weight$")


def fp8_by_default(name: str, shape: tuple[int, ...], canonical: bool = False) -> bool:
    """Whether a weight is quantized when no release says otherwise: every 2-D linear weight
    but those above (``name`` is an HF name, or canonical when ``canonical``)."""
    keep = _KEEP.search(name) or not canonical and _HF_ROUTER.search(name)
    return name.endswith(".weight") and len(shape) == 2 and not keep


def fp8_placeholder(load: E.Expr, qcfg: dict[str, Any], where: str) -> E.Expr:
    """``plan`` from an FP8 release's config: the placeholder ``load`` stored as fp8 values, its
    scales right after them."""
    assert isinstance(load, E.Load)
    block = _block(qcfg, where) or (load.shape[0], load.shape[1])  # no weight_block_size: one tile
    grid = tuple(-(-n // b) for n, b in zip(load.shape, block))
    scale_dtype = "F8_E8M0" if qcfg.get("scale_fmt") == "ue8m0" else "F32"
    q = attrs.evolve(load, load_dtype="F8_E4M3")
    scale = attrs.evolve(
        load, key=load.key + FP8_SCALE, full_shape=grid, load_dtype=scale_dtype, offset=load.offset + q.nbytes
    )
    return E.Dequantize(q, scale, block, "fp8")


@attrs.frozen
class Fp8Output:
    """``--quantize fp8``: the tile size and the scale format of the written weights."""

    block: tuple[int, int] = (128, 128)
    scale_fmt: str = "float"

    def config(self, unquantized: list[str]) -> dict[str, Any]:
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_block_size": list(self.block),
            "scale_fmt": self.scale_fmt,
            "modules_to_not_convert": unquantized,
        }

    def tensors(self, tensors: list[tuple[str, E.Expr]]) -> tuple[list[tuple[str, E.Expr]], dict[str, Any]]:
        """The HF tensors with the quantized ones as FP8 values + ``*_scale_inv``, and the
        quantization_config.  Quantized: the weights the source stored quantized, or (from an
        unquantized source) every 2-D linear weight but embeddings, norms, lm_head and router gates.
        A weight already stored in this form passes through byte for byte."""
        from_release = any(is_dequantized(e) for _, e in tensors)
        out: list[tuple[str, E.Expr]] = []
        unquantized: list[str] = []
        for name, e in tensors:
            if from_release:
                pick = is_dequantized(e)
            else:
                pick = fp8_by_default(name, e.shape)
            if not pick or len(e.shape) != 2:
                out.append((name, e))
                if name.endswith(".weight") and len(e.shape) == 2:
                    unquantized.append(name.removesuffix(".weight"))
                continue
            same = self._stored(e)
            if same is not None:
                out += [(name, same.q), (name + FP8_SCALE, same.scale)]
            else:
                out += [
                    (name, E.Quantize(e, self.block, self.scale_fmt, "weight")),
                    (name + FP8_SCALE, E.Quantize(e, self.block, self.scale_fmt, "scale")),
                ]
        return out, self.config(unquantized)

    def _stored(self, e: E.Expr) -> E.Dequantize | None:
        """The stored FP8 form of ``e`` when it is exactly that (same tiles, same scale format)."""
        scale_dtype = "F8_E8M0" if self.scale_fmt == "ue8m0" else "F32"
        if (
            isinstance(e, E.Dequantize)
            and e.scheme == "fp8"
            and e.block == self.block
            and e.scale.dtype == scale_dtype
        ):
            return e
        return None
