"""fuse-qkv / unfuse-qkv, fuse-gate-up / unfuse-gate-up.

Megatron's fused QKV interleaves per query group: for each of the ``ng`` groups, its ``nh/ng``
query heads, then its key head, then its value head (``d`` rows each).  A TP split of dim 0 then
gives every rank whole groups.  The fused gate/up tensor is ``[gate; up]``; its TP split takes a
part of each half (see the ``mlp.gate_up`` split rule), which is Megatron's per-rank
``[gate_r; up_r]`` layout.  Each fusion is one function; the unfused form is derived by slicing,
so ``unfuse(fuse(x))`` simplifies back to the original loads.
"""

from __future__ import annotations

import re

import attrs

from ckpt_ir.errors import VerifyError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode
from ckpt_ir.ir.names import layer_name, split_layer
from ckpt_ir.ir.spec import ModelSpec
from ckpt_ir.passes.manager import Pass, register_pass


def qkv_pieces(spec: ModelSpec) -> list[tuple[str, int, int]]:
    """The fused QKV row order as (part, start row in that part, rows), group by group."""
    d, hpg = spec.head_dim, spec.heads_per_group
    out = []
    for g in range(spec.num_kv_heads):
        out += [("q", g * hpg * d, hpg * d), ("k", g * d, d), ("v", g * d, d)]
    return out


def _require_whole(ckpt: Checkpoint, name: str) -> None:
    if ckpt.layout.tp != 1:
        raise VerifyError(f"{name} needs whole tensors (tp=1); run gather first")


def _rebuild(ckpt: Checkpoint, replace: dict[str, dict[str, E.Expr]], drop: set[str]) -> dict[str, TensorNode]:
    """New tensor map: ``drop`` removed; each key of ``replace`` (an anchor tensor) is followed by
    the new tensors it maps to, so output order stays layer-major."""
    out: dict[str, TensorNode] = {}
    for name, t in ckpt.tensors.items():
        if name in replace:
            for new_name, e in replace[name].items():
                out[new_name] = TensorNode.whole(new_name, E.simplify(e))
        if name not in drop:
            out[name] = t
    return out


# gated MLPs: the dense one, each routed expert, and the shared experts
GATE = re.compile(r"^(mlp\.(?:experts\.\d+\.|shared\.)?)gate\.weight$")
GATE_UP = re.compile(r"^(mlp\.(?:experts\.\d+\.|shared\.)?)gate_up\.(.+)$")

# What the fusion rules apply to, per target: tensors whose rows are output features (weight,
# bias, LoRA B, DoRA magnitude, saved copies) are interleaved/stacked like the weight; LoRA A (input side) is shared.
ROW_STACKED = ("weight", "bias", "lora_b.weight", "lora_magnitude.weight", "lora_saved.weight", "lora_saved.bias")
SHARED = "lora_a.weight"


def _shared(ckpt: Checkpoint, names: list[str], pass_name: str):
    """The one expression that several parts share (LoRA A), or an error if they differ."""
    exprs = [ckpt.tensors[n].expr for n in names]
    if any(e != exprs[0] for e in exprs[1:]):
        raise VerifyError(f"{pass_name}: {', '.join(names)} differ; separate LoRA A matrices cannot be fused "
                          f"(merge the adapter first with lora-merge)")
    return exprs[0]


def _parts_present(ckpt: Checkpoint, layer: int, parts: tuple[str, ...], kind: str) -> bool:
    return all(layer_name(layer, f"{p}.{kind}") in ckpt.tensors for p in parts)


def _mla_q_down(ckpt: Checkpoint) -> str:
    return "attn.q_a.weight" if ckpt.spec.q_lora_rank else "attn.q.weight"


def _fuse_mla(ckpt: Checkpoint) -> Checkpoint:
    """MLA: Megatron's linear_qkv is [q_a (or q); kv_a], the two down-projections stacked."""
    q_down = _mla_q_down(ckpt)
    replace: dict[str, dict[str, E.Expr]] = {}
    drop: set[str] = set()
    for name in ckpt.tensors:
        layer, rest = split_layer(name)
        if layer is None or rest != q_down:
            continue
        kv = layer_name(layer, "attn.kv_a.weight")
        replace[name] = {layer_name(layer, "attn.qkv_a.weight"):
                         E.Concat((ckpt.tensors[name].expr, ckpt.tensors[kv].expr), 0)}
        drop |= {name, kv}
    return ckpt.with_tensors(_rebuild(ckpt, replace, drop), layout=attrs.evolve(ckpt.layout, fused_qkv=True))


def _unfuse_mla(ckpt: Checkpoint) -> Checkpoint:
    q_down = _mla_q_down(ckpt)
    q_rows = ckpt.spec.q_lora_rank or ckpt.spec.mla_q_size
    replace: dict[str, dict[str, E.Expr]] = {}
    for name, t in ckpt.tensors.items():
        layer, rest = split_layer(name)
        if layer is None or rest != "attn.qkv_a.weight":
            continue
        replace[name] = {layer_name(layer, q_down): E.Slice(t.expr, 0, 0, q_rows),
                         layer_name(layer, "attn.kv_a.weight"): E.Slice(t.expr, 0, q_rows, t.shape[0])}
    return ckpt.with_tensors(_rebuild(ckpt, replace, set(replace)), layout=attrs.evolve(ckpt.layout, fused_qkv=False))


