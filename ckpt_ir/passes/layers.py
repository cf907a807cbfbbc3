"""select-layers: keep a subset of layers (a small debug checkpoint from a big one)."""

from __future__ import annotations

import attrs

from ckpt_ir.errors import UsageError
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.names import layer_name, split_layer
from ckpt_ir.ir.roles import canonical_order
from ckpt_ir.passes.manager import NO_NOOP, SINGLE_STAGE, Pass, at_least, option, register_pass


@register_pass
@attrs.frozen
class SelectLayers(Pass):
    name = "select-layers"
    summary = "Keep only the listed layers (negative = from the end), renumbered from 0; spec updated"
    requires = (SINGLE_STAGE, NO_NOOP)
    guarantees = "spec.num_layers = number kept; layers renumbered 0..n-1 in the given order"
    optimizer_state = "follow"

    keep: tuple[int, ...] = option(help="layer indices to keep, e.g. 0,1,-1")

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        n = ckpt.spec.num_layers
        keep = []
        for i in self.keep:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise UsageError(f"select-layers: layer {i} does not exist (the model has {n} layers)")
            if j in keep:
                raise UsageError(f"select-layers: layer {i} listed twice")
            keep.append(j)
        new_index = {old: new for new, old in enumerate(keep)}
        out = {}
        for name, t in ckpt.tensors.items():
            layer, rest = split_layer(name)
            if layer is None:
                out[name] = t
            elif layer in new_index:
                new = layer_name(new_index[layer], rest)
                out[new] = attrs.evolve(t, name=new)
        out = dict(sorted(out.items(), key=lambda kv: canonical_order(kv[0])))
        # multi-token-prediction layers (numbered after the main ones) are not kept
        dense = tuple(new_index[i] for i in ckpt.spec.dense_layers if i in new_index)
        shared = tuple(new_index[i] for i in ckpt.spec.shared_index_layers if i in new_index)
        linear = tuple(new_index[i] for i in ckpt.spec.linear_layers if i in new_index)
        spec = attrs.evolve(
            ckpt.spec,
            num_layers=len(keep),
            mtp_layers=0,
            dense_layers=dense,
            shared_index_layers=shared,
            linear_layers=linear,
        )
        cfg = dict(ckpt.hf_config) if ckpt.hf_config is not None else None
        return ckpt.with_tensors(out, spec=spec, hf_config=cfg)


@register_pass
@attrs.frozen
class DropMtp(Pass):
    name = "drop-mtp"
    summary = "Keep only the first `keep` multi-token-prediction layers (the rest are recorded as dropped)"
    guarantees = "spec.mtp_layers = min(keep, present); dropped tensors listed with the reason"
    optimizer_state = "follow"

    keep: int = option(0, help="MTP layers to keep", allowed=at_least(0))

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        keep = self.keep
        limit = ckpt.spec.num_layers + min(keep, ckpt.spec.mtp_layers)
        out, dropped = {}, dict(ckpt.dropped)
        for name, t in ckpt.tensors.items():
            layer, _ = split_layer(name)
            if layer is not None and layer >= limit:
                dropped[name] = f"multi-token-prediction layer beyond drop-mtp{{keep={keep}}}"
            else:
                out[name] = t
        spec = attrs.evolve(ckpt.spec, mtp_layers=limit - ckpt.spec.num_layers)
        return ckpt.with_tensors(out, spec=spec, dropped=dropped)
