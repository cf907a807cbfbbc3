"""ModelSpec: the hyperparameters that decide tensor shapes and semantics, format-neutral."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import attrs

from ckpt_ir.errors import LayoutError, setting
from ckpt_ir.ir.blocks import BLOCKS, kinds, parse, sublayers
from ckpt_ir.ir.names import STACKS, SUB


def _positive(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if value is None or value <= 0:
        raise LayoutError(f"model spec: {attribute.name} must be a positive integer, got {value!r}")


def _non_negative(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if value is None or value < 0:
        raise LayoutError(f"model spec: {attribute.name} must be a non-negative integer, got {value!r}")


def _vocab(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    """A language model has a vocabulary; a stack beside it (a vision tower) has none (0)."""
    (_non_negative if inst.stack else _positive)(inst, attribute, value)


def _int_tuple(v: Iterable[int]) -> tuple[int, ...]:
    return tuple(v)


@attrs.frozen(kw_only=True)
class ModelSpec:
    """What a checkpoint *is*, independent of how it is stored.

    ``num_layers`` counts real transformer layers (no-op padding layers are a Layout matter).
    ``vocab_size`` is the true vocabulary; a padded embedding is described by the Layout.
    ``extra`` carries the rest of the HF config (rope settings, token ids, ...) through unchanged.
    """

    family: str
    num_layers: int = attrs.field(validator=_positive)
    hidden_size: int = attrs.field(validator=_positive)
    vocab_size: int = attrs.field(validator=lambda inst, a, v: _vocab(inst, a, v))
    # the attention and MLP sizes: 0 only in a model without such blocks (Mamba-2)
    ffn_hidden_size: int = attrs.field(default=0, validator=_non_negative)
    num_heads: int = attrs.field(default=0, validator=_non_negative)
    num_kv_heads: int = attrs.field(default=0, validator=_non_negative)
    head_dim: int = attrs.field(default=0, validator=_non_negative)
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    tied_embeddings: bool = False
    activation: str = "silu"
    dtype: str = "F32"
    # mixture of experts (num_experts = 0: a dense model)
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    shared_ffn_hidden_size: int = 0  # 0: no shared experts
    # zero-computation (identity) experts: the router scores num_experts + zero_experts choices,
    # the last zero_experts of which have no weights (LongCat-Flash)
    zero_experts: int = 0
    dense_layers: tuple[int, ...] = attrs.field(
        default=(), converter=_int_tuple
    )  # MoE model layers with a dense MLP
    # multi-latent attention (kv_lora_rank = 0: ordinary multi-head / grouped-query attention)
    q_lora_rank: int = 0  # 0: queries are projected directly (no q_a / q_b)
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    mtp_layers: int = 0  # multi-token-prediction layers, numbered after the main layers
    # DeepSeek sparse attention (DSA): a lightning indexer beside MLA (index_heads = 0: none);
    # layers in shared_index_layers reuse the previous layer's top-k and have no indexer (GLM-5)
    index_heads: int = 0
    index_head_dim: int = 0
    shared_index_layers: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)
    # gated-delta-net linear attention (Qwen3-Next): the layers that have it instead of attention,
    # its key / value heads and head sizes, and its causal conv1d kernel width
    linear_layers: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)
    linear_k_heads: int = 0
    linear_v_heads: int = 0
    linear_k_dim: int = 0
    linear_v_dim: int = 0
    linear_conv_kernel: int = 0
    # the model's RMSNorms compute x * (1 + w) (Qwen3-Next, Qwen3.5): megatron-core's
    # apply_layernorm_1p then applies to every norm, and a gated-delta-net's output norm, plain in HF,
    # is stored w - 1; False (OLMo-Hybrid): plain norms, the output norm stored as it is.  (Gemma's
    # families, without gated-delta-net layers, say so in their own Megatron args.)
    zero_centred_norms: bool = False
    # Mamba-2 mixers (Mamba / attention hybrids): heads, head size, SSM state size, B/C groups and
    # the causal conv1d's kernel width (the mixer's inner width d = mamba_heads * mamba_head_dim)
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_state: int = 0
    mamba_groups: int = 0
    mamba_conv_kernel: int = 0
    mamba_no_gated_norm: bool = False  # the mixer lacks its gated RMSNorm (Falcon-H1 without mamba_rms_norm)
    # blocks no Megatron implementation has (ckpt-ir names them itself, docs/formats.md):
    # a short convolution (LFM2): in_proj [B; C; x] of hidden rows each, a depthwise causal conv
    # of that kernel width, out_proj, biases on all three or none
    short_conv_kernel: int = 0
    short_conv_bias: bool = False
    # Kimi delta attention (Kimi Linear): heads, head size (q, k and v alike), the q / k / v
    # convs' kernel width
    kda_heads: int = 0
    kda_head_dim: int = 0
    kda_conv_kernel: int = 0
    # a Mamba-1 mixer (Jamba): inner width d, SSM state size, the rank of dt, the conv's kernel
    # width, a conv1d bias, in_proj / out_proj biases
    mamba1_inner: int = 0
    mamba1_state: int = 0
    mamba1_dt_rank: int = 0
    mamba1_conv_kernel: int = 0
    mamba1_conv_bias: bool = False
    mamba1_proj_bias: bool = False
    # A multi-module model (vision-language): its vision tower, a stack of layers of its own
    # described by a spec of its own (its layers' blocks, sizes and biases as any model's; no
    # vocabulary), its tensors named under ``vision.`` (ckpt_ir.ir.names.STACKS).  ``stack``: which
    # stack a spec describes (None: the language model, this spec itself)
    vision: ModelSpec | None = None
    stack: str | None = None
    # block patch_embed of a vision stack: a convolution over patch_channels x patch_temporal frames
    # (0: a 2-D convolution) x patch_size^2 pixels to hidden_size, with or without a bias
    patch_size: int = 0
    patch_temporal: int = 0
    patch_channels: int = 0
    patch_bias: bool = False
    # block merger of a vision stack: a norm over hidden_size, then an MLP over merger_size^2
    # neighbouring patches (fc1 hidden x merger_size^2 wide) to merger_out (the language model's
    # width), with biases as mlp_bias says
    merger_size: int = 0
    merger_out: int = 0
    # blocks pos_embed / post_norm / projector of a vision stack (SigLIP in Gemma 3): learned
    # absolute positions (pos_embed_size rows of hidden_size), a norm after the layers, a projector
    # to projector_out (the language model's width): a norm, then one weight without a bias
    pos_embed_size: int = 0
    # learned positions stored as a grid [pos_embed_size / pos_embed_width, pos_embed_width,
    # hidden_size] (Kimi-K2.5's MoonViT, bicubically resampled to each image); 0: [rows, hidden]
    pos_embed_width: int = 0
    post_norm: bool = False
    projector_out: int = 0
    # block pool_head of a vision stack (SigLIP's attention-pooling head, vision_use_head): a probe
    # [1, 1, hidden_size], torch's MultiheadAttention (in_proj [3 hidden, hidden] with a bias, out_proj),
    # a LayerNorm and an MLP as the layers' (fc1, fc2 with biases); Gemma 3 never uses its output
    pool_head: bool = False
    # blocks of the Pixtral (Mistral 3) and Llama 4 towers: a norm before the layers (pre_norm);
    # the patch embedding as a linear layer over unfolded patches, [hidden, channels x patch^2]
    # (patch_unfold, Llama 4's; the same numbers as a 2-D convolution's weight); a learned class
    # embedding of hidden_size (class_embed); a patch merger: a norm, then one weight from
    # patch_merger_size^2 neighbouring patches back to hidden_size (Mistral 3's); a pixel-shuffle
    # adapter MLP fc1 [adapter_hidden, adapter_in], fc2 [adapter_out, adapter_out] without biases
    # (Llama 4's vision_adapter); a projector MLP of projector_mlp_layers linear layers (1 or 2)
    # from projector_mlp_in to projector_mlp_out (the language model's width), biases as
    # projector_mlp_bias says
    pre_norm: bool = False
    patch_unfold: bool = False
    class_embed: bool = False
    patch_merger_size: int = 0
    adapter_in: int = 0
    adapter_hidden: int = 0
    adapter_out: int = 0
    projector_mlp_layers: int = 0
    projector_mlp_in: int = 0
    projector_mlp_out: int = 0
    projector_mlp_bias: bool = False
    # block deepstack of a vision stack's layers (Qwen3-VL's DeepStack mergers): the layers whose
    # output a merger of their own (a norm over merger_hidden, then fc1 and fc2 as the merger's)
    # feeds to the language model, in the order of the HF list of mergers
    deepstack_layers: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)
    # blocks patch_norm / downsample / gated_merger of a vision stack (GLM-4.1V's tower): a norm
    # after the patch embedding (as the layers' norms, bias as norm_bias says), a convolution of
    # downsample_size^2 neighbouring patches from hidden_size to merger_out (with a bias), and a
    # merger on merger_out: a projection, a LayerNorm (with a bias), then a gated MLP merger_ffn wide
    # (no biases)
    patch_norm: bool = False
    downsample_size: int = 0
    merger_ffn: int = 0
    # block cls_embed of a vision stack (InternViT): a learned class token [1, 1, hidden] before the
    # patches, and learned positions for it and each patch stored [1, cls_positions, hidden]
    # (cls_positions 0: none)
    cls_token: bool = False
    cls_positions: int = 0
    # block shuffle_projector of a vision stack (InternVL): pixel shuffle of shuffle_size^2
    # neighbouring patches, then a LayerNorm over hidden x shuffle_size^2, fc1 to shuffle_out (the
    # language model's width), GELU, fc2, all with biases
    shuffle_size: int = 0
    shuffle_out: int = 0
    # The blocks of each main layer, in order (names in ``ckpt_ir.ir.blocks.BLOCKS``: a mixer
    # such as "attention" or "mamba", an MLP such as "mlp" or "moe"); empty: every layer is one
    # mixer and one MLP, as the fields above imply (see :meth:`blocks`).  A block of a layer made
    # of sublayers names its sublayer, "sub<k>.<block>" (LongCat-Flash: "sub0.mla", "moe",
    # "sub0.mlp", "sub1.mla", "sub1.mlp"; see ckpt_ir.ir.blocks)
    layer_blocks: tuple[tuple[str, ...], ...] = attrs.field(
        default=(), converter=lambda v: tuple(tuple(b) for b in v)
    )
    # DeepSeek-V4's blocks (ir/blocks.py: mqa, compressor, csa_indexer, hc, hash_router): mqa's
    # grouped low-rank output projection (mqa_o_groups groups of heads, each projected to
    # mqa_o_rank), each main layer's KV compress ratio (0: no compressor), the hyper-connection
    # streams, and the blocks of every multi-token-prediction layer (empty: as blocks() derives)
    mqa_o_groups: int = 0
    mqa_o_rank: int = 0
    compressor_ratios: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)
    hc_mult: int = 0
    hc_no_comb: bool = False  # the hc block without its comb mapping (HY-V4's independent hyper-connections)
    mtp_blocks: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    # block global_attention (Gemma 4's, MiMo-V2-Flash's full-attention layers): its head size and
    # key / value heads (0: the attention block's head_dim / num_kv_heads), and keys that are also
    # its values (Gemma 4's attention_k_eq_v: no v projection).  An attention block's value heads
    # are v_head_dim wide where that is set (MiMo-V2-Flash: 128 beside 192 for q and k)
    global_head_dim: int = 0
    global_kv_heads: int = 0
    global_k_eq_v: bool = False
    # block window_attention (Step-3.5's sliding-window layers): its heads, query groups and head
    # size (0: the model's)
    window_heads: int = 0
    window_kv_heads: int = 0
    window_head_dim: int = 0
    # block kv_shared: the dense MLP of such a layer is twice as wide (Gemma 4's use_double_wide_mlp)
    kv_shared_wide_mlp: bool = False
    # Megatron's fused linear_qkv of a layer without keys / values of its own (kv_shared, keys as
    # values) holds them anyway, as Megatron-Bridge's Gemma 4 model does: zero k and v in a
    # kv_shared layer, v a copy of k in a keys-as-values one (qkv_rule, passes/fusion.py)
    qkv_pads_kv: bool = False
    # block ple (Gemma 4's per-layer input embeddings): each layer's input width, and the rows of
    # the model's per-layer embedding table
    ple_dim: int = 0
    ple_vocab: int = 0
    attn_gate: bool = False  # q_proj also yields a sigmoid output gate: per head [q; gate] rows
    shared_expert_gate: bool = False  # a sigmoid gate on the shared experts' output (Qwen2-MoE)
    router_bias: bool = False  # a score-correction bias on the router (DeepSeek-V3)
    qk_full_norm: bool = False  # q/k RMSNorm over all heads at once (MiniMax-M2), not per head
    norm_bias: bool = False  # LayerNorm with biases (every norm), not RMSNorm (PhiMoE)
    o_bias: bool = False  # a bias on the attention output projection
    lm_head_bias: bool = False  # a bias on the output layer (untied models)
    pre_norms: bool = True  # norms before attention and MLP (OLMo 2 has only the post norms)
    # attention and MLP read the same normed input and add to the residual together (Cohere): no
    # pre-MLP norm of its own.  A future block (issue #29): a parallel attention + MLP layer
    parallel_attn_mlp: bool = False
    attn_sinks: bool = False  # a learned per-head softmax offset ("sinks", gpt-oss)
    router_logit_bias: bool = False  # a bias of the router's linear layer itself (gpt-oss)
    expert_bias: bool = False  # biases on the routed experts' gate/up and down projections (gpt-oss)
    # a plain Megatron GPT (--add-bias-linear, no --swiglu, learned absolute positions)
    gated_mlp: bool = True  # fc1 = [gate; up] (SwiGLU-style); False: one fc1 (GELU MLP)
    mlp_bias: bool = False  # biases on the MLP's fc1 / fc2
    position_embeddings: int = 0  # rows of a learned absolute position table (0: none)
    embed_norm: bool = False  # a norm right after the word embedding (BLOOM)
    lora_rank: int | None = None  # set while the checkpoint carries (unmerged) LoRA adapters
    lora_alpha: float | None = None
    # LoRA scaling: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA; r is each target's own
    # rank (its A's rows) and alpha the default above unless a target has its own (peft's
    # alpha_pattern), keyed by the target's canonical weight name
    lora_rslora: bool = False
    lora_alphas: tuple[tuple[str, float], ...] = attrs.field(default=(), converter=lambda v: tuple(sorted(v)))
    extra: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        check_layer_blocks(self)
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise LayoutError(
                f"model spec: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.window_kv_heads and self.window_heads % self.window_kv_heads:
            raise LayoutError(
                f"model spec: window_heads={self.window_heads} is not a multiple of "
                f"window_kv_heads={self.window_kv_heads}"
            )

    def lora_scale(self, target: str, rank: int) -> float:
        """The factor of ``B @ A`` for the LoRA on ``target`` (a canonical weight name) of rank
        ``rank``, computed as peft does (alpha / r or alpha / math.sqrt(r), one division)."""
        alpha = dict(self.lora_alphas).get(target, self.lora_alpha)
        if alpha is None:
            raise LayoutError(
                f"{target}: the checkpoint does not record lora_alpha; pass {setting('lora_alpha', metavar='ALPHA')}"
            )
        return alpha / math.sqrt(rank) if self.lora_rslora else alpha / rank

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def mla_q_size(self) -> int:
        return self.num_heads * (self.qk_nope_dim + self.qk_rope_dim)

    @property
    def total_layers(self) -> int:
        """Main layers plus multi-token-prediction layers (canonical layer numbers below this)."""
        return self.num_layers + self.mtp_layers

    def blocks(self, layer: int) -> tuple[str, ...]:
        """The blocks of ``layer``: ``layer_blocks`` where it lists the layer (the kinds of all its
        sublayers' blocks too), else one mixer (gated-delta-net in ``linear_layers``, else MLA or
        attention) and one MLP (MoE in a model with experts unless in ``dense_layers``).
        Multi-token-prediction layers are the latter."""
        if self.layer_blocks and layer < self.num_layers:
            return kinds(self.layer_blocks)[layer]
        if self.mtp_blocks and layer >= self.num_layers:
            return self.mtp_blocks
        mixer = "gdn" if layer in self.linear_layers else "mla" if self.mla else "attention"
        moe = self.num_experts > 0 and layer not in self.dense_layers
        return (mixer, "moe" if moe else "mlp")

    def has_block(self, layer: int, block: str) -> bool:
        return block in self.blocks(layer)

    def sublayers(self, layer: int) -> tuple[int, ...]:
        """The sublayers ``layer`` is made of (their numbers, in order; none for most models)."""
        if not self.layer_blocks or layer >= self.num_layers:
            return ()
        return sublayers(self.layer_blocks)[layer]

    def own_norms(self, layer: int) -> bool:
        """Whether the blocks this spec describes in ``layer`` have norms of their own: always,
        but in :meth:`scoped` to the layer-level blocks of a layer made of sublayers, whose norms
        are the sublayers' (LongCat-Flash's shortcut MoE reads sublayer 0's pre-MLP norm)."""
        return True

    def scoped(self, sub: int | None) -> ModelSpec:
        """This spec seen from one part of each layer: sublayer ``sub``'s blocks, or (None) the
        blocks outside any sublayer.  The role table asks a role's presence of the scope its
        canonical name lies in (``layers.N.sub<k>.`` or none); a model without sublayers is its
        own layer-level scope."""
        if not self.layer_blocks:
            return self
        return scoped(self, sub)

    def has_attention(self, layer: int) -> bool:
        """Whether ``layer`` has (softmax) attention: multi-head / grouped-query or MLA."""
        blocks = self.blocks(layer)
        return bool({"attention", "global_attention", "window_attention", "mla"} & set(blocks))

    def _window(self, layer: int | None, size: int) -> bool:
        return layer is not None and size > 0 and self.has_block(layer, "window_attention")

    def attn_heads(self, layer: int | None = None) -> int:
        """Query heads of ``layer``'s attention (None: the attention block's)."""
        return self.window_heads if self._window(layer, self.window_heads) else self.num_heads

    def attn_kv_heads(self, layer: int | None = None) -> int:
        """Key / value heads of ``layer``'s attention (None: the attention block's)."""
        if layer is not None and self.global_kv_heads and self.has_block(layer, "global_attention"):
            return self.global_kv_heads
        return self.window_kv_heads if self._window(layer, self.window_kv_heads) else self.num_kv_heads

    def attn_head_dim(self, layer: int | None = None) -> int:
        """Query / key head size of ``layer``'s attention (None: the attention block's)."""
        if layer is not None and self.global_head_dim and self.has_block(layer, "global_attention"):
            return self.global_head_dim
        return self.window_head_dim if self._window(layer, self.window_head_dim) else self.head_dim

    def attn_v_dim(self, layer: int | None = None) -> int:
        """Value head size of ``layer``'s (grouped-query) attention."""
        return self.v_head_dim if self.v_head_dim and not self.mla else self.attn_head_dim(layer)

    def attn_has_k(self, layer: int) -> bool:
        """Whether ``layer``'s attention projects keys of its own (not in a kv_shared layer)."""
        return not self.has_block(layer, "kv_shared")

    def attn_has_v(self, layer: int) -> bool:
        """Whether ``layer``'s attention projects values of its own (not in a kv_shared layer, nor
        in a global_attention layer whose keys are its values)."""
        k_eq_v = self.global_k_eq_v and self.has_block(layer, "global_attention")
        return self.attn_has_k(layer) and not k_eq_v

    def mlp_width(self, layer: int) -> int:
        """The dense MLP's width in ``layer`` (twice ffn_hidden_size in a kv_shared layer of a
        model with kv_shared_wide_mlp)."""
        wide = self.kv_shared_wide_mlp and self.has_block(layer, "kv_shared")
        return self.ffn_hidden_size * (2 if wide else 1)

    def has_mlp(self, layer: int) -> bool:
        """Whether ``layer`` has an MLP block of either kind (dense or experts)."""
        blocks = self.blocks(layer)
        return "mlp" in blocks or "moe" in blocks

    @property
    def mamba_inner(self) -> int:
        """A Mamba-2 mixer's inner width d (z and x each have d rows of in_proj)."""
        return self.mamba_heads * self.mamba_head_dim

    @property
    def mamba_in_proj_parts(self) -> tuple[int, ...]:
        """Rows of a Mamba-2 mixer's in_proj: z, x (d each), B, C (groups x state each), dt (heads)."""
        bc = self.mamba_groups * self.mamba_state
        return (self.mamba_inner, self.mamba_inner, bc, bc, self.mamba_heads)

    @property
    def mamba_conv_parts(self) -> tuple[int, ...]:
        """Channels of a Mamba-2 mixer's conv1d: x (d), B, C (groups x state each)."""
        bc = self.mamba_groups * self.mamba_state
        return (self.mamba_inner, bc, bc)

    @property
    def kda_size(self) -> int:
        """Rows of a Kimi delta attention's q, k and v (heads x head size)."""
        return self.kda_heads * self.kda_head_dim

    @property
    def linear_qk_size(self) -> int:
        return self.linear_k_heads * self.linear_k_dim

    @property
    def linear_v_size(self) -> int:
        return self.linear_v_heads * self.linear_v_dim

    @property
    def gdn_in_proj_parts(self) -> tuple[int, ...]:
        """Rows of a gated-delta-net mixer's fused in_proj (megatron-core): q, k (key heads x key
        dim each), v, z (value heads x value dim each), b, a (one per value head)."""
        qk, v, h = self.linear_qk_size, self.linear_v_size, self.linear_v_heads
        return (qk, qk, v, v, h, h)

    @property
    def gdn_conv_parts(self) -> tuple[int, ...]:
        """Channels of a gated-delta-net mixer's conv1d: q, k, v."""
        return (self.linear_qk_size, self.linear_qk_size, self.linear_v_size)

    def compressor_ratio(self, layer: int) -> int:
        """How many tokens layer ``layer``'s KV compressor folds into one entry (0: none)."""
        return self.compressor_ratios[layer] if layer < len(self.compressor_ratios) else 0

    def compressor_width(self, layer: int, head_dim: int) -> int:
        """Rows of a compressor's kv / gate projections over heads of ``head_dim``: two series
        (its windows overlap) in a layer with the lightning indexer (CSA), one otherwise (HCA)."""
        return (2 if self.has_block(layer, "csa_indexer") else 1) * head_dim

    def has_indexer(self, layer: int) -> bool:
        """Whether ``layer`` has DSA's lightning indexer beside MLA (DeepSeek-V4's indexer is the
        csa_indexer block of its layers)."""
        return self.mla and self.index_heads > 0 and layer not in self.shared_index_layers

    def is_moe_layer(self, layer: int) -> bool:
        return "moe" in self.blocks(layer)

    @property
    def untied(self) -> bool:
        return not self.tied_embeddings

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def merger_hidden(self) -> int:
        """A vision merger's width: merger_size^2 patches of hidden_size each."""
        return self.hidden_size * self.merger_size**2

    def stack_spec(self, stack: str | None) -> ModelSpec:
        """The spec of one stack of the model (None: the language model, this spec)."""
        if stack is None:
            return self
        sub = getattr(self, stack, None) if stack in STACKS else None
        if sub is None:
            raise LayoutError(f"model spec: {self.family} has no {stack} stack")
        return sub

    def summary(self) -> dict[str, Any]:
        """The fields that decide shapes, for dumps (``extra`` left out; a stack's own spec as
        its summary)."""
        out = {f.name: getattr(self, f.name) for f in attrs.fields(ModelSpec) if f.name != "extra"}
        for stack in STACKS:
            if out.get(stack) is not None:
                out[stack] = {k: v for k, v in out[stack].summary().items() if v not in (0, None, False, ())}
        return out


