"""fuse-qkv / unfuse-qkv, fuse-gate-up / unfuse-gate-up.

Megatron's fused QKV interleaves per query group: for each of the ``ng`` groups, its ``nh/ng``
query heads, then its key head, then its value head (``d`` rows each).  A TP split of dim 0 then
gives every rank whole groups.  The fused gate/up tensor is ``[gate; up]``; its TP split takes a
part of each half (see the ``mlp.gate_up`` split rule), which is Megatron's per-rank
``[gate_r; up_r]`` layout.  MLA's fused ``linear_qkv`` stacks the two down-projections.

Gated-delta-net layers (Qwen3-Next, Qwen3.5) fuse their q / k / v / z / b / a projections too, into
the Megatron modules the layout's ``gdn_keys`` names: megatron-core's GatedDeltaNet ``in_proj``
(``[q; k; v; z; b; a]``, split over TP part by part; its zero-centred ``out_norm`` is the plain
norm minus 1) or MindSpeed-LLM's HF packing (``in_proj_qkvz`` / ``in_proj_ba`` per key head, TP 1);
gated attention's q (with its gates), k, v are megatron-core's linear_qkv, or stay apart in
MindSpeed-LLM's layout.

Each fusion is one :class:`Fusion` table entry whose layout is a reversible
:class:`~ckpt_ir.ir.rules.Stack`: the fuse pass calls ``Stack.fuse``, the unfuse pass
``Stack.split``, so ``unfuse(fuse(x))`` simplifies back to the original loads.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs

from ckpt_ir.errors import VerifyError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode
from ckpt_ir.ir.layout import GDN_KEYS, has_gdn
from ckpt_ir.ir.names import SUB, layer_name, split_layer, split_stack
from ckpt_ir.ir.rules import (
    Stack,
    gate_up_rule,
    gdn_ba_rule,
    gdn_in_proj_rule,
    gdn_qkvz_rule,
    mla_rule,
    qkv_padding,
    qkv_rule,
)
from ckpt_ir.ir.spec import ModelSpec
from ckpt_ir.passes.manager import WHOLE, Pass, one_of, option, register_pass

# What a fusion applies to, per target: tensors whose rows are output features (weight, bias,
# LoRA B, DoRA magnitude, an adapter's saved copies) are stacked by the rule; LoRA A (input side)
# is shared by the parts.
ROW_STACKED = (
    "weight",
    "bias",
    "lora_b.weight",
    "lora_magnitude.weight",
    "lora_saved.weight",
    "lora_saved.bias",
)
SHARED = "lora_a.weight"


@attrs.frozen
class Fusion:
    """One fused form: ``parts`` (rule part name -> role stem under the prefix) stacked by ``rule``
    into ``fused``; ``prefix`` matches where in a layer it applies (e.g. every gated MLP)."""

    parts: dict[str, Callable[[ModelSpec], str]]
    fused: str
    rule: Callable[[ModelSpec, int, int], Stack]  # (spec, fused rows, layer) -> the layer's Stack
    prefix: re.Pattern[str] = re.compile("")
    kinds: tuple[str, ...] = (*ROW_STACKED, SHARED)
    # (spec, layer) -> the parts the fused form holds that the layer has no tensor of: part -> the
    # part it copies, or None for zeros (Megatron-Bridge's Gemma 4 linear_qkv, qkv_padding)
    padding: Callable[[ModelSpec, int], dict[str, str | None]] | None = None

    def stems(self, spec: ModelSpec, prefix: str) -> dict[str, str]:
        return {p: prefix + stem(spec) for p, stem in self.parts.items()}


# a fusion applies in a layer's sublayers too (layers.N.sub<k>.attn.q_a -> layers.N.sub<k>.attn.qkv_a)
IN_SUBLAYER = rf"(?:{SUB}\d+\.)?"


def _const(stem: str) -> Callable[[ModelSpec], str]:
    return lambda spec: stem


# g: block head_gate's per-head gate (Step-3.5), in the layers that have it
QKV = Fusion(
    {"q": _const("attn.q"), "k": _const("attn.k"), "v": _const("attn.v"), "g": _const("attn.head_gate")},
    "attn.qkv",
    qkv_rule,
    padding=qkv_padding,
)
MLA = Fusion(
    {"q": lambda s: "attn.q_a" if s.q_lora_rank else "attn.q", "kv_a": _const("attn.kv_a")},
    "attn.qkv_a",
    mla_rule,
    kinds=("weight",),
)
# gated-delta-net input projections: megatron-core's one in_proj, or MindSpeed-LLM's HF packing
GDN_IN_PROJ = Fusion(
    {p: _const(f"attn.gdn.{p}") for p in "qkvzba"}, "attn.gdn.in_proj", gdn_in_proj_rule, kinds=("weight",)
)
GDN_QKVZ = Fusion(
    {p: _const(f"attn.gdn.{p}") for p in "qkvz"}, "attn.gdn.in_qkvz", gdn_qkvz_rule, kinds=("weight",)
)
GDN_BA = Fusion({p: _const(f"attn.gdn.{p}") for p in "ba"}, "attn.gdn.in_ba", gdn_ba_rule, kinds=("weight",))
# megatron-core's zero-centred GDN out_norm (layernorm_zero_centered_gamma: 1 + w) <-> HF's plain norm
PLAIN_NORM, ZERO_CENTRED_NORM = "attn.gdn.norm.weight", "attn.gdn.out_norm.weight"
# gated MLPs: the dense one, each routed expert, and the shared experts
GATE_UP = Fusion(
    {"gate": _const("gate"), "up": _const("up")},
    "gate_up",
    gate_up_rule,
    re.compile(r"mlp\.(?:experts\.\d+\.|shared\.)?"),
    kinds=("weight", "bias", "lora_b.weight", "lora_magnitude.weight", "lora_saved.weight", SHARED),
)


def _rebuild(
    ckpt: Checkpoint, replace: dict[str, dict[str, E.Expr]], drop: set[str]
) -> dict[str, TensorNode]:
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


def _shared(ckpt: Checkpoint, names: list[str], pass_name: str) -> E.Expr:
    """The one expression that several parts share (LoRA A), or an error if they differ."""
    exprs = [ckpt.tensors[n].expr for n in names]
    if any(e != exprs[0] for e in exprs[1:]):
        raise VerifyError(
            f"{pass_name}: {', '.join(names)} differ; separate LoRA A matrices cannot be fused "
            f"(merge the adapter first with lora-merge)"
        )
    return exprs[0]


def _in_stack(stack: str | None) -> Callable[[str], tuple[int | None, str]]:
    """The layer of a canonical name in ``stack`` (None: the language model), as split_layer."""

    def layer_of(name: str) -> tuple[int | None, str]:
        s, inner = split_stack(name)
        return split_layer(inner) if s == stack else (None, name)

    return layer_of


def _named(stack: str | None) -> Callable[[int, str], str]:
    return (lambda i, rest: f"{stack}.{layer_name(i, rest)}") if stack else layer_name


def fuse(ckpt: Checkpoint, f: Fusion, pass_name: str, stack: str | None = None) -> dict[str, TensorNode]:
    """Every occurrence of ``f``'s parts fused (in the layers of ``stack``, a vision tower's by its
    own spec; None: the language model's); the new tensors take the first part's place."""
    spec = ckpt.spec.stack_spec(stack)
    layer_of, named = _in_stack(stack), _named(stack)
    first = next(iter(f.parts))
    anchor = re.compile(rf"^({IN_SUBLAYER}{f.prefix.pattern}){re.escape(f.parts[first](spec))}\.weight$")
    replace: dict[str, dict[str, E.Expr]] = {}
    drop: set[str] = set()
    for name in ckpt.tensors:
        layer, rest = layer_of(name)
        m = anchor.match(rest) if layer is not None else None
        if not m:
            continue
        assert layer is not None  # m is only matched for a layer's tensor
        stems = f.stems(spec, m.group(1))
        new: dict[str, E.Expr] = {}
        # the parts this layer's fused form holds (a kv_shared layer's qkv: q alone, or padded)
        held = f.rule(spec, 0, layer).sizes()
        pads = f.padding(spec, layer) if f.padding else {}
        for kind in f.kinds:
            names = {
                p: named(layer, f"{stem}.{kind}") for p, stem in stems.items() if p in held and p not in pads
            }
            if not all(n in ckpt.tensors for n in names.values()):
                continue
            drop |= set(names.values())
            target = named(layer, f"{m.group(1)}{f.fused}.{kind}")
            if kind == SHARED:
                new[target] = _shared(ckpt, list(names.values()), pass_name)
            else:
                parts = {p: ckpt.tensors[n].expr for p, n in names.items()}
                parts.update(_padded(parts, pads, held, first))
                new[target] = f.rule(spec, sum(x.shape[0] for x in parts.values()), layer).fuse(parts)
        replace[name] = new
    return _rebuild(ckpt, replace, drop)


def _padded(
    parts: dict[str, E.Expr], pads: dict[str, str | None], sizes: dict[str, int], like: str
) -> dict[str, E.Expr]:
    """The padded parts of a fused tensor: copies of the parts they copy, or zeros of their rows
    (the other dims and dtype those of part ``like``)."""
    x = parts[like]
    return {
        p: parts[src] if src is not None else E.Fill((sizes[p], *x.shape[1:]), x.dtype, 0.0)
        for p, src in pads.items()
    }


# (name, what it must equal, its expression, that value's): padded rows a fused tensor's split drops
Padding = tuple[str, str, E.Expr, E.Expr]


def unfuse(
    ckpt: Checkpoint, f: Fusion, stack: str | None = None, padding: list[Padding] | None = None
) -> dict[str, TensorNode]:
    """Every fused tensor of ``f`` (in the layers of ``stack``) split back into its parts (LoRA A
    shared by all of them).  The padded parts (``Fusion.padding``) are left out, zeros collected
    into ``padding`` for the backend to check (copies are left out unchecked: Megatron-Bridge's
    Gemma 4 never reads its v = k rows, so training moves them apart from k)."""
    spec = ckpt.spec.stack_spec(stack)
    layer_of, named = _in_stack(stack), _named(stack)
    fused = re.compile(rf"^({IN_SUBLAYER}{f.prefix.pattern}){re.escape(f.fused)}\.(.+)$")
    replace: dict[str, dict[str, E.Expr]] = {}
    for name, t in ckpt.tensors.items():
        layer, rest = layer_of(name)
        m = fused.match(rest) if layer is not None else None
        if not m or m.group(2) not in f.kinds:
            continue
        assert layer is not None  # m is only matched for a layer's tensor
        stems, kind = f.stems(spec, m.group(1)), m.group(2)
        if kind == SHARED:
            held = f.rule(spec, 0, layer).sizes()
            pads = f.padding(spec, layer) if f.padding else {}
            replace[name] = {named(layer, f"{stems[p]}.{kind}"): t.expr for p in held if p not in pads}
            continue
        parts = f.rule(spec, t.shape[0], layer).split(t.expr)
        for p, src in (f.padding(spec, layer) if f.padding else {}).items():
            e = parts.pop(p)
            if src is None and padding is not None:
                what = f"zeros (layer {layer} has no {_PART_NAMES.get(p, p)} of its own; the fused form pads them)"
                padding.append((f"{name} rows of {p}", what, e, E.Fill(e.shape, e.dtype, 0.0)))
        replace[name] = {named(layer, f"{stems[p]}.{kind}"): e for p, e in parts.items()}
    return _rebuild(ckpt, replace, set(replace))


_PART_NAMES = {"k": "keys", "v": "values"}


def _renorm(ckpt: Checkpoint, source: str, target: str, value: float, shift: bool) -> dict[str, TensorNode]:
    """Every layer's ``source`` norm renamed ``target``, offset by ``value`` when ``shift`` (weights
    and fp32 master copies; not Adam's moments, which are the same for ``w`` and ``w - 1``)."""
    out: dict[str, TensorNode] = {}
    for name, t in ckpt.tensors.items():
        layer, rest = split_layer(name)
        if layer is None or rest != source:
            out[name] = t
            continue
        new = layer_name(layer, target)
        out[new] = TensorNode.whole(new, E.Offset(t.expr, value) if shift else t.expr)
    return out


