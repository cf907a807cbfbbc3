"""cast: change the dtype of floating-point tensors."""

from __future__ import annotations

import attrs

from ckpt_ir.errors import UsageError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.dtypes import FLOATING, parse_dtype
from ckpt_ir.ir.names import is_norm
from ckpt_ir.passes.manager import Allowed, Pass, option, register_pass


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
    summary = "Cast floating-point tensors to a dtype (norms optionally kept in fp32)"
    description = (
        "Every floating tensor becomes a cast of its expression; integer tensors are untouched. "
        "A cast to the dtype a tensor already has disappears in simplification, so a no-op cast "
        "costs nothing and round trips stay bit-exact."
    )
    guarantees = "floating tensors have the target dtype; spec.dtype updated"
    optimizer_state = "keep"  # master weights and moments stay fp32

    dtype: str = option(help="target dtype", allowed=FLOATING_DTYPE)
    keep_norms: bool = option(False, help="keep normalisation weights in fp32")

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        to = parse_dtype(self.dtype)
        out = {}
        for name, t in ckpt.tensors.items():
            if t.dtype not in FLOATING:
                out[name] = t
                continue
            want = "F32" if self.keep_norms and is_norm(name) else to
            out[name] = t.map(lambda e, w=want: E.simplify(E.Cast(e, w)))
        return ckpt.with_tensors(out, spec=attrs.evolve(ckpt.spec, dtype=to))


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
        cfg = ckpt.hf_config and {k: v for k, v in ckpt.hf_config.items() if k != "quantization_config"}
        return ckpt.with_tensors(out, spec=attrs.evolve(ckpt.spec, dtype=to), hf_config=cfg)