def scoped(spec: ModelSpec, sub: int | None) -> ModelSpec:
    """``spec`` seen from sublayer ``sub`` (None: the layer-level blocks), see ``ModelSpec.scoped``."""
    if not any(sublayers(spec.layer_blocks)):
        return spec
    view = _scoped(spec, sub)
    # equal specs may carry different configs (``extra`` is not compared): the view keeps its own
    return view if view.extra is spec.extra else _scoped.__wrapped__(spec, sub)


@lru_cache(maxsize=256)
def _scoped(spec: ModelSpec, sub: int | None) -> ModelSpec:
    values = {f.name: getattr(spec, f.name) for f in attrs.fields(ModelSpec)}
    return _Scoped(**values, scope=sub)


@attrs.frozen(kw_only=True)
class _Scoped(ModelSpec):
    """A ModelSpec that sees, in each layer with sublayers, only sublayer ``scope``'s blocks
    (None: only the blocks outside the sublayers, with no norms of their own)."""

    scope: int | None = None

    def blocks(self, layer: int) -> tuple[str, ...]:
        if not self.layer_blocks or layer >= self.num_layers or not self.sublayers(layer):
            return ModelSpec.blocks(self, layer) if self.scope is None else ()
        return tuple(k for s, k in map(parse, self.layer_blocks[layer]) if s == self.scope)

    def own_norms(self, layer: int) -> bool:
        return self.scope is not None or layer < 0 or not self.sublayers(layer)


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
    # the sizes each block needs
    sizes = {
        "mlp": ("ffn_hidden_size",),
        "mamba": ("mamba_heads", "mamba_head_dim", "mamba_state", "mamba_groups"),
        "gdn": ("linear_k_heads", "linear_v_heads", "linear_k_dim", "linear_v_dim", "linear_conv_kernel"),
        "short_conv": ("short_conv_kernel",),
        "kda": ("kda_heads", "kda_head_dim", "kda_conv_kernel"),
        "mamba1": ("mamba1_inner", "mamba1_state", "mamba1_dt_rank", "mamba1_conv_kernel"),
        "ple": ("ple_dim", "ple_vocab"),
    }
    for block, fields in sizes.items():
        if any(spec.has_block(i, block) for i in layers) and not all(getattr(spec, f) for f in fields):
            raise LayoutError(f"model spec: {block} layers need {', '.join(fields)} (positive)")
    if spec.linear_k_heads and spec.linear_v_heads % spec.linear_k_heads:
        raise LayoutError(
            f"model spec: {spec.linear_v_heads} gated-delta-net value heads are not a multiple of its "
            f"{spec.linear_k_heads} key heads (linear_v_heads, linear_k_heads)"
        )
    _check_dsv4_blocks(spec)