def _fused(ckpt: Checkpoint, fusions: tuple[Fusion, ...], pass_name: str) -> dict[str, TensorNode]:
    for f in fusions:
        ckpt = attrs.evolve(ckpt, tensors=fuse(ckpt, f, pass_name))
    return ckpt.tensors


def _unfused(
    ckpt: Checkpoint, fusions: tuple[Fusion, ...], padding: list[Padding] | None = None
) -> dict[str, TensorNode]:
    for f in fusions:
        ckpt = attrs.evolve(ckpt, tensors=unfuse(ckpt, f, padding=padding))
    return ckpt.tensors


def _padded_k_norms(spec: ModelSpec) -> list[int]:
    """The layers whose Megatron attention keeps a k norm the HF layer lacks (qkv_pads_kv: the
    kv_shared layers of Megatron-Bridge's Gemma 4, whose SelfAttention builds a k_layernorm it
    never loads, gemma4_bridge.py:458, 518 with no HF k_norm there, model_bridge.py:1940-1944, nor
    reads, modeling_gemma4.py:462-474; it keeps the initial ones, modeling_gemma4.py:125)."""
    if not (spec.qkv_pads_kv and spec.qk_norm):
        return []
    return [i for i in range(spec.total_layers) if spec.has_attention(i) and not spec.attn_has_k(i)]


