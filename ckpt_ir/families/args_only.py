"""The args-only family: any model Megatron-Core builds, described by its Megatron args alone.

Every tensor Megatron writes has a role (whose split rule is Megatron's own), so Megatron targets
need no HF family; it has no HF names, and an HF target is refused
(:func:`ckpt_ir.megatron.infer.require_hf`).  Which HF family computes the same function as such a
model is inferred from the args by :mod:`ckpt_ir.megatron.infer`.
"""

from __future__ import annotations

from ckpt_ir.families import Family, register

MEGATRON = register(
    Family(name="megatron", model_types=(), architecture="(none: Megatron targets only)", tensors=())
)
