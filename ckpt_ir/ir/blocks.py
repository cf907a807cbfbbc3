"""Blocks: the typed parts a layer is composed of.

A layer of a model is an ordered tuple of blocks (``ModelSpec.blocks(i)``): one or more *mixers*
(softmax attention, multi-latent attention, gated-delta-net linear attention, a Mamba-2 mixer)
and *MLPs* (dense, or a mixture of experts).  Each block owns its roles in the role table
(:mod:`ckpt_ir.ir.roles`): a role of a block is present in a layer exactly when the layer holds
the block (and the block's own variant fields say so).  A model whose layers are all alike
(attention + MLP) needs no list: ``ModelSpec.blocks`` derives it from the spec.  A hybrid model
(Nemotron-H: every layer one Mamba mixer, attention, MLP or MoE) lists its layers in
``ModelSpec.layer_blocks``, read from its config by the family table.

Megatron's hybrid models name a layer's blocks with one symbol each (megatron-core's
``hybrid_override_pattern``, e.g. ``M*M-ME``); :func:`from_pattern` and :func:`to_pattern`
translate.

A layer may also be made of *sublayers*, each an ordinary layer's blocks with norms of their own,
beside blocks of the layer itself: a block of sublayer ``k`` is listed as ``"sub<k>.<block>"``
(LongCat-Flash: ``("sub0.mla", "moe", "sub0.mlp", "sub1.mla", "sub1.mlp")``, two MLA + dense MLP
sublayers and a shortcut MoE).  The roles of a sublayer's blocks (and of the norms feeding them)
are the ordinary roles under the canonical prefix ``layers.N.sub<k>.`` (:data:`SUB`), present
where ``ModelSpec.scoped(k)``, which sees only sublayer k's blocks, says; the roles under
``layers.N.`` itself are asked of ``scoped(None)``, which sees only the layer-level blocks and no
norms (they are the sublayers').
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

import attrs

from ckpt_ir.errors import LayoutError
from ckpt_ir.ir.names import SUB

if TYPE_CHECKING:
    from ckpt_ir.ir.spec import ModelSpec

MIXERS = ("attention", "mla", "gdn", "mamba")
MLPS = ("mlp", "moe")
BLOCKS = MIXERS + MLPS

# megatron-core's hybrid layer symbols (ssm/mamba_hybrid_layer_allocation.py; Megatron-LM's
# HybridModel adds G for a gated-delta-net layer)
SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe", "G": "gdn"}
_SYMBOL_OF = {b: s for s, b in SYMBOLS.items()}

_ENTRY = re.compile(rf"^(?:{SUB}(\d+)\.)?([a-z0-9_]+)$")

Entries = tuple[tuple[str, ...], ...]  # ModelSpec.layer_blocks


def parse(entry: str) -> tuple[int | None, str]:
    """(sublayer or None, block kind) of one ``layer_blocks`` entry (``"sub1.mla"`` -> (1, "mla"))."""
    m = _ENTRY.match(entry)
    if m is None:
        return None, entry
    return (None if m.group(1) is None else int(m.group(1))), m.group(2)


@lru_cache(maxsize=64)
def kinds(layer_blocks: Entries) -> tuple[tuple[str, ...], ...]:
    """Each layer's block kinds, sublayer prefixes dropped."""
    return tuple(tuple(parse(b)[1] for b in layer) for layer in layer_blocks)


@lru_cache(maxsize=64)
def sublayers(layer_blocks: Entries) -> tuple[tuple[int, ...], ...]:
    """Each layer's sublayer numbers, in order of first mention."""
    out = []
    for layer in layer_blocks:
        subs: list[int] = []
        for b in layer:
            k = parse(b)[0]
            if k is not None and k not in subs:
                subs.append(k)
        out.append(tuple(subs))
    return tuple(out)


def scoped(spec: ModelSpec, sub: int | None) -> ModelSpec:
    """``spec`` seen from sublayer ``sub`` (None: the layer-level blocks), see ``ModelSpec.scoped``."""
    if not any(sublayers(spec.layer_blocks)):
        return spec
    view = _scoped(spec, sub)
    # equal specs may carry different configs (``extra`` is not compared): the view keeps its own
    return view if view.extra is spec.extra else _scoped.__wrapped__(spec, sub)