def _add_k_norms(ckpt: Checkpoint, tensors: dict[str, TensorNode]) -> dict[str, TensorNode]:
    """``tensors`` with the padded layers' k norms (ones, after their q norms)."""
    add = {}
    for i in _padded_k_norms(ckpt.spec):
        q = tensors.get(layer_name(i, "attn.q_norm.weight"))
        if q is not None:
            name = layer_name(i, "attn.k_norm.weight")
            add[q.name] = TensorNode.whole(name, E.Fill((ckpt.spec.attn_head_dim(i),), q.dtype, 1.0))
    out: dict[str, TensorNode] = {}
    for name, t in tensors.items():
        out[name] = t
        if name in add:
            out[add[name].name] = add[name]
    return out


def _drop_k_norms(
    ckpt: Checkpoint, tensors: dict[str, TensorNode], padding: list[Padding] | None
) -> dict[str, TensorNode]:
    """``tensors`` without the padded layers' k norms, ones collected into ``padding``."""
    out = dict(tensors)
    for i in _padded_k_norms(ckpt.spec):
        t = out.pop(layer_name(i, "attn.k_norm.weight"), None)
        if t is not None and padding is not None:
            what = (
                f"ones (layer {i} has no keys of its own; Megatron-Bridge's model keeps its initial k norm)"
            )
            padding.append((t.name, what, t.expr, E.Fill(t.expr.shape, t.expr.dtype, 1.0)))
    return out


