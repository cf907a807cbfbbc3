"""shard / gather: tensor parallelism (cuts tensors) and pipeline placement (layout only)."""

from __future__ import annotations

import attrs

from ckpt_ir.ir import layout as L
from ckpt_ir.ir.checkpoint import Checkpoint, gather_exprs, shard_expr
from ckpt_ir.ir.roles import split_rule, tp_of
from ckpt_ir.passes.manager import GATHERED, MOE, NO_NOOP, SINGLE_STAGE, Pass, at_least, option, register_pass


@register_pass
@attrs.frozen
class Shard(Pass):
    name = "shard"
    summary = "Split tensors over TP ranks and place layers on PP stages / VPP chunks"
    description = (
        "Column-parallel tensors (qkv, fc1, embeddings, output layer) are cut on dim 0, row-parallel "
        "ones (linear_proj, fc2) on dim 1, norms are replicated.  Pipeline placement only sets the "
        "layout: an even split, a per-stage --num-layer-list, or VPP chunks of vpp-layers each."
    )
    requires = (GATHERED,)
    guarantees = "split tensors have tp shards (experts: etp shards); layout tp/pp/vpp/layer list/ep/etp set"
    optimizer_state = "follow"

    tp: int = option(1, help="tensor parallel size", allowed=at_least(1))
    pp: int = option(1, help="pipeline parallel size", allowed=at_least(1))
    vpp_layers: int | None = option(None, help="layers per virtual pipeline stage", allowed=at_least(1))
    num_layer_list: tuple[int, ...] | None = option(
        None,
        help="layers per pipeline stage, e.g. 2,6 (MindSpeed-MM's layout: per stage of each virtual chunk, 0 allowed)",
        allowed=at_least(0),
    )
    ep: int = option(1, help="expert parallel size (MoE)", allowed=at_least(1))
    etp: int | None = option(
        None, help="expert tensor parallel size: 1 (whole experts) or tp (default)", allowed=at_least(1)
    )
    vision_tp: int = option(
        1, help="a vision tower's tensor parallel size (1: whole on every rank)", allowed=at_least(1)
    )
    vision_layer_list: tuple[int, ...] | None = option(
        None,
        help="a vision tower's layers per pipeline stage (and virtual chunk), e.g. 2,0 (default: all on stage 0)",
        allowed=at_least(0),
    )

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        etp = self.etp
        layout = attrs.evolve(
            ckpt.layout,
            tp=self.tp,
            pp=self.pp,
            vpp_layers=self.vpp_layers,
            num_layer_list=self.num_layer_list,
            ep=self.ep,
            etp=None if etp is None or etp == self.tp else etp,
            vision_tp=self.vision_tp,
            vision_layer_list=self.vision_layer_list,
        )
        L.validate(ckpt.spec, layout)
        L.expert_rank_files(layout)  # TP/EP compatibility with expert TP = 1
        out = {}
        for name, t in ckpt.tensors.items():
            rule = split_rule(name, ckpt.spec)
            tp = tp_of(name, layout)
            if rule is None or tp == 1:
                out[name] = t
            else:
                out[name] = attrs.evolve(t, shards=tuple(shard_expr(t.expr, rule, tp)), split=rule)
        return ckpt.with_tensors(out, layout=layout)


@register_pass
class Gather(Pass):
    name = "gather"
    summary = "Join TP shards into whole tensors and drop pipeline placement (tp=1, pp=1)"
    guarantees = "tp=1, pp=1, no VPP or layer list; no-op layers and vocab padding unchanged"
    optimizer_state = "follow"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        out = {}
        for name, t in ckpt.tensors.items():
            if t.tp == 1:
                out[name] = attrs.evolve(t, split=None)
            else:
                assert t.split is not None  # TensorNode refuses several shards without a split rule
                out[name] = attrs.evolve(t, shards=(gather_exprs(t.shards, t.split),), split=None)
        layout = attrs.evolve(
            ckpt.layout,
            tp=1,
            pp=1,
            vpp_layers=None,
            num_layer_list=None,
            ep=1,
            etp=None,
            vision_tp=1,
            vision_layer_list=None,
        )
        return ckpt.with_tensors(out, layout=layout)


@register_pass
class GroupExperts(Pass):
    name = "group-experts"
    summary = (
        "Store MoE experts as Megatron grouped-GEMM weight1/weight2 (set on the layout; lowered on write)"
    )
    requires = (MOE,)
    guarantees = "layout.grouped_gemm; tensors stay per expert in the IR"
    optimizer_state = "follow"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        layout = attrs.evolve(ckpt.layout, grouped_gemm=True)
        L.validate(ckpt.spec, layout)
        return ckpt.with_tensors(dict(ckpt.tensors), layout=layout)


@register_pass
class UngroupExperts(Pass):
    name = "ungroup-experts"
    summary = "Store MoE experts one by one (local_experts.N) instead of grouped GEMM"
    guarantees = "not layout.grouped_gemm"
    optimizer_state = "follow"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return ckpt.with_tensors(dict(ckpt.tensors), layout=attrs.evolve(ckpt.layout, grouped_gemm=False))


@register_pass
@attrs.frozen
class InsertNoopLayers(Pass):
    name = "insert-noop-layers"
    summary = "Insert identity (no-op) layers at global Megatron layer indices, for pipeline balance"
    description = (
        "No-op layers have no parameters: nothing is written for them, and the real layers fill the "
        "other positions in order, so a stage's local layer numbers have gaps at no-op slots."
    )
    requires = (NO_NOOP,)
    guarantees = "layout.noop_layers set; Megatron num_layers = real layers + no-op count"
    optimizer_state = "follow"

    layers: tuple[int, ...] = option(
        help="global Megatron indices of the no-op layers, e.g. 94,95", allowed=at_least(0)
    )

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        layout = attrs.evolve(ckpt.layout, noop_layers=self.layers)
        L.validate(ckpt.spec, layout)
        return ckpt.with_tensors(dict(ckpt.tensors), layout=layout)


@register_pass
class RemoveNoopLayers(Pass):
    name = "remove-noop-layers"
    summary = "Remove no-op layers (the real layers keep their order)"
    requires = (SINGLE_STAGE,)
    guarantees = "layout.noop_layers empty"
    optimizer_state = "follow"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return ckpt.with_tensors(dict(ckpt.tensors), layout=attrs.evolve(ckpt.layout, noop_layers=()))