@register_pass
class FuseQKV(Pass):
    name = "fuse-qkv"
    summary = "Fuse separate q/k/v (weights, biases, LoRA) into Megatron's per-group interleaved linear_qkv"
    requires = "tp=1, separate q/k/v"
    guarantees = "layers.N.attn.qkv.{weight,bias,lora_*} in per-query-group [q heads; k; v] order"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        _require_whole(ckpt, self.name)
        if ckpt.spec.mla:
            return _fuse_mla(ckpt)
        replace: dict[str, dict[str, E.Expr]] = {}
        drop: set[str] = set()
        parts = ("attn.q", "attn.k", "attn.v")
        for name in ckpt.tensors:
            layer, rest = split_layer(name)
            if layer is None or rest != "attn.q.weight":
                continue
            new: dict[str, E.Expr] = {}
            for kind in (*ROW_STACKED, SHARED):
                if not _parts_present(ckpt, layer, parts, kind):
                    continue
                names = [layer_name(layer, f"{p}.{kind}") for p in parts]
                drop |= set(names)
                if kind == SHARED:
                    new[layer_name(layer, f"attn.qkv.{kind}")] = _shared(ckpt, names, self.name)
                    continue
                src = dict(zip("qkv", (ckpt.tensors[n].expr for n in names)))
                new[layer_name(layer, f"attn.qkv.{kind}")] = E.Concat(
                    tuple(E.Slice(src[p], 0, a, a + n) for p, a, n in qkv_pieces(ckpt.spec)), 0)
            replace[name] = new
        return ckpt.with_tensors(_rebuild(ckpt, replace, drop), layout=attrs.evolve(ckpt.layout, fused_qkv=True))


@register_pass
class UnfuseQKV(Pass):
    name = "unfuse-qkv"
    summary = "Split Megatron's per-group interleaved linear_qkv (and its LoRA) into separate q/k/v"
    requires = "tp=1, fused QKV"
    guarantees = "layers.N.attn.{q,k,v}.{weight,bias,lora_*}; LoRA A shared by q, k and v"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        _require_whole(ckpt, self.name)
        if ckpt.spec.mla:
            return _unfuse_mla(ckpt)
        replace: dict[str, dict[str, E.Expr]] = {}
        for name, t in ckpt.tensors.items():
            layer, rest = split_layer(name)
            if layer is None or not rest.startswith("attn.qkv."):
                continue
            kind = rest[len("attn.qkv."):]
            if kind == SHARED:
                replace[name] = {layer_name(layer, f"attn.{p}.{kind}"): t.expr for p in "qkv"}
                continue
            chunks: dict[str, list[E.Expr]] = {"q": [], "k": [], "v": []}
            pos = 0
            for p, _a, n in qkv_pieces(ckpt.spec):
                chunks[p].append(E.Slice(t.expr, 0, pos, pos + n))
                pos += n
            replace[name] = {layer_name(layer, f"attn.{p}.{kind}"): E.Concat(tuple(xs), 0) for p, xs in chunks.items()}
        return ckpt.with_tensors(_rebuild(ckpt, replace, set(replace)),
                                 layout=attrs.evolve(ckpt.layout, fused_qkv=False))


@register_pass
class FuseGateUp(Pass):
    name = "fuse-gate-up"
    summary = "Fuse separate gate/up projections (and their LoRA) into one [gate; up] linear_fc1"
    requires = "tp=1, separate gate/up"
    guarantees = "layers.N.mlp.gate_up.* = [gate; up] (TP splits each half: Megatron's per-rank layout)"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        _require_whole(ckpt, self.name)
        replace: dict[str, dict[str, E.Expr]] = {}
        drop: set[str] = set()
        for name in ckpt.tensors:
            layer, rest = split_layer(name)
            m = GATE.match(rest) if layer is not None else None
            if not m:
                continue
            mlp = m.group(1)  # the dense MLP, one expert, or the shared experts
            parts = (mlp + "gate", mlp + "up")
            new: dict[str, E.Expr] = {}
            for kind in ("weight", "lora_b.weight", SHARED):
                if not _parts_present(ckpt, layer, parts, kind):
                    continue
                names = [layer_name(layer, f"{p}.{kind}") for p in parts]
                drop |= set(names)
                fused = layer_name(layer, f"{mlp}gate_up.{kind}")
                new[fused] = (_shared(ckpt, names, self.name) if kind == SHARED
                              else E.Concat(tuple(ckpt.tensors[n].expr for n in names), 0))
            replace[name] = new
        return ckpt.with_tensors(_rebuild(ckpt, replace, drop), layout=attrs.evolve(ckpt.layout, fused_gate_up=True))


@register_pass
class UnfuseGateUp(Pass):
    name = "unfuse-gate-up"
    summary = "Split a fused [gate; up] linear_fc1 (and its LoRA) into separate gate and up projections"
    requires = "tp=1, fused gate/up"
    guarantees = "layers.N.mlp.{gate,up}.*; LoRA A shared by gate and up"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        _require_whole(ckpt, self.name)
        replace: dict[str, dict[str, E.Expr]] = {}
        for name, t in ckpt.tensors.items():
            layer, rest = split_layer(name)
            m = GATE_UP.match(rest) if layer is not None else None
            if not m:
                continue
            mlp, kind = m.group(1), m.group(2)
            if kind == SHARED:
                replace[name] = {layer_name(layer, f"{mlp}{p}.{kind}"): t.expr for p in ("gate", "up")}
                continue
            f = t.shape[0] // 2
            replace[name] = {layer_name(layer, f"{mlp}gate.{kind}"): E.Slice(t.expr, 0, 0, f),
                             layer_name(layer, f"{mlp}up.{kind}"): E.Slice(t.expr, 0, f, 2 * f)}
        return ckpt.with_tensors(_rebuild(ckpt, replace, set(replace)),
                                 layout=attrs.evolve(ckpt.layout, fused_gate_up=False))