# Checkpoint.meta's list of the padded rows an unfuse dropped that must be zero (Padding tuples):
# the backends check them before writing (backends.plan.padding_checks)
PADDING_CHECKS = "padding_checks"


@register_pass
@attrs.frozen
class FuseQKV(Pass):
    name = "fuse-qkv"
    summary = "Fuse separate q/k/v (weights, biases, LoRA) into Megatron's per-group interleaved linear_qkv"
    description = (
        "Gated-delta-net models (Qwen3-Next, Qwen3.5) are fused into the modules gdn names: mcore, "
        "megatron-core's (GatedDeltaNet in_proj = [q; k; v; z; b; a], its zero-centred out_norm = "
        "norm - 1, gated linear_qkv per group [q heads; gates; k; v]) or mindspeed, MindSpeed-LLM's "
        "qwen3-next layout (HF's in_proj_qkvz / in_proj_ba, q_proj / k_proj / v_proj apart; TP 1)."
    )
    requires = (WHOLE,)
    optimizer_state = "follow"
    guarantees = "layers.N.attn.qkv.{weight,bias,lora_*} in per-query-group [q heads; k; v] order"

    gdn: str | None = option(
        None,
        help="gated-delta-net models' Megatron modules (default: the layout's)",
        allowed=one_of(*GDN_KEYS),
    )

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return self._run(ckpt, shift=True, weights=True)

    def run_state(self, ckpt: Checkpoint, state: str) -> Checkpoint:
        return self._run(ckpt, shift=state == "param")

    def _run(self, ckpt: Checkpoint, shift: bool, weights: bool = False) -> Checkpoint:
        spec, keys = ckpt.spec, self.gdn or ckpt.layout.gdn_keys
        mcore = keys == "mcore"
        attention = () if spec.attn_gate and not mcore else (MLA if spec.mla else QKV,)
        gdn = (GDN_IN_PROJ,) if mcore else (GDN_QKVZ, GDN_BA)
        linear = has_gdn(spec)
        tensors = _fused(ckpt, attention + (gdn if linear else ()), self.name)
        if weights:  # not in the optimizer's state
            tensors = _add_k_norms(ckpt, tensors)
        if mcore and linear:  # out_norm: the HF norm - 1 where every norm is zero-centred, else itself
            shift = shift and spec.zero_centred_norms
            tensors = _renorm(attrs.evolve(ckpt, tensors=tensors), PLAIN_NORM, ZERO_CENTRED_NORM, -1.0, shift)
        return ckpt.with_tensors(tensors, layout=attrs.evolve(ckpt.layout, fused_qkv=True, gdn_keys=keys))


