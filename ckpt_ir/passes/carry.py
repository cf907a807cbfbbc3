"""Passes that change what the output carries or how it names it, never a tensor's values:
``drop-optimizer-state``, ``rename-norms``, ``rename-mla`` and ``rename-mm``."""

from __future__ import annotations

import attrs

from ckpt_ir.errors import UsageError
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.layout import LORA_KEYS, MLA_KEYS, MM_KEYS, NORM_NAMES
from ckpt_ir.passes.manager import Pass, Requirement, one_of, option, register_pass


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


@register_pass
@attrs.frozen
class RenameMla(Pass):
    name = "rename-mla"
    summary = "Choose whose Megatron modules multi-latent attention is written with: mindspeed or mcore"
    description = (
        "mindspeed: MindSpeed-LLM's (the two down-projections fused into one linear_qkv, whole on "
        "every TP rank; an MTP layer's final norm in mtp.final_layernorms.<k>); mcore: megatron-core's "
        "own, as Megatron-LM writes them and its GPTModel loads (linear_q_down_proj or linear_q_proj, "
        "and linear_kv_down_proj: split over TP with local norm names, the local layer spec; whole "
        "with te, the Transformer-Engine spec, whose q / kv norms are the up-projections' "
        "layer_norm_weight; mtp.layers.<k>.final_layernorm and decoder.final_layernorm).  Tensors "
        "are unchanged; the Megatron backend names and cuts them."
    )
    requires = (Requirement("a multi-latent-attention model", lambda c: c.spec.mla),)
    guarantees = "layout.mla_keys set"
    optimizer_state = "follow"

    keys: str = option(help="whose MLA modules", allowed=one_of(*MLA_KEYS))

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return ckpt.with_tensors(dict(ckpt.tensors), layout=attrs.evolve(ckpt.layout, mla_keys=self.keys))


@register_pass
@attrs.frozen
class RenameLora(Pass):
    name = "rename-lora"
    summary = "Choose whose names unmerged Megatron LoRA factors take: mindspeed or bridge"
    description = (
        "mindspeed: X.lora_A.default.weight / X.lora_B.default.weight beside X.weight (A of a "
        "column-parallel module and B of a row-parallel one whole on every TP rank); bridge: "
        "Megatron-Bridge's X.adapter.linear_in.weight / X.adapter.linear_out.weight, those two split "
        "on dim 0 over TP (ckpt_ir.megatron.keys.LORA_NAMINGS).  Tensors are unchanged; the Megatron "
        "backend names and cuts them."
    )
    guarantees = "layout.lora_keys set"
    optimizer_state = "follow"

    keys: str = option(help="whose LoRA names", allowed=one_of(*LORA_KEYS))

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return ckpt.with_tensors(dict(ckpt.tensors), layout=attrs.evolve(ckpt.layout, lora_keys=self.keys))


@register_pass
@attrs.frozen
class RenameMm(Pass):
    name = "rename-mm"
    summary = "Choose a vision-language model's Megatron names: bridge (Megatron-Bridge) or mindspeed (MindSpeed-MM)"
    description = (
        "bridge: the language model under language_model.*, the vision tower as its Megatron-Bridge "
        "bridge keeps it (Qwen2.5-VL: transformers' visual.* whole on every TP rank of stage 0); "
        "mindspeed: MindSpeed-MM's text_decoder.* and image_encoder.* (the tower in Megatron's "
        "modules, split over TP, per-stage vision layers).  Tensors are unchanged; the Megatron "
        "backend names them."
    )
    guarantees = "layout.mm_keys set"
    optimizer_state = "follow"

    keys: str = option(help="whose names", allowed=one_of(*MM_KEYS))

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        if ckpt.spec.vision is None:
            raise UsageError(f"rename-mm: {ckpt.spec.family} has no vision tower; leave it out")
        return ckpt.with_tensors(dict(ckpt.tensors), layout=attrs.evolve(ckpt.layout, mm_keys=self.keys))