@lru_cache(maxsize=256)
def _scoped(spec: ModelSpec, sub: int | None) -> ModelSpec:
    from ckpt_ir.ir.spec import ModelSpec

    values = {f.name: getattr(spec, f.name) for f in attrs.fields(ModelSpec)}
    return _Scoped(**values, scope=sub)


def _scoped_class():
    from ckpt_ir.ir.spec import ModelSpec

    @attrs.frozen(kw_only=True)
    class Scoped(ModelSpec):
        """A ModelSpec that sees, in each layer with sublayers, only sublayer ``scope``'s blocks
        (None: only the blocks outside the sublayers, with no norms of their own)."""

        scope: int | None = None

        def blocks(self, layer: int) -> tuple[str, ...]:
            if not self.layer_blocks or layer >= self.num_layers or not self.sublayers(layer):
                return ModelSpec.blocks(self, layer) if self.scope is None else ()
            return tuple(k for s, k in map(parse, self.layer_blocks[layer]) if s == self.scope)

        def own_norms(self, layer: int) -> bool:
            return self.scope is not None or layer < 0 or not self.sublayers(layer)

    return Scoped


def check_layer_blocks(spec: ModelSpec) -> None:
    """Refuse a block list that names unknown blocks, has the wrong length, or leaves a layer
    without a block; and blocks without their sizes (attention without heads, a Mamba mixer
    without its dimensions)."""
    if spec.layer_blocks:
        if len(spec.layer_blocks) != spec.num_layers:
            raise LayoutError(
                f"model spec: layer_blocks lists {len(spec.layer_blocks)} layers but num_layers is "
                f"{spec.num_layers}"
            )
        for i, (blocks, names) in enumerate(zip(spec.layer_blocks, kinds(spec.layer_blocks))):
            unknown = [b for b, kind in zip(blocks, names) if kind not in BLOCKS]
            if unknown or not blocks:
                raise LayoutError(
                    f"model spec: layer {i} has blocks {list(blocks)}; each layer needs one or more of "
                    f"{', '.join(BLOCKS)} (a sublayer's as {SUB}<k>.<block>)"
                )
    layers = range(spec.total_layers)
    if any(spec.has_attention(i) for i in layers) and not (
        spec.num_heads and spec.num_kv_heads and spec.head_dim
    ):
        raise LayoutError("model spec: attention layers need num_heads, num_kv_heads and head_dim (positive)")
    if any(spec.has_block(i, "mlp") for i in layers) and not spec.ffn_hidden_size:
        raise LayoutError("model spec: MLP layers need a positive ffn_hidden_size")
    if any(spec.has_block(i, "mamba") for i in layers) and not (
        spec.mamba_heads and spec.mamba_head_dim and spec.mamba_state and spec.mamba_groups
    ):
        raise LayoutError(
            "model spec: Mamba layers need mamba_heads, mamba_head_dim, mamba_state and mamba_groups"
        )


def from_pattern(pattern: str, where: str) -> tuple[tuple[str, ...], ...]:
    """Layers of one block each from a hybrid pattern (``M*-E``)."""
    bad = sorted(set(pattern) - set(SYMBOLS))
    if bad:
        raise LayoutError(
            f"{where}: hybrid layer pattern {pattern!r} has symbol(s) {''.join(bad)!r}; known: "
            + ", ".join(f"{s} ({b})" for s, b in SYMBOLS.items())
        )
    return tuple((SYMBOLS[c],) for c in pattern)


def to_pattern(spec: ModelSpec) -> str:
    """The hybrid pattern of a model whose every layer is one block."""
    out = []
    for i in range(spec.num_layers):
        blocks = spec.blocks(i)
        if len(blocks) != 1 or blocks[0] not in _SYMBOL_OF:
            raise LayoutError(
                f"layer {i} holds {list(blocks)}; a hybrid pattern has one block per layer "
                f"({', '.join(f'{s} {b}' for s, b in SYMBOLS.items())})"
            )
        out.append(_SYMBOL_OF[blocks[0]])
    return "".join(out)


def is_hybrid(spec: ModelSpec) -> bool:
    """Whether the model has Mamba mixers (a Megatron MambaModel / HybridModel, not a GPTModel)."""
    return any("mamba" in spec.blocks(i) for i in range(spec.num_layers))


_Scoped = _scoped_class()
