"""cast: change the dtype of floating-point tensors."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from ckpt_ir.errors import UsageError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.dtypes import FLOATING, parse_dtype
from ckpt_ir.ir.names import is_norm, role_of
from ckpt_ir.passes.manager import Allowed, Pass, one_of, option, register_pass


def _floating(text: str) -> bool:
    try:
        return parse_dtype(text) in FLOATING
    except UsageError:
        return False


# what cast and dequantize take: any spelling --dtype takes of a floating dtype
FLOATING_DTYPE = Allowed(
    "a floating dtype: bf16, fp16, fp32, fp64 or another spelling of one (bfloat16, float32, F32, ...)",
    _floating,
)


@register_pass
@attrs.frozen
class CastPass(Pass):
    name = "cast"
    summary = "Cast floating-point tensors to a dtype (norms, or what a loader keeps, in fp32)"
    description = (
        "Every floating tensor becomes a cast of its expression; integer tensors are untouched. "
        "A cast to the dtype a tensor already has disappears in simplification, so a no-op cast "
        "costs nothing and round trips stay bit-exact. keep-fp32=transformers keeps in fp32 what "
        "transformers' from_pretrained keeps in fp32 in that dtype (the family's "
        "_keep_in_fp32_modules_strict, and _keep_in_fp32_modules under fp16: DeepSeek's router); "
        "keep-fp32=megatron what megatron-core does (the router's expert bias)."
    )
    guarantees = "floating tensors have the target dtype (fp32 where kept); spec.dtype updated"
    optimizer_state = "keep"  # master weights and moments stay fp32

    dtype: str = option(help="target dtype", allowed=FLOATING_DTYPE)
    keep_norms: bool = option(False, help="keep normalisation weights in fp32")
    keep_fp32: str = option(
        "none",
        help="keep in fp32 what a loader does: transformers, megatron, none",
        allowed=one_of("transformers", "megatron", "none"),
    )

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        to = parse_dtype(self.dtype)
        kept = kept_in_fp32(ckpt, to, self.keep_fp32)
        out = {}
        for name, t in ckpt.tensors.items():
            if t.dtype not in FLOATING:
                out[name] = t
                continue
            want = "F32" if self.keep_norms and is_norm(name) or kept(name) else to
            out[name] = t.map(lambda e, w=want: E.simplify(E.Cast(e, w)))
        return ckpt.with_tensors(out, spec=attrs.evolve(ckpt.spec, dtype=to))


def kept_in_fp32(ckpt: Checkpoint, dtype: str, loader: str) -> Callable[[str], bool]:
    """Whether ``loader`` keeps a tensor (a canonical name of ``ckpt``) in fp32 when it loads the
    model in ``dtype``: ``transformers`` as ``from_pretrained(..., dtype=...)`` does (its
    ``_keep_in_fp32_modules*`` and the family's fp32 parameters), ``megatron`` as megatron-core
    does (the router's expert bias), ``none`` nothing."""
    from ckpt_ir.families import by_name
    from ckpt_ir.families.transformers_fp32 import kept_in_fp32 as transformers_fp32
    from ckpt_ir.megatron.keys import KEPT_FP32

    if loader == "none":
        return lambda name: False
    if loader == "megatron":
        return lambda name: role_of(name) in KEPT_FP32
    family = by_name(ckpt.spec.family)
    pattern = transformers_fp32(family, dtype)
    if pattern is None:
        return lambda name: False
    return lambda name: (hf := family.names.from_canonical(name)) is not None and bool(pattern.search(hf))


@register_pass
@attrs.frozen
class DequantizePass(Pass):
    name = "dequantize"
    summary = "Dequantize block-quantized weights (FP8, MXFP4) to the compute dtype"
    description = (
        "Every weight the HF frontend lifted from quantized storage (a dequantize expression: the "
        "stored values times their block scales, exactly in fp32) becomes a cast of it to the "
        "target dtype, rounded once as transformers' own dequantization does; the config's "
        "quantization_config is dropped, so the output is an ordinary checkpoint."
    )
    guarantees = (
        "no tensor is quantized; spec.dtype is the target dtype; hf_config has no quantization_config"
    )
    optimizer_state = "keep"

    dtype: str | None = option(
        None, help="target dtype (default: the config's compute dtype)", allowed=FLOATING_DTYPE
    )

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        from ckpt_ir.quant import is_dequantized

        to = parse_dtype(self.dtype) if self.dtype else ckpt.spec.dtype
        out = {
            name: t.map(lambda e: E.simplify(E.Cast(e, to)))
            if any(is_dequantized(s) for s in t.shards)
            else t
            for name, t in ckpt.tensors.items()
        }
        from ckpt_ir.quant import without_quant_config

        cfg = ckpt.hf_config and without_quant_config(ckpt.hf_config)
        return ckpt.with_tensors(out, spec=attrs.evolve(ckpt.spec, dtype=to), hf_config=cfg)
