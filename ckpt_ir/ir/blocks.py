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
from typing import Protocol

from ckpt_ir.errors import LayoutError
from ckpt_ir.ir.names import SUB


class Layers(Protocol):
    """What the functions below read of a ModelSpec (which imports this module)."""

    @property
    def num_layers(self) -> int: ...

    def blocks(self, layer: int) -> tuple[str, ...]: ...


# mixers no Megatron implementation has, each fed by the layer's input norm (attn_norm): LFM2's
# short convolution, Kimi delta attention, Jamba's Mamba-1
OWN_MIXERS: tuple[str, ...] = ("short_conv", "kda", "mamba1")
# global_attention: softmax attention of other sizes than the model's other attention layers
# (ModelSpec.global_head_dim / global_kv_heads: Gemma 4's full-attention layers, MiMo-V2-Flash's);
# window_attention: softmax attention with heads, query groups and head size of its own
# (ModelSpec.window_heads / window_kv_heads / window_head_dim: Step-3.5's sliding-window layers,
# while its full-attention layers keep the model's sizes)
MIXERS: tuple[str, ...] = (
    "attention",
    "global_attention",
    "window_attention",
    "mla",
    "gdn",
    "mamba",
    "mqa",
    *OWN_MIXERS,
)
MLPS = ("mlp", "moe")
# blocks that extend a mixer or an MLP of their layer, or wrap the layer (DeepSeek-V4): the
# mqa attention's KV compressor and, beside it, its lightning indexer (CSA layers: the indexer
# has a compressor of its own, and the compressors' windows overlap), the layer's
# hyper-connection mixers around attention and MLP, and the MoE's token-id routing table; Gemma
# 4's kv_shared (the attention reuses an earlier layer's keys and values: no k / v projections of
# its own), ple (the layer's gated projection of its per-layer input embedding) and layer_scalar
# (a learned scale of the layer's output); out_gate, a sigmoid gate on the attention's output from
# a projection of its own (HY-V4, AFMoE); and post_norms, a layer whose norms follow its mixer and
# its MLP (post_attn_norm, post_mlp_norm) instead of preceding them (OLMo-Hybrid's attention
# layers, beside pre-norm gated-delta-net ones); moe_branch, a layer's MoE beside its dense MLP
# (both blocks in the layer), each branch with norms of its own, their sum normed once more, and a
# router that scales its input (Gemma 4's enable_moe_block); head_gate, the attention output of
# each head times the sigmoid of one scalar projection of the input per head (Step-3.5's g_proj);
# layer_scale, a learned per-channel scale of the attention's and of the MLP's output before each
# residual add (InternViT's ls1, ls2)
PARTS = (
    "compressor",
    "csa_indexer",
    "hc",
    "hash_router",
    "kv_shared",
    "ple",
    "layer_scalar",
    "out_gate",
    "post_norms",
    "moe_branch",
    "head_gate",
    "layer_scale",
)
BLOCKS = MIXERS + MLPS + PARTS
# blocks of a stack beside its layers (a vision tower, ModelSpec.vision): the patch embedding before
# them and the merger (norm + MLP over neighbouring patches) after them; a stack has one of each
# where its spec gives the block's sizes (patch_size, merger_size)
STACK_BLOCKS = (
    "patch_embed",
    "merger",
    "pos_embed",
    "post_norm",
    "projector",
    # Pixtral's and Llama 4's (ModelSpec: pre_norm, class_embed, patch_merger_size, adapter_*,
    # projector_mlp_*)
    "pre_norm",
    "class_embed",
    "patch_merger",
    "adapter",
    "projector_mlp",
    "patch_norm",
    "downsample",
    "gated_merger",
    "cls_embed",
    "shuffle_projector",
    "pool_head",
)

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


def from_pattern(pattern: str, where: str) -> tuple[tuple[str, ...], ...]:
    """Layers of one block each from a hybrid pattern (``M*-E``)."""
    bad = sorted(set(pattern) - set(SYMBOLS))
    if bad:
        raise LayoutError(
            f"{where}: hybrid layer pattern {pattern!r} has symbol(s) {''.join(bad)!r}; known: "
            + ", ".join(f"{s} ({b})" for s, b in SYMBOLS.items())
        )
    return tuple((SYMBOLS[c],) for c in pattern)


def to_pattern(spec: Layers) -> str:
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


def is_hybrid(spec: Layers) -> bool:
    """Whether the model has Mamba mixers (a Megatron MambaModel / HybridModel, not a GPTModel)."""
    return any("mamba" in spec.blocks(i) for i in range(spec.num_layers))
