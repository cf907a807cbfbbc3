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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckpt_ir.errors import LayoutError

if TYPE_CHECKING:
    from ckpt_ir.ir.spec import ModelSpec

MIXERS = ("attention", "mla", "gdn", "mamba")
MLPS = ("mlp", "moe")
BLOCKS = MIXERS + MLPS

# megatron-core's hybrid layer symbols (ssm/mamba_hybrid_layer_allocation.py; Megatron-LM's
# HybridModel adds G for a gated-delta-net layer)
SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe", "G": "gdn"}
_SYMBOL_OF = {b: s for s, b in SYMBOLS.items()}


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
        for i, blocks in enumerate(spec.layer_blocks):
            unknown = [b for b in blocks if b not in BLOCKS]
            if unknown or not blocks:
                raise LayoutError(
                    f"model spec: layer {i} has blocks {list(blocks)}; each layer needs one or more of "
                    f"{', '.join(BLOCKS)}"
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
    if any(spec.has_block(i, "gdn") for i in layers) and not (
        spec.linear_k_heads
        and spec.linear_k_dim
        and spec.linear_v_dim
        and spec.linear_conv_kernel
        and spec.linear_v_heads % spec.linear_k_heads == 0 < spec.linear_v_heads
    ):
        raise LayoutError(
            "model spec: gated-delta-net layers need linear_k_heads, linear_k_dim, linear_v_dim, "
            "linear_conv_kernel and linear_v_heads, a positive multiple of linear_k_heads"
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


def has_gdn_modules(spec: ModelSpec) -> bool:
    """Whether the model has gated-delta-net mixers or gated attention: the modules whose Megatron
    form ``Layout.gdn_keys`` chooses (MindSpeed-LLM's qwen3-next layout or megatron-core's)."""
    return any("gdn" in spec.blocks(i) for i in range(spec.num_layers)) or spec.attn_gate