def _check_dsv4_blocks(spec: ModelSpec) -> None:
    """DeepSeek-V4's blocks need their sizes: mqa its q rank and output groups, a compressor its
    layer's ratio, the indexer its heads, hyper-connections their stream count."""
    layers = range(spec.total_layers)
    if any(spec.has_block(i, "mqa") for i in layers) and not (
        spec.num_heads and spec.head_dim and spec.q_lora_rank and spec.mqa_o_groups and spec.mqa_o_rank
    ):
        raise LayoutError(
            "model spec: mqa attention needs num_heads, head_dim, q_lora_rank, mqa_o_groups and mqa_o_rank"
        )
    if spec.mqa_o_groups and spec.num_heads % spec.mqa_o_groups:
        raise LayoutError(
            f"model spec: {spec.num_heads} heads do not form {spec.mqa_o_groups} output groups (mqa_o_groups)"
        )
    bad = [i for i in layers if spec.has_block(i, "compressor") and spec.compressor_ratio(i) < 1]
    if bad:
        raise LayoutError(
            f"model spec: layer {bad[0]} has a compressor but no compress ratio (compressor_ratios)"
        )
    if any(spec.has_block(i, "csa_indexer") for i in layers) and not (
        spec.index_heads and spec.index_head_dim
    ):
        raise LayoutError("model spec: csa_indexer layers need index_heads and index_head_dim")
    if any(spec.has_block(i, "hc") for i in layers) and not spec.hc_mult:
        raise LayoutError("model spec: hyper-connection (hc) layers need hc_mult")