@register_pass
class UnfuseQKV(Pass):
    name = "unfuse-qkv"
    summary = "Split Megatron's per-group interleaved linear_qkv (and its LoRA) into separate q/k/v"
    description = (
        "Gated-delta-net layers' fused projections (either layout) split into q, k, v, z, b, a; "
        "megatron-core's zero-centred out_norm becomes the plain norm (+ 1)."
    )
    requires = (WHOLE,)
    optimizer_state = "follow"
    guarantees = "layers.N.attn.{q,k,v}.{weight,bias,lora_*}; LoRA A shared by q, k and v"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        padding: list[Padding] = []
        out = self._run(ckpt, shift=True, padding=padding)
        if not padding:
            return out
        meta = {**out.meta, PADDING_CHECKS: (*out.meta.get(PADDING_CHECKS, ()), *padding)}
        return attrs.evolve(out, meta=meta)

    def run_state(self, ckpt: Checkpoint, state: str) -> Checkpoint:
        return self._run(ckpt, shift=state == "param")

    def _run(self, ckpt: Checkpoint, shift: bool, padding: list[Padding] | None = None) -> Checkpoint:
        fusions: tuple[Fusion, ...] = (MLA if ckpt.spec.mla else QKV,)
        if has_gdn(ckpt.spec):
            fusions += (GDN_IN_PROJ, GDN_QKVZ, GDN_BA)
        shift = shift and ckpt.spec.zero_centred_norms
        tensors = _renorm(
            attrs.evolve(ckpt, tensors=_drop_k_norms(ckpt, _unfused(ckpt, fusions, padding), padding)),
            ZERO_CENTRED_NORM,
            PLAIN_NORM,
            1.0,
            shift,
        )
        return ckpt.with_tensors(tensors, layout=attrs.evolve(ckpt.layout, fused_qkv=False))


@register_pass
class FuseGateUp(Pass):
    name = "fuse-gate-up"
    summary = "Fuse separate gate/up projections (and their LoRA) into one [gate; up] linear_fc1"
    requires = (WHOLE,)
    optimizer_state = "follow"
    guarantees = "layers.N.mlp.gate_up.* = [gate; up] (TP splits each half: Megatron's per-rank layout)"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return ckpt.with_tensors(
            fuse(ckpt, GATE_UP, self.name), layout=attrs.evolve(ckpt.layout, fused_gate_up=True)
        )


@register_pass
class UnfuseGateUp(Pass):
    name = "unfuse-gate-up"
    summary = "Split a fused [gate; up] linear_fc1 (and its LoRA) into separate gate and up projections"
    requires = (WHOLE,)
    optimizer_state = "follow"
    guarantees = "layers.N.mlp.{gate,up}.*; LoRA A shared by gate and up"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return ckpt.with_tensors(unfuse(ckpt, GATE_UP), layout=attrs.evolve(ckpt.layout, fused_gate_up=False))


@register_pass
class FuseVision(Pass):
    name = "fuse-vision"
    summary = "Fuse a vision tower's q/k/v and gate/up as Megatron's linear_qkv / linear_fc1 (MindSpeed-MM)"
    description = (
        "The vision tower's (ModelSpec.vision) attention is multi-head: Megatron's per-group "
        "interleave with a group per head gives each head's [q_h; k_h; v_h], which MindSpeed-MM's "
        "converter writes (RelocateOp); its gated MLP becomes [gate; up].  A tower whose "
        "MindSpeed-MM names pack its tensors in keys of their own (GLM-4.1V's [q; k; v]) is left as it is."
    )
    requires = (WHOLE,)
    optimizer_state = "follow"
    guarantees = "vision.layers.N.attn.qkv.* per head [q_h; k_h; v_h], vision.layers.N.mlp.gate_up.*"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        ckpt = ckpt.with_tensors(fuse(ckpt, QKV, self.name, "vision"))
        tensors = fuse(ckpt, GATE_UP, self.name, "vision")
        return ckpt.with_tensors(tensors, layout=attrs.evolve(ckpt.layout, vision_fused=True))


@register_pass
class UnfuseVision(Pass):
    name = "unfuse-vision"
    summary = "Split a vision tower's fused linear_qkv / linear_fc1 back into q/k/v and gate/up"
    requires = (WHOLE,)
    optimizer_state = "follow"
    guarantees = "vision.layers.N.attn.{q,k,v}.*, vision.layers.N.mlp.{gate,up}.*"

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        ckpt = ckpt.with_tensors(unfuse(ckpt, GATE_UP, "vision"))
        tensors = unfuse(ckpt, QKV, "vision")
        return ckpt.with_tensors(tensors, layout=attrs.evolve(ckpt.layout, vision_fused=False))
