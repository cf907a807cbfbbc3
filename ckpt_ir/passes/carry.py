"""Passes that change what the output carries or how it names it, never a tensor's values:
``drop-optimizer-state`` and ``rename-norms``."""

from __future__ import annotations

import attrs

from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.layout import NORM_NAMES
from ckpt_ir.passes.manager import Pass, one_of, option, register_pass


@register_pass
class DropOptimizerState(Pass):
    name = "drop-optimizer-state"
    summary = "Leave the distributed-optimizer state (fp32 masters, Adam moments) out, recorded as dropped"
    description = (
        "Only a Megatron target carries optimizer state; the derived pipeline ends with this pass for "
        "other targets and with --no-optimizer."
    )
    guarantees = "no optimizer-state tensor sets; each dropped set listed in the output's notes"
    optimizer_state = "drop"
    drop_reason = "left out by drop-optimizer-state (only a Megatron target carries it; or --no-optimizer)"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return ckpt


@register_pass
@attrs.frozen
class RenameNorms(Pass):
    name = "rename-norms"
    summary = "Choose Megatron's norm key naming: local, te (Transformer Engine) or te-input"
    description = (
        "local: input_layernorm / pre_mlp_layernorm; te: fused into linear_qkv / linear_fc1 as "
        "layer_norm_weight (Megatron's TE spec); te-input: only the input norm fused (MindSpeed-LLM "
        "v2's transformer_engine output).  Tensors are unchanged; the Megatron backend names them."
    )
    guarantees = "layout.norm_names set"
    optimizer_state = "follow"

    names: str = option(help="norm key naming", allowed=one_of(*NORM_NAMES))

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return ckpt.with_tensors(dict(ckpt.tensors), layout=attrs.evolve(ckpt.layout, norm_names=self.names))
