"""The role table: every fact about one canonical tensor role, in one row.

A *role* is a canonical name with the layer number replaced by ``{i}`` and the expert number by
``{e}`` (``layers.{i}.attn.q.weight``).  Each :class:`Role` says how tensor parallelism splits it,
its full shape for a ModelSpec and Layout, and when a model has it (presence); the table's order
is the canonical tensor order (embedding, each layer's roles in table order, final norm, head).
The verifier, the shard/gather passes, the frontends (ordering) and the backends all read this
table; nothing else lists roles.

A model family with tensors the built-in roles do not cover adds its own with
:func:`register_role` (from its table module, or a plugin package's), and every layer of
ckpt-ir then knows them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache

import attrs

from ckpt_ir.ir.blocks import OWN_MIXERS
from ckpt_ir.ir.layout import Layout
from ckpt_ir.ir.names import (
    COLUMN,
    COLUMN_BLOCKS2,
    ROW,
    STACKS,
    SUB,
    Split,
    expert_of,
    layer_name,
    role_of,
    saved_name,
    split_layer,
    split_stack,
    split_sub,
)
from ckpt_ir.ir.spec import ModelSpec

# (spec, layout) -> shape; (spec, layout, layer) -> shape for a role with ``per_layer``
Shape = Callable[..., tuple[int, ...]]
Presence = Callable[[ModelSpec, Layout, int], bool]


def _always(s: ModelSpec, lay: Layout, i: int) -> bool:
    return True


@attrs.frozen
class Fixed:
    """The value the architecture fixes for a tensor that one format stores and another does not
    (transformers saves xIELU's ``beta`` as a buffer, Megatron keeps it as a Python float):
    ``value`` in every element, in the dtype of the same layer's ``dtype_of`` role (a role below
    the layer, e.g. ``mlp.act.alpha_p``)."""

    value: float
    dtype_of: str


@attrs.frozen
class Role:
    """One canonical role.  ``split``: the tensor-parallel rule (None: replicated on every rank).
    ``shape``: the full shape.  ``present``: whether a model with this spec and layout has the
    tensor in layer ``i`` (ignored for non-layer roles, which use ``i = -1``); roles a model may
    or may not carry regardless of the spec (LoRA) have ``present=None``."""

    template: str
    split: Split | None
    shape: Shape = attrs.field(eq=False, repr=False)
    present: Presence | None = attrs.field(default=_always, eq=False, repr=False)
    # the sizes of the parts ``split`` cuts one by one (a Mamba mixer's in_proj: z, x, B, C, dt)
    parts: Callable[[ModelSpec], tuple[int, ...]] | None = attrs.field(default=None, eq=False, repr=False)
    # ``shape`` takes the layer too, (spec, layout, i): a block whose sizes differ from layer to
    # layer (DeepSeek-V4's compressors, each with its layer's ratio)
    per_layer: bool = False
    # the sublayer whose copy of a layer role this is (``layers.{i}.sub<k>.``; None: the layer's)
    sub: int | None = None
    # a tensor whose value the architecture fixes: Megatron stores none (see ckpt_ir.megatron.keys)
    fixed: Fixed | None = None
    # the stack whose role this is (``vision.``: its shape, split and presence are asked of the
    # stack's spec and layout, ModelSpec.stack_spec / Layout.for_stack; None: the language model's)
    stack: str | None = None

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.template


def _vocab(s: ModelSpec, lay: Layout) -> int:
    return lay.padded_vocab or s.vocab_size


def _every(s: ModelSpec, i: int) -> bool:
    return True


def _gqa(
    pred: Callable[[ModelSpec, Layout], bool], here: Callable[[ModelSpec, int], bool] = _every
) -> Presence:
    """Present in every attention layer of a grouped-query (non-MLA) model when ``pred`` holds
    (and ``here`` for the layer: a kv_shared layer has no keys of its own)."""
    return lambda s, lay, i: not s.mla and s.has_attention(i) and pred(s, lay) and here(s, i)


def _attn(
    pred: Callable[[ModelSpec, Layout], bool], here: Callable[[ModelSpec, int], bool] = _every
) -> Presence:
    """Present in every attention layer (not the gated-delta-net ones) when ``pred`` holds (and
    ``here`` for the layer)."""
    return lambda s, lay, i: s.has_attention(i) and pred(s, lay) and here(s, i)


def _split_qkv(s: ModelSpec, lay: Layout) -> bool:
    """Separate q / k / v: unfused layouts, and gated attention in MindSpeed-LLM's qwen3-next
    layout, which keeps q_proj / k_proj / v_proj (megatron-core fuses them with the gates)."""
    return not lay.fused_qkv or (s.attn_gate and lay.gdn_keys == "mindspeed")


def _block(name: str, pred: Callable[[ModelSpec], bool] = lambda s: True) -> Presence:
    return lambda s, lay, i: s.has_block(i, name) and pred(s)


_linear = _block("gdn")


def _gdn(fused: str | None) -> Presence:
    """A gated-delta-net layer's tensor in the unfused layout (None), or in the fused one of
    ``fused`` ("mindspeed" / "mcore", the layout's ``gdn_keys``)."""
    if fused is None:
        return lambda s, lay, i: s.has_block(i, "gdn") and not lay.fused_qkv
    return lambda s, lay, i: s.has_block(i, "gdn") and lay.fused_qkv and lay.gdn_keys == fused


def _gdn_plain_norm(s: ModelSpec, lay: Layout, i: int) -> bool:
    return s.has_block(i, "gdn") and not (lay.fused_qkv and lay.gdn_keys == "mcore")


_mamba = _block("mamba")


def _mamba_norm(s: ModelSpec, lay: Layout, i: int) -> bool:
    """A Mamba layer's own input norm; beside attention (Falcon-H1's parallel mixers) the two
    mixers read the layer's one input norm, attn_norm."""
    return _mamba(s, lay, i) and not _attn_like(s, i)


def _mamba_gated_norm(s: ModelSpec, lay: Layout, i: int) -> bool:
    return _mamba(s, lay, i) and not s.mamba_no_gated_norm


def _mla(pred: Callable[[ModelSpec, Layout], bool]) -> Presence:
    return lambda s, lay, i: s.mla and s.has_attention(i) and pred(s, lay)


def _dense_mlp(fused: bool) -> Presence:
    return lambda s, lay, i: s.has_block(i, "mlp") and lay.fused_gate_up == fused


def _moe(pred: Callable[[ModelSpec, Layout], bool] = lambda s, lay: True) -> Presence:
    return lambda s, lay, i: s.is_moe_layer(i) and pred(s, lay)


def _attn_like(s: ModelSpec, i: int) -> bool:
    """Whether layer ``i`` has an attention-like mixer (softmax, MLA, gated-delta-net, DeepSeek-V4's
    mqa, or one of the mixers ckpt-ir names in Megatron itself), which the layer's input norm feeds."""
    return s.has_attention(i) or any(b in ("gdn", "mqa", *OWN_MIXERS) for b in s.blocks(i))


def _post_normed(s: ModelSpec, i: int) -> bool:
    """Whether layer ``i`` holds the post_norms block: its norms follow its mixer and its MLP
    (post_attn_norm, post_mlp_norm) and none precedes them, whatever the model's pre_norms /
    post_norms say of its other layers (OLMo-Hybrid's attention layers)."""
    return i >= 0 and s.has_block(i, "post_norms")


def _post_norm(s: ModelSpec, i: int) -> bool:
    return s.post_norms or _post_normed(s, i)


def _pre_norm(s: ModelSpec, lay: Layout, i: int) -> bool:
    return s.pre_norms and not _post_normed(s, i) and (i < 0 or _attn_like(s, i) and s.own_norms(i))


def _norm_bias(s: ModelSpec, lay: Layout, i: int) -> bool:
    return s.norm_bias and (i < 0 or _attn_like(s, i) and s.own_norms(i))


def _mlp_norm(s: ModelSpec, lay: Layout, i: int) -> bool:
    """A norm of the MLP's own (not with parallel attention and MLP, which share the input norm,
    nor for a layer-level MLP beside sublayers, which reads theirs)."""
    return (
        s.pre_norms and not s.parallel_attn_mlp and not _post_normed(s, i) and s.has_mlp(i) and s.own_norms(i)
    )


def _indexer(s: ModelSpec, lay: Layout, i: int) -> bool:
    return s.has_indexer(i)


def _mtp(s: ModelSpec, lay: Layout, i: int) -> bool:
    return i >= s.num_layers


def _mlp_roles(
    prefix: str,
    width: Callable[[ModelSpec], int],
    present: Callable[[bool], Presence],
    gate_up_bias: bool = False,
    layer_width: Callable[[ModelSpec, int], int] | None = None,
) -> list[Role]:
    """The MLP (the dense one, an expert, the shared one): gated (gate / up, or Megatron's fused
    gate_up) or plain (one fc1, e.g. GELU), then down; with ``mlp_bias`` their biases (a
    row-parallel layer's bias is added once after the reduction: whole on every TP rank), the
    separate gate / up biases where ``gate_up_bias`` says the MLP may have them (Llama's
    ``mlp_bias``; the experts' come with ``expert_bias``).  ``layer_width``: the width differs
    from layer to layer (Gemma 4's wide MLPs in kv_shared layers), ``(spec, layer) -> width``."""

    def gated(fused: bool) -> Presence:
        return lambda s, lay, i: s.gated_mlp and present(fused)(s, lay, i)

    def anywhere(s: ModelSpec, lay: Layout, i: int) -> bool:
        return present(False)(s, lay, i) or present(True)(s, lay, i)

    def plain(s: ModelSpec, lay: Layout, i: int) -> bool:
        return not s.gated_mlp and anywhere(s, lay, i)

    def biased(p: Presence) -> Presence:
        return lambda s, lay, i: s.mlp_bias and p(s, lay, i)

    def role(name: str, split: Split | None, shape: Callable[[ModelSpec, int], tuple[int, ...]], p: Presence):
        if layer_width is None:
            return Role(prefix + name, split, lambda s, lay: shape(s, -1), p)
        return Role(prefix + name, split, lambda s, lay, i: shape(s, i), p, per_layer=True)

    def w(s: ModelSpec, i: int) -> int:
        return width(s) if layer_width is None else layer_width(s, i)

    separate_biases = [
        role(f"{part}.bias", COLUMN, lambda s, i: (w(s, i),), biased(gated(False)))
        for part in ("gate", "up")
        if gate_up_bias
    ]
    return [
        role("gate.weight", COLUMN, lambda s, i: (w(s, i), s.hidden_size), gated(False)),
        role("up.weight", COLUMN, lambda s, i: (w(s, i), s.hidden_size), gated(False)),
        *separate_biases,
        role("gate_up.weight", COLUMN_BLOCKS2, lambda s, i: (2 * w(s, i), s.hidden_size), gated(True)),
        role("gate_up.bias", COLUMN_BLOCKS2, lambda s, i: (2 * w(s, i),), biased(gated(True))),
        role("fc1.weight", COLUMN, lambda s, i: (w(s, i), s.hidden_size), plain),
        role("fc1.bias", COLUMN, lambda s, i: (w(s, i),), biased(plain)),
        role("down.weight", ROW, lambda s, i: (s.hidden_size, w(s, i)), anywhere),
        role("down.bias", None, lambda s, i: (s.hidden_size,), biased(anywhere)),
    ]


L = "layers.{i}."


def _q_rows(s: ModelSpec, i: int) -> int:
    if s.mla:
        return s.mla_q_size
    return (2 if s.attn_gate else 1) * s.attn_heads(i) * s.attn_head_dim(i)


def _heads_rows(s: ModelSpec, i: int) -> int:
    return s.attn_heads(i) * s.attn_head_dim(i)


def _k_rows(s: ModelSpec, i: int) -> int:
    return s.attn_kv_heads(i) * s.attn_head_dim(i)


def _v_rows(s: ModelSpec, i: int) -> int:
    return s.attn_kv_heads(i) * s.attn_v_dim(i)


def _o_cols(s: ModelSpec, i: int) -> int:
    return s.attn_heads(i) * (s.v_head_dim if s.mla else s.attn_v_dim(i))


def _qkv_rows(s: ModelSpec, i: int) -> int:
    """Megatron's fused linear_qkv: q (with its gates, Qwen3-Next / Qwen3.5), and the layer's own k
    and v (ckpt-ir's layout of a layer without them holds only what it has, or all with
    qkv_pads_kv: Megatron-Bridge's Gemma 4)."""
    k = _k_rows(s, i) if s.qkv_pads_kv or s.attn_has_k(i) else 0
    q = (2 if s.attn_gate else 1) * _heads_rows(s, i)
    if s.has_block(i, "head_gate"):  # each head's gate row repeated head_dim times (qkv_rule)
        q += _heads_rows(s, i)
    return q + k + (_v_rows(s, i) if s.qkv_pads_kv or s.attn_has_v(i) else 0)


def _short_conv_parts(s: ModelSpec) -> tuple[int, ...]:
    return (s.hidden_size,) * 3


def _mamba1_in_parts(s: ModelSpec) -> tuple[int, ...]:
    return (s.mamba1_inner,) * 2


def _short_conv_bias(s: ModelSpec) -> bool:
    return s.short_conv_bias


def _mamba1_proj_bias(s: ModelSpec) -> bool:
    return s.mamba1_proj_bias


def _kda_q(s: ModelSpec, lay: Layout) -> tuple[int, ...]:
    return (s.kda_size, s.hidden_size)


# Mixers no Megatron implementation has; ckpt-ir's own Megatron layout keeps each under
# decoder.layers.N.<block>.* with the TP splits their maths allows (docs/formats.md):
# * LFM2's short convolution: in_proj [B; C; x] (hidden rows each; y = out_proj(C * conv(B * x)),
#   every channel on its own), split part by part so rank r holds [B_r; C_r; x_r]; the depthwise
#   conv by channels; out_proj row-parallel (its bias added once, whole on every rank)
# * Kimi delta attention: per-head q / k / v, their depthwise convs, beta (b), the decay's and the
#   output gate's low-rank up-projections (f_b, g_b) and dt_bias split with the heads; the
#   low-rank down-projections (f_a, g_a) and the per-head output norm whole; A_log one per head
# * Mamba-1: in_proj [x; z] split part by part, conv1d / dt_proj / A_log / D by channels, x_proj
#   (channels -> dt rank + 2 x state) row-parallel, its output's norms (dt, B, C) whole
_OWN_MIXER_ROLES = [
    Role(
        L + "short_conv.in_proj.weight",
        COLUMN,
        lambda s, lay: (3 * s.hidden_size, s.hidden_size),
        _block("short_conv"),
        parts=_short_conv_parts,
    ),
    Role(
        L + "short_conv.in_proj.bias",
        COLUMN,
        lambda s, lay: (3 * s.hidden_size,),
        _block("short_conv", _short_conv_bias),
        parts=_short_conv_parts,
    ),
    Role(
        L + "short_conv.conv.weight",
        COLUMN,
        lambda s, lay: (s.hidden_size, 1, s.short_conv_kernel),
        _block("short_conv"),
    ),
    Role(
        L + "short_conv.conv.bias",
        COLUMN,
        lambda s, lay: (s.hidden_size,),
        _block("short_conv", _short_conv_bias),
    ),
    Role(
        L + "short_conv.out_proj.weight",
        ROW,
        lambda s, lay: (s.hidden_size, s.hidden_size),
        _block("short_conv"),
    ),
    Role(
        L + "short_conv.out_proj.bias",
        None,
        lambda s, lay: (s.hidden_size,),
        _block("short_conv", _short_conv_bias),
    ),
    *(Role(L + f"kda.{p}.weight", COLUMN, _kda_q, _block("kda")) for p in ("q", "k", "v")),
    *(
        Role(
            L + f"kda.{p}_conv.weight",
            COLUMN,
            lambda s, lay: (s.kda_size, 1, s.kda_conv_kernel),
            _block("kda"),
        )
        for p in ("q", "k", "v")
    ),
    Role(L + "kda.b.weight", COLUMN, lambda s, lay: (s.kda_heads, s.hidden_size), _block("kda")),
    Role(L + "kda.f_a.weight", None, lambda s, lay: (s.kda_head_dim, s.hidden_size), _block("kda")),
    Role(L + "kda.f_b.weight", COLUMN, lambda s, lay: (s.kda_size, s.kda_head_dim), _block("kda")),
    Role(L + "kda.g_a.weight", None, lambda s, lay: (s.kda_head_dim, s.hidden_size), _block("kda")),
    Role(L + "kda.g_b.weight", COLUMN, lambda s, lay: (s.kda_size, s.kda_head_dim), _block("kda")),
    Role(L + "kda.A_log", COLUMN, lambda s, lay: (s.kda_heads,), _block("kda")),
    Role(L + "kda.dt_bias", COLUMN, lambda s, lay: (s.kda_size,), _block("kda")),
    Role(L + "kda.o_norm.weight", None, lambda s, lay: (s.kda_head_dim,), _block("kda")),
    Role(L + "kda.o.weight", ROW, lambda s, lay: (s.hidden_size, s.kda_size), _block("kda")),
    Role(
        L + "mamba1.in_proj.weight",
        COLUMN,
        lambda s, lay: (2 * s.mamba1_inner, s.hidden_size),
        _block("mamba1"),
        parts=_mamba1_in_parts,
    ),
    Role(
        L + "mamba1.in_proj.bias",
        COLUMN,
        lambda s, lay: (2 * s.mamba1_inner,),
        _block("mamba1", _mamba1_proj_bias),
        parts=_mamba1_in_parts,
    ),
    Role(
        L + "mamba1.conv1d.weight",
        COLUMN,
        lambda s, lay: (s.mamba1_inner, 1, s.mamba1_conv_kernel),
        _block("mamba1"),
    ),
    Role(
        L + "mamba1.conv1d.bias",
        COLUMN,
        lambda s, lay: (s.mamba1_inner,),
        _block("mamba1", lambda s: s.mamba1_conv_bias),
    ),
    Role(
        L + "mamba1.x_proj.weight",
        ROW,
        lambda s, lay: (s.mamba1_dt_rank + 2 * s.mamba1_state, s.mamba1_inner),
        _block("mamba1"),
    ),
    Role(
        L + "mamba1.dt_proj.weight",
        COLUMN,
        lambda s, lay: (s.mamba1_inner, s.mamba1_dt_rank),
        _block("mamba1"),
    ),
    Role(L + "mamba1.dt_proj.bias", COLUMN, lambda s, lay: (s.mamba1_inner,), _block("mamba1")),
    Role(L + "mamba1.A_log", COLUMN, lambda s, lay: (s.mamba1_inner, s.mamba1_state), _block("mamba1")),
    Role(L + "mamba1.D", COLUMN, lambda s, lay: (s.mamba1_inner,), _block("mamba1")),
    Role(L + "mamba1.dt_norm.weight", None, lambda s, lay: (s.mamba1_dt_rank,), _block("mamba1")),
    Role(L + "mamba1.b_norm.weight", None, lambda s, lay: (s.mamba1_state,), _block("mamba1")),
    Role(L + "mamba1.c_norm.weight", None, lambda s, lay: (s.mamba1_state,), _block("mamba1")),
    Role(L + "mamba1.out_proj.weight", ROW, lambda s, lay: (s.hidden_size, s.mamba1_inner), _block("mamba1")),
    Role(
        L + "mamba1.out_proj.bias", None, lambda s, lay: (s.hidden_size,), _block("mamba1", _mamba1_proj_bias)
    ),
]


def _hc_streams(s: ModelSpec) -> int:
    """Rows of a layer's hyper-connection mixer: [pre (n) | post (n) | comb (n x n)], without
    comb where the hc block has none (HY-V4's independent hyper-connections, ``hc_no_comb``)."""
    return (2 if s.hc_no_comb else 2 + s.hc_mult) * s.hc_mult


def _hc_gains(s: ModelSpec) -> int:
    """A layer's hyper-connection gains: one per mapping (pre, post, and comb where it has one)."""
    return 2 if s.hc_no_comb else 3


def _compressor_roles(prefix: str, head_dim: Callable[[ModelSpec], int], present: Presence) -> list[Role]:
    """A KV compressor: kv and gate projections to its width (two series of ``head_dim`` where
    its windows overlap), a learned position bias per slot of its window (its layer's ratio), the
    norm of a compressed entry; whole on every TP rank (MindSpeed-LLM's deepseek4)."""

    def proj(s: ModelSpec, lay: Layout, i: int) -> tuple[int, ...]:
        return (s.compressor_width(i, head_dim(s)), s.hidden_size)

    return [
        Role(prefix + "wkv.weight", None, proj, present, per_layer=True),
        Role(prefix + "wgate.weight", None, proj, present, per_layer=True),
        Role(
            prefix + "ape",
            None,
            lambda s, lay, i: (s.compressor_ratio(i), s.compressor_width(i, head_dim(s))),
            present,
            per_layer=True,
        ),
        Role(prefix + "norm.weight", None, lambda s, lay: (head_dim(s),), present),
    ]


def _hc_roles(
    prefix: str, rows: Callable[[ModelSpec], int], scales: Callable[[ModelSpec], int], present: Presence
) -> list[Role]:
    """Hyper-connection mixing parameters over ``hc_mult`` residual streams: fn [rows, n x H],
    base [rows], scale [scales]; whole on every TP rank."""
    return [
        Role(prefix + "fn", None, lambda s, lay: (rows(s), s.hc_mult * s.hidden_size), present),
        Role(prefix + "base", None, lambda s, lay: (rows(s),), present),
        Role(prefix + "scale", None, lambda s, lay: (scales(s),), present),
    ]


# DeepSeek-V4.  Block mqa: low-rank queries (wq_a, q_norm, wq_b: heads split over TP), one key =
# value head (wkv, kv_norm; whole), a grouped low-rank output projection (wo_a block-diagonal over
# mqa_o_groups groups of heads: split over TP by groups; wo_b row-parallel), a softmax sink per
# head.  Block compressor: the layer's KV compressor; csa_indexer: the lightning indexer with its
# own compressor (queries from the low-rank q, per-head weights from the input).  Block hc: the
# layer's hyper-connection mixers around attention and MLP (pre, post and comb mappings; scale
# [3] = their three gains); the model's head (and each MTP layer's) mixes the streams into one
# (fn [n, n x H], base [n], scale [1]).  Block hash_router: the MoE routes by a fixed table of
# top-k experts per token id ([vocab, top_k] int64, no score bias).
_MQA = L + "mqa."
_DSV4_ROLES = [
    Role(_MQA + "wq_a.weight", None, lambda s, lay: (s.q_lora_rank, s.hidden_size), _block("mqa")),
    Role(_MQA + "q_norm.weight", None, lambda s, lay: (s.q_lora_rank,), _block("mqa")),
    Role(_MQA + "wq_b.weight", COLUMN, lambda s, lay: (s.q_size, s.q_lora_rank), _block("mqa")),
    Role(_MQA + "wkv.weight", None, lambda s, lay: (s.head_dim, s.hidden_size), _block("mqa")),
    Role(_MQA + "kv_norm.weight", None, lambda s, lay: (s.head_dim,), _block("mqa")),
    Role(
        _MQA + "wo_a.weight",
        COLUMN,
        lambda s, lay: (s.mqa_o_groups * s.mqa_o_rank, s.q_size // max(s.mqa_o_groups, 1)),
        _block("mqa"),
    ),
    Role(
        _MQA + "wo_b.weight",
        ROW,
        lambda s, lay: (s.hidden_size, s.mqa_o_groups * s.mqa_o_rank),
        _block("mqa"),
    ),
    Role(_MQA + "sinks", COLUMN, lambda s, lay: (s.num_heads,), _block("mqa")),
    *_compressor_roles(_MQA + "compressor.", lambda s: s.head_dim, _block("compressor")),
    Role(
        _MQA + "indexer.wq_b.weight",
        None,
        lambda s, lay: (s.index_heads * s.index_head_dim, s.q_lora_rank),
        _block("csa_indexer"),
    ),
    Role(
        _MQA + "indexer.weights_proj.weight",
        None,
        lambda s, lay: (s.index_heads, s.hidden_size),
        _block("csa_indexer"),
    ),
    *_compressor_roles(_MQA + "indexer.compressor.", lambda s: s.index_head_dim, _block("csa_indexer")),
    Role(L + "mlp.router.tid2eid", None, lambda s, lay: (s.vocab_size, s.moe_topk), _block("hash_router")),
    *_hc_roles(L + "hc_attn.", _hc_streams, _hc_gains, _block("hc")),
    *_hc_roles(L + "hc_ffn.", _hc_streams, _hc_gains, _block("hc")),
    *_hc_roles("hc_head.", lambda s: s.hc_mult, lambda s: 1, lambda s, lay, i: s.hc_mult > 0),
    *_hc_roles(
        L + "mtp.hc_head.",
        lambda s: s.hc_mult,
        lambda s: 1,
        lambda s, lay, i: _mtp(s, lay, i) and s.hc_mult > 0,
    ),
]


def _xielu(s: ModelSpec, lay: Layout, i: int) -> bool:
    return s.has_block(i, "mlp") and s.activation == "xielu"


# xIELU, a dense MLP's learned activation (Apertus; transformers' XIELUActivation): the gains of
# its positive and negative branches, alpha_p and alpha_n ([1] each, before their softplus), and
# two constants of the function that transformers saves as buffers, beta = 0.5 and eps = -1e-6
# (scalars in the alphas' dtype); whole on every TP rank
_XIELU_ROLES = [
    Role(L + "mlp.act.alpha_p", None, lambda s, lay: (1,), _xielu),
    Role(L + "mlp.act.alpha_n", None, lambda s, lay: (1,), _xielu),
    Role(L + "mlp.act.beta", None, lambda s, lay: (), _xielu, fixed=Fixed(0.5, "mlp.act.alpha_p")),
    Role(L + "mlp.act.eps", None, lambda s, lay: (), _xielu, fixed=Fixed(-1e-6, "mlp.act.alpha_p")),
]


_MOE_BRANCH_NORMS = ("moe_norm.weight", "post_dense_norm.weight", "post_moe_norm.weight")


def _has_ple(s: ModelSpec, lay: Layout, i: int) -> bool:
    return any(s.has_block(j, "ple") for j in range(s.num_layers))


# Gemma 4's per-layer inputs (block ple): the model's per-layer embedding table [ple_vocab,
# layers x ple_dim] (split over TP by vocabulary rows, as Megatron-Bridge's VocabParallelEmbedding),
# the projection of the embedding output to every layer's input [layers x ple_dim, H] (column
# parallel) and its norm [ple_dim]; in each layer the gate [ple_dim, H] and projection [H, ple_dim]
# of its input and the norm after them (whole on every TP rank, as the Bridge replicates them).
# Block layer_scalar: a learned scale [1] of the layer's output.
_PLE_ROLES = [
    Role("ple_embed.weight", COLUMN, lambda s, lay: (s.ple_vocab, s.num_layers * s.ple_dim), _has_ple),
    Role("ple_proj.weight", COLUMN, lambda s, lay: (s.num_layers * s.ple_dim, s.hidden_size), _has_ple),
    Role("ple_norm.weight", None, lambda s, lay: (s.ple_dim,), _has_ple),
    Role(L + "ple.gate.weight", None, lambda s, lay: (s.ple_dim, s.hidden_size), _block("ple")),
    Role(L + "ple.proj.weight", None, lambda s, lay: (s.hidden_size, s.ple_dim), _block("ple")),
    Role(L + "ple.norm.weight", None, lambda s, lay: (s.hidden_size,), _block("ple")),
    Role(L + "layer_scalar", None, lambda s, lay: (1,), _block("layer_scalar")),
    # Block layer_scale: per-channel scales [H] of the attention's and the MLP's outputs (InternViT)
    Role(L + "attn_scale", None, lambda s, lay: (s.hidden_size,), _block("layer_scale")),
    Role(L + "mlp_scale", None, lambda s, lay: (s.hidden_size,), _block("layer_scale")),
    # block moe_branch (Gemma 4's MoE beside the dense MLP, whose pre-norm is mlp_norm and whose
    # sum with the MoE's output post_mlp_norm norms): the MoE's pre-norm, each branch's post-norm,
    # and the router's input scale [H] and per-expert weight scale [E]; whole on every TP rank
    *(Role(L + n, None, lambda s, lay: (s.hidden_size,), _block("moe_branch")) for n in _MOE_BRANCH_NORMS),
    Role(L + "mlp.router.scale", None, lambda s, lay: (s.hidden_size,), _block("moe_branch")),
    Role(L + "mlp.router.expert_scale", None, lambda s, lay: (s.num_experts,), _block("moe_branch")),
]


def _choices(s: ModelSpec) -> int:
    """What a MoE router scores: the routed experts and the zero-computation ones."""
    return s.num_experts + s.zero_experts


def _patch_shape(s: ModelSpec, lay: Layout) -> tuple[int, ...]:
    if s.patch_unfold:  # a linear layer over each unfolded patch (channels, then rows, columns)
        return (s.hidden_size, s.patch_channels * s.patch_size**2)
    frames = (s.patch_temporal,) if s.patch_temporal else ()
    return (s.hidden_size, s.patch_channels, *frames, s.patch_size, s.patch_size)


def _tower(pred: Callable[[ModelSpec], bool]) -> Presence:
    return lambda s, lay, i: pred(s)


def _tower_role(
    name: str,
    split: Split | None,
    shape: Callable[[ModelSpec], tuple[int, ...]],
    pred: Callable[[ModelSpec], bool],
) -> Role:
    """A role of a vision stack outside its layers: ``vision.<name>``, split over TP as ``split``
    says, of the shape ``shape`` gives the stack's spec, present where ``pred`` holds of it."""
    return Role(V + name, split, lambda s, lay: shape(s), _tower(pred), stack="vision")


def _pos_embed_shape(s: ModelSpec, lay: Layout) -> tuple[int, ...]:
    if s.pos_embed_width:  # a grid of rows x pos_embed_width positions (Kimi-K2.5's)
        return (s.pos_embed_size // s.pos_embed_width, s.pos_embed_width, s.hidden_size)
    return (s.pos_embed_size, s.hidden_size)


def _merger(bias: bool = False) -> Presence:
    return lambda s, lay, i: s.merger_size > 0 and (not bias or s.mlp_bias)


def _shuffled(s: ModelSpec, lay: Layout) -> tuple[int]:
    """The width after InternVL's pixel shuffle: shuffle_size^2 patches of hidden_size each."""
    return (s.hidden_size * s.shuffle_size**2,)


# A vision stack's own blocks (ir/blocks.py STACK_BLOCKS), asked of the stack's spec: the patch
# embedding (a convolution, whole on every TP rank) and the merger: a norm, then fc1 over
# merger_size^2 patches (column-parallel) and fc2 to the language model's width (row-parallel, its
# bias added once); its layers are ordinary layers' roles under vision.layers.{i}. (see role()).
V = "vision."
_VISION_ROLES = [
    Role(V + "patch_embed.weight", None, _patch_shape, _tower(lambda s: s.patch_size > 0), stack="vision"),
    _tower_role(
        "patch_embed.bias", None, lambda s: (s.hidden_size,), lambda s: s.patch_size > 0 and s.patch_bias
    ),
    Role(V + "merger.norm.weight", None, lambda s, lay: (s.hidden_size,), _merger(), stack="vision"),
    Role(
        V + "merger.norm.bias",
        None,
        lambda s, lay: (s.hidden_size,),
        lambda s, lay, i: s.merger_size > 0 and s.norm_bias,
        stack="vision",
    ),
    Role(
        V + "merger.fc1.weight",
        COLUMN,
        lambda s, lay: (s.merger_hidden, s.merger_hidden),
        _merger(),
        stack="vision",
    ),
    Role(V + "merger.fc1.bias", COLUMN, lambda s, lay: (s.merger_hidden,), _merger(True), stack="vision"),
    Role(
        V + "merger.fc2.weight",
        ROW,
        lambda s, lay: (s.merger_out, s.merger_hidden),
        _merger(),
        stack="vision",
    ),
    Role(V + "merger.fc2.bias", None, lambda s, lay: (s.merger_out,), _merger(True), stack="vision"),
    # SigLIP's (Gemma 3's tower): learned positions, a norm after the layers, and a projector (a
    # norm, one weight [projector_out, hidden] column-parallel, no bias)
    Role(
        V + "pos_embed.weight",
        None,
        _pos_embed_shape,
        _tower(lambda s: s.pos_embed_size > 0),
        stack="vision",
    ),
    _tower_role("final_norm.weight", None, lambda s: (s.hidden_size,), lambda s: s.post_norm),
    _tower_role("final_norm.bias", None, lambda s: (s.hidden_size,), lambda s: s.post_norm and s.norm_bias),
    _tower_role("projector.norm.weight", None, lambda s: (s.hidden_size,), lambda s: s.projector_out > 0),
    _tower_role(
        "projector.weight", COLUMN, lambda s: (s.projector_out, s.hidden_size), lambda s: s.projector_out > 0
    ),
    # GLM-4.1V's tower (transformers Glm4vVisionModel): a norm after the patch embedding, a 2-D
    # convolution of downsample_size^2 patches to merger_out after the final norm, and a merger on
    # merger_out (proj, a LayerNorm with a bias, a gated MLP merger_ffn wide); whole on every TP
    # rank (plain modules in MindSpeed-MM's GlmViT / GlmMLP; Megatron-Bridge keeps the HF form)
    *(
        Role(V + f"patch_norm.{kind}", None, lambda s, lay: (s.hidden_size,), _tower(pred), stack="vision")
        for kind, pred in (
            ("weight", lambda s: s.patch_norm),
            ("bias", lambda s: s.patch_norm and s.norm_bias),
        )
    ),
    _tower_role(
        "downsample.weight",
        None,
        lambda s: (s.merger_out, s.hidden_size, s.downsample_size, s.downsample_size),
        lambda s: s.downsample_size > 0,
    ),
    _tower_role("downsample.bias", None, lambda s: (s.merger_out,), lambda s: s.downsample_size > 0),
    *(
        Role(V + f"merger.{name}", None, shape, _tower(lambda s: s.merger_ffn > 0), stack="vision")
        for name, shape in (
            ("proj.weight", lambda s, lay: (s.merger_out, s.merger_out)),
            ("proj_norm.weight", lambda s, lay: (s.merger_out,)),
            ("proj_norm.bias", lambda s, lay: (s.merger_out,)),
            ("gate.weight", lambda s, lay: (s.merger_ffn, s.merger_out)),
            ("up.weight", lambda s, lay: (s.merger_ffn, s.merger_out)),
            ("down.weight", lambda s, lay: (s.merger_out, s.merger_ffn)),
        )
    ),
]


# Pixtral's (Mistral 3's) and Llama 4's tower blocks (ModelSpec.pre_norm ... projector_mlp_*): a
# norm before the layers, a class embedding, Mistral 3's patch merger (a norm, then one weight
# from merger^2 patches back to the tower's width), Llama 4's pixel-shuffle adapter MLP and the
# projector MLP to the language model's width.  Megatron-Bridge keeps these towers in their HF
# form, whole on every rank; the splits are Megatron's usual ones for a norm, a column- and a
# row-parallel linear layer.
def _projector_mlp(n: int, bias: bool = False) -> Presence:
    return _tower(lambda s: s.projector_mlp_layers >= n and (not bias or s.projector_mlp_bias))


_PIXTRAL_LLAMA4_ROLES = [
    _tower_role("pre_norm.weight", None, lambda s: (s.hidden_size,), lambda s: s.pre_norm),
    _tower_role("pre_norm.bias", None, lambda s: (s.hidden_size,), lambda s: s.pre_norm and s.norm_bias),
    _tower_role("class_embed.weight", None, lambda s: (s.hidden_size,), lambda s: s.class_embed),
    _tower_role(
        "patch_merger.norm.weight", None, lambda s: (s.hidden_size,), lambda s: s.patch_merger_size > 0
    ),
    _tower_role(
        "patch_merger.weight",
        None,
        lambda s: (s.hidden_size, s.hidden_size * s.patch_merger_size**2),
        lambda s: s.patch_merger_size > 0,
    ),
    _tower_role(
        "adapter.fc1.weight", COLUMN, lambda s: (s.adapter_hidden, s.adapter_in), lambda s: s.adapter_in > 0
    ),
    _tower_role(
        "adapter.fc2.weight", ROW, lambda s: (s.adapter_out, s.adapter_out), lambda s: s.adapter_in > 0
    ),
    Role(
        V + "projector.fc1.weight",
        COLUMN,
        lambda s, lay: (s.projector_mlp_out, s.projector_mlp_in),
        _projector_mlp(1),
        stack="vision",
    ),
    Role(
        V + "projector.fc1.bias",
        COLUMN,
        lambda s, lay: (s.projector_mlp_out,),
        _projector_mlp(1, bias=True),
        stack="vision",
    ),
    Role(
        V + "projector.fc2.weight",
        ROW,
        lambda s, lay: (s.projector_mlp_out, s.projector_mlp_out),
        _projector_mlp(2),
        stack="vision",
    ),
    Role(
        V + "projector.fc2.bias",
        None,
        lambda s, lay: (s.projector_mlp_out,),
        _projector_mlp(2, bias=True),
        stack="vision",
    ),
]
# SigLIP's attention-pooling head (block pool_head; transformers modeling_siglip.py:567-569,
# 621-630): whole on every rank, as Megatron-Bridge keeps the tower whole
_POOL_HEAD_ROLES = [
    Role(V + "pool_head." + name, None, shape, _tower(lambda s: s.pool_head), stack="vision")
    for name, shape in (
        ("probe", lambda s, lay: (1, 1, s.hidden_size)),
        ("attn.in_proj.weight", lambda s, lay: (3 * s.hidden_size, s.hidden_size)),
        ("attn.in_proj.bias", lambda s, lay: (3 * s.hidden_size,)),
        ("attn.o.weight", lambda s, lay: (s.hidden_size, s.hidden_size)),
        ("attn.o.bias", lambda s, lay: (s.hidden_size,)),
        ("norm.weight", lambda s, lay: (s.hidden_size,)),
        ("norm.bias", lambda s, lay: (s.hidden_size,)),
        ("fc1.weight", lambda s, lay: (s.ffn_hidden_size, s.hidden_size)),
        ("fc1.bias", lambda s, lay: (s.ffn_hidden_size,)),
        ("fc2.weight", lambda s, lay: (s.hidden_size, s.ffn_hidden_size)),
        ("fc2.bias", lambda s, lay: (s.hidden_size,)),
    )
]
# of those, the ones after the tower's layers in canonical order
_AFTER_TOWER_LAYERS = ("patch_merger.", "adapter.", "projector.fc", "pool_head.")


def _deepstack(bias: bool = False) -> Presence:
    return lambda s, lay, i: i in s.deepstack_layers and (not bias or s.mlp_bias)


# block deepstack of a vision stack's layer (Qwen3-VL): a merger of the layer's output beside the
# tower's own (Qwen3VLVisionPatchMerger with use_postshuffle_norm: its LayerNorm over the merged
# merger_hidden features), in the layers ModelSpec.deepstack_layers lists
_DEEPSTACK_ROLES = [
    Role(L + "deepstack.norm.weight", None, lambda s, lay: (s.merger_hidden,), _deepstack()),
    Role(
        L + "deepstack.norm.bias",
        None,
        lambda s, lay: (s.merger_hidden,),
        lambda s, lay, i: i in s.deepstack_layers and s.norm_bias,
    ),
    Role(L + "deepstack.fc1.weight", COLUMN, lambda s, lay: (s.merger_hidden, s.merger_hidden), _deepstack()),
    Role(L + "deepstack.fc1.bias", COLUMN, lambda s, lay: (s.merger_hidden,), _deepstack(True)),
    Role(L + "deepstack.fc2.weight", ROW, lambda s, lay: (s.merger_out, s.merger_hidden), _deepstack()),
    Role(L + "deepstack.fc2.bias", None, lambda s, lay: (s.merger_out,), _deepstack(True)),
    # InternViT's (InternVL's tower): a class token and positions for it and each patch, stored
    # [1, tokens, hidden] (block cls_embed)
    _tower_role("cls_token", None, lambda s: (1, 1, s.hidden_size), lambda s: s.cls_token),
    _tower_role(
        "cls_pos_embed", None, lambda s: (1, s.cls_positions, s.hidden_size), lambda s: s.cls_positions > 0
    ),
    # InternVL's projector after the pixel shuffle (block shuffle_projector): LayerNorm, fc1, fc2,
    # with biases; whole on every TP rank (MindSpeed-MM's converters/internvl.py splits none of it)
    *(
        Role(
            V + f"shuffle_proj.norm.{kind}",
            None,
            _shuffled,
            _tower(lambda s: s.shuffle_size > 0),
            stack="vision",
        )
        for kind in ("weight", "bias")
    ),
    Role(
        V + "shuffle_proj.fc1.weight",
        None,
        lambda s, lay: (s.shuffle_out, _shuffled(s, lay)[0]),
        _tower(lambda s: s.shuffle_size > 0),
        stack="vision",
    ),
    _tower_role(
        "shuffle_proj.fc2.weight",
        None,
        lambda s: (s.shuffle_out, s.shuffle_out),
        lambda s: s.shuffle_size > 0,
    ),
    *(
        _tower_role(f"shuffle_proj.{fc}.bias", None, lambda s: (s.shuffle_out,), lambda s: s.shuffle_size > 0)
        for fc in ("fc1", "fc2")
    ),
]


_BUILTIN: list[Role] = [
    Role("embed.weight", COLUMN, lambda s, lay: (_vocab(s, lay), s.hidden_size)),
    # learned absolute positions (Megatron's torch.nn.Embedding: not split over TP)
    Role(
        "pos_embed.weight",
        None,
        lambda s, lay: (s.position_embeddings, s.hidden_size),
        lambda s, lay, i: s.position_embeddings > 0,
    ),
    Role(
        "lm_head.weight", COLUMN, lambda s, lay: (_vocab(s, lay), s.hidden_size), lambda s, lay, i: s.untied
    ),
    Role(
        "lm_head.bias",
        COLUMN,
        lambda s, lay: (_vocab(s, lay),),
        lambda s, lay, i: s.untied and s.lm_head_bias,
    ),
    # BLOOM normalises the embedding output (LayerNorm with a bias)
    Role("embed_norm.weight", None, lambda s, lay: (s.hidden_size,), lambda s, lay, i: s.embed_norm),
    Role(
        "embed_norm.bias",
        None,
        lambda s, lay: (s.hidden_size,),
        lambda s, lay, i: s.embed_norm and s.norm_bias,
    ),
    Role("final_norm.weight", None, lambda s, lay: (s.hidden_size,)),
    Role("final_norm.bias", None, lambda s, lay: (s.hidden_size,), _norm_bias),
    Role(L + "attn_norm.weight", None, lambda s, lay: (s.hidden_size,), _pre_norm),
    Role(L + "attn_norm.bias", None, lambda s, lay: (s.hidden_size,), _norm_bias),
    # attention: separate q/k/v (MLA without q-LoRA projects q directly), or Megatron's fused qkv;
    # sizes per layer (a global_attention layer's heads may differ, a kv_shared layer has no k / v)
    Role(
        L + "attn.q.weight",
        COLUMN,
        lambda s, lay, i: (_q_rows(s, i), s.hidden_size),
        lambda s, lay, i: s.has_attention(i) and _split_qkv(s, lay) and not (s.mla and s.q_lora_rank),
        per_layer=True,
    ),
    Role(
        L + "attn.k.weight",
        COLUMN,
        lambda s, lay, i: (_k_rows(s, i), s.hidden_size),
        _gqa(_split_qkv, ModelSpec.attn_has_k),
        per_layer=True,
    ),
    Role(
        L + "attn.v.weight",
        COLUMN,
        lambda s, lay, i: (_v_rows(s, i), s.hidden_size),
        _gqa(_split_qkv, ModelSpec.attn_has_v),
        per_layer=True,
    ),
    Role(
        L + "attn.q.bias",
        COLUMN,
        lambda s, lay, i: (_heads_rows(s, i),),
        _gqa(lambda s, lay: s.qkv_bias and _split_qkv(s, lay)),
        per_layer=True,
    ),
    Role(
        L + "attn.k.bias",
        COLUMN,
        lambda s, lay, i: (_k_rows(s, i),),
        _gqa(lambda s, lay: s.qkv_bias and _split_qkv(s, lay), ModelSpec.attn_has_k),
        per_layer=True,
    ),
    Role(
        L + "attn.v.bias",
        COLUMN,
        lambda s, lay, i: (_v_rows(s, i),),
        _gqa(lambda s, lay: s.qkv_bias and _split_qkv(s, lay), ModelSpec.attn_has_v),
        per_layer=True,
    ),
    Role(
        L + "attn.qkv.weight",
        COLUMN,
        lambda s, lay, i: (_qkv_rows(s, i), s.hidden_size),
        _gqa(lambda s, lay: not _split_qkv(s, lay)),
        per_layer=True,
    ),
    Role(
        L + "attn.qkv.bias",
        COLUMN,
        lambda s, lay, i: (_qkv_rows(s, i),),
        _gqa(lambda s, lay: s.qkv_bias and not _split_qkv(s, lay)),
        per_layer=True,
    ),
    Role(
        L + "attn.o.weight",
        ROW,
        lambda s, lay, i: (s.hidden_size, _o_cols(s, i)),
        _attn(lambda s, lay: True),
        per_layer=True,
    ),
    # a row-parallel layer's bias is added once after the reduction: whole on every TP rank
    Role(L + "attn.o.bias", None, lambda s, lay: (s.hidden_size,), _attn(lambda s, lay: s.o_bias)),
    Role(
        L + "attn.q_norm.weight",
        None,
        lambda s, lay, i: (s.attn_head_dim(i),),
        _attn(lambda s, lay: s.qk_norm),
        per_layer=True,
    ),
    Role(
        L + "attn.k_norm.weight",
        None,
        lambda s, lay, i: (s.attn_head_dim(i),),
        # in a layer without keys too where Megatron's fused qkv is padded (qkv_pads_kv)
        lambda s, lay, i: (
            s.has_attention(i) and s.qk_norm and (s.attn_has_k(i) or (s.qkv_pads_kv and lay.fused_qkv))
        ),
        per_layer=True,
    ),
    Role(
        L + "attn.q_norm.bias",
        None,
        lambda s, lay, i: (s.attn_head_dim(i),),
        _attn(lambda s, lay: s.qk_norm and s.norm_bias),
        per_layer=True,
    ),
    Role(
        L + "attn.k_norm.bias",
        None,
        lambda s, lay, i: (s.attn_head_dim(i),),
        _attn(lambda s, lay: s.qk_norm and s.norm_bias, ModelSpec.attn_has_k),
        per_layer=True,
    ),
    # full-width q/k norms (one weight over all heads): whole on every TP rank, as MindSpeed-LLM's
    # minimax_m2 converter writes them (Megatron-Bridge would split them with their heads)
    Role(
        L + "attn.q_full_norm.weight",
        None,
        lambda s, lay: (s.q_size,),
        _attn(lambda s, lay: s.qk_full_norm),
    ),
    Role(
        L + "attn.k_full_norm.weight",
        None,
        lambda s, lay: (s.kv_size,),
        _attn(lambda s, lay: s.qk_full_norm),
    ),
    # attention sinks (gpt-oss): one learned softmax offset per head, split over TP with the heads;
    # not in a global_attention layer (MiMo-V2-Flash has them in its sliding-window layers only)
    Role(
        L + "attn.sinks",
        COLUMN,
        lambda s, lay: (s.num_heads,),
        _attn(lambda s, lay: s.attn_sinks, lambda s, i: not s.has_block(i, "global_attention")),
    ),
    Role(
        L + "post_attn_norm.weight",
        None,
        lambda s, lay: (s.hidden_size,),
        lambda s, lay, i: _post_norm(s, i) and _attn_like(s, i),
    ),
    Role(L + "mlp_norm.weight", None, lambda s, lay: (s.hidden_size,), _mlp_norm),
    Role(
        L + "mlp_norm.bias",
        None,
        lambda s, lay: (s.hidden_size,),
        lambda s, lay, i: s.norm_bias and _mlp_norm(s, lay, i),
    ),
    # the dense MLP: gated, or plain (BLOOM, a GELU Megatron GPT: Megatron's linear_fc1 is then fc1
    # alone, split over TP as one block), biases as the model has them
    *_mlp_roles(
        L + "mlp.",
        lambda s: s.ffn_hidden_size,
        _dense_mlp,
        gate_up_bias=True,
        layer_width=ModelSpec.mlp_width,
    ),
    *_XIELU_ROLES,
    Role(
        L + "post_mlp_norm.weight",
        None,
        lambda s, lay: (s.hidden_size,),
        lambda s, lay, i: _post_norm(s, i) and s.has_mlp(i) and s.own_norms(i),
    ),
    # mixture of experts: router (and its score-correction bias), routed experts, shared experts.
    # Expert tensors follow the dense MLP rules; with expert TP = 1 the shard pass leaves them whole.
    # The router scores the zero-computation experts too (their rows after the real experts').
    Role(L + "mlp.router.weight", None, lambda s, lay: (_choices(s), s.hidden_size), _moe()),
    Role(
        L + "mlp.router.bias",
        None,
        lambda s, lay: (_choices(s),),
        lambda s, lay, i: s.is_moe_layer(i) and s.router_bias and not s.has_block(i, "hash_router"),
    ),
    # the router linear's own bias (gpt-oss), added to the logits; not a score-correction bias
    Role(
        L + "mlp.router.logit_bias",
        None,
        lambda s, lay: (_choices(s),),
        _moe(lambda s, lay: s.router_logit_bias),
    ),
    *_mlp_roles(
        L + "mlp.experts.{e}.",
        lambda s: s.moe_ffn_hidden_size,
        lambda fused: _moe(lambda s, lay: lay.fused_gate_up == fused),
    ),
    # expert biases (gpt-oss): gate/up biases split like their weights' rows; down is row-parallel,
    # its bias added once after the reduction (whole on every TP rank)
    *(
        Role(
            L + f"mlp.experts.{{e}}.{part}.bias",
            COLUMN,
            lambda s, lay: (s.moe_ffn_hidden_size,),
            _moe(lambda s, lay: s.expert_bias and not lay.fused_gate_up),
        )
        for part in ("gate", "up")
    ),
    Role(
        L + "mlp.experts.{e}.gate_up.bias",
        COLUMN_BLOCKS2,
        lambda s, lay: (2 * s.moe_ffn_hidden_size,),
        _moe(lambda s, lay: s.expert_bias and lay.fused_gate_up),
    ),
    Role(
        L + "mlp.experts.{e}.down.bias",
        None,
        lambda s, lay: (s.hidden_size,),
        _moe(lambda s, lay: s.expert_bias),
    ),
    *_mlp_roles(
        L + "mlp.shared.",
        lambda s: s.shared_ffn_hidden_size,
        lambda fused: _moe(lambda s, lay: bool(s.shared_ffn_hidden_size) and lay.fused_gate_up == fused),
    ),
    Role(
        L + "mlp.shared_gate.weight",
        None,
        lambda s, lay: (1, s.hidden_size),
        _moe(lambda s, lay: s.shared_expert_gate),
    ),
    # multi-latent attention (DeepSeek): low-rank q and kv projections; Megatron fuses the two
    # down-projections into one replicated linear_qkv ("qkv_a") and splits the up-projections
    Role(
        L + "attn.q_a.weight",
        None,
        lambda s, lay: (s.q_lora_rank, s.hidden_size),
        _mla(lambda s, lay: bool(s.q_lora_rank) and not lay.fused_qkv),
    ),
    Role(
        L + "attn.q_a_norm.weight",
        None,
        lambda s, lay: (s.q_lora_rank,),
        _mla(lambda s, lay: bool(s.q_lora_rank)),
    ),
    Role(
        L + "attn.q_b.weight",
        COLUMN,
        lambda s, lay: (s.mla_q_size, s.q_lora_rank),
        _mla(lambda s, lay: bool(s.q_lora_rank)),
    ),
    Role(
        L + "attn.kv_a.weight",
        None,
        lambda s, lay: (s.kv_lora_rank + s.qk_rope_dim, s.hidden_size),
        _mla(lambda s, lay: not lay.fused_qkv),
    ),
    Role(L + "attn.kv_a_norm.weight", None, lambda s, lay: (s.kv_lora_rank,), _mla(lambda s, lay: True)),
    Role(
        L + "attn.kv_b.weight",
        COLUMN,
        lambda s, lay: (s.num_heads * (s.qk_nope_dim + s.v_head_dim), s.kv_lora_rank),
        _mla(lambda s, lay: True),
    ),
    Role(
        L + "attn.qkv_a.weight",
        None,
        lambda s, lay: ((s.q_lora_rank or s.mla_q_size) + s.kv_lora_rank + s.qk_rope_dim, s.hidden_size),
        _mla(lambda s, lay: lay.fused_qkv),
    ),
    # gated-delta-net linear attention (Qwen3-Next, Qwen3.5): q / k [key heads x key dim], v / z
    # (the output gate) [value heads x value dim], b / a (beta, alpha) [value heads], each split over
    # TP by heads; Megatron fuses them: megatron-core's in_proj [q; k; v; z; b; a] split part by
    # part (rank r holds [q_r; k_r; v_r; z_r; b_r; a_r]), or MindSpeed-LLM's HF packing per key head
    # (in_qkvz [q_g; k_g; v_g; z_g], in_ba [b_g; a_g]: TP 1 only).  conv1d over [q; k; v] channels
    # (split part by part), per-value-head A_log / dt_bias; the gated RMSNorm over one head's values
    # is plain in HF and MindSpeed-LLM and zero-centred in megatron-core (out_norm = norm - 1)
    *(
        Role(L + f"attn.gdn.{p}.weight", COLUMN, shape, _gdn(None))
        for p, shape in (
            ("q", lambda s, lay: (s.linear_qk_size, s.hidden_size)),
            ("k", lambda s, lay: (s.linear_qk_size, s.hidden_size)),
            ("v", lambda s, lay: (s.linear_v_size, s.hidden_size)),
            ("z", lambda s, lay: (s.linear_v_size, s.hidden_size)),
            ("b", lambda s, lay: (s.linear_v_heads, s.hidden_size)),
            ("a", lambda s, lay: (s.linear_v_heads, s.hidden_size)),
        )
    ),
    Role(
        L + "attn.gdn.in_proj.weight",
        COLUMN,
        lambda s, lay: (sum(s.gdn_in_proj_parts), s.hidden_size),
        _gdn("mcore"),
        parts=lambda s: s.gdn_in_proj_parts,
    ),
    Role(
        L + "attn.gdn.in_qkvz.weight",
        COLUMN,
        lambda s, lay: (2 * s.linear_qk_size + 2 * s.linear_v_size, s.hidden_size),
        _gdn("mindspeed"),
    ),
    Role(
        L + "attn.gdn.in_ba.weight",
        COLUMN,
        lambda s, lay: (2 * s.linear_v_heads, s.hidden_size),
        _gdn("mindspeed"),
    ),
    Role(
        L + "attn.gdn.conv1d.weight",
        COLUMN,
        lambda s, lay: (sum(s.gdn_conv_parts), 1, s.linear_conv_kernel),
        _linear,
        parts=lambda s: s.gdn_conv_parts,
    ),
    Role(L + "attn.gdn.A_log", COLUMN, lambda s, lay: (s.linear_v_heads,), _linear),
    Role(L + "attn.gdn.dt_bias", COLUMN, lambda s, lay: (s.linear_v_heads,), _linear),
    Role(L + "attn.gdn.norm.weight", None, lambda s, lay: (s.linear_v_dim,), _gdn_plain_norm),
    Role(L + "attn.gdn.out_norm.weight", None, lambda s, lay: (s.linear_v_dim,), _gdn("mcore")),
    Role(L + "attn.gdn.out.weight", ROW, lambda s, lay: (s.hidden_size, s.linear_v_size), _linear),
    # a Mamba-2 mixer (Mamba / attention hybrids): its own input norm, in_proj [z; x; B; C; dt] and
    # conv1d over [x; B; C] channels, each split over TP part by part (rank r holds
    # [z_r; x_r; B_r; C_r; dt_r], megatron-core's MambaMixer), per-head dt_bias / A_log / D, the
    # gated RMSNorm over d (groups of d / mamba_groups, so TP divides the groups), out_proj
    Role(L + "mamba_norm.weight", None, lambda s, lay: (s.hidden_size,), _mamba_norm),
    Role(
        L + "mamba.in_proj.weight",
        COLUMN,
        lambda s, lay: (sum(s.mamba_in_proj_parts), s.hidden_size),
        _mamba,
        parts=lambda s: s.mamba_in_proj_parts,
    ),
    Role(
        L + "mamba.conv1d.weight",
        COLUMN,
        lambda s, lay: (sum(s.mamba_conv_parts), 1, s.mamba_conv_kernel),
        _mamba,
        parts=lambda s: s.mamba_conv_parts,
    ),
    Role(
        L + "mamba.conv1d.bias",
        COLUMN,
        lambda s, lay: (sum(s.mamba_conv_parts),),
        _mamba,
        parts=lambda s: s.mamba_conv_parts,
    ),
    Role(L + "mamba.dt_bias", COLUMN, lambda s, lay: (s.mamba_heads,), _mamba),
    Role(L + "mamba.A_log", COLUMN, lambda s, lay: (s.mamba_heads,), _mamba),
    Role(L + "mamba.D", COLUMN, lambda s, lay: (s.mamba_heads,), _mamba),
    Role(L + "mamba.norm.weight", COLUMN, lambda s, lay: (s.mamba_inner,), _mamba_gated_norm),
    Role(L + "mamba.out_proj.weight", ROW, lambda s, lay: (s.hidden_size, s.mamba_inner), _mamba),
    *_OWN_MIXER_ROLES,
    *_DSV4_ROLES,
    *_PLE_ROLES,
    # DeepSeek sparse attention's lightning indexer (V3.2, GLM-5): small projections beside MLA,
    # duplicated on every TP rank in Megatron (MindSpeed-LLM and megatron-core's DSAIndexer alike)
    Role(
        L + "attn.indexer.wq_b.weight",
        None,
        lambda s, lay: (s.index_heads * s.index_head_dim, s.q_lora_rank),
        _indexer,
    ),
    Role(L + "attn.indexer.wk.weight", None, lambda s, lay: (s.index_head_dim, s.hidden_size), _indexer),
    Role(L + "attn.indexer.k_norm.weight", None, lambda s, lay: (s.index_head_dim,), _indexer),
    Role(L + "attn.indexer.k_norm.bias", None, lambda s, lay: (s.index_head_dim,), _indexer),
    Role(
        L + "attn.indexer.weights_proj.weight", None, lambda s, lay: (s.index_heads, s.hidden_size), _indexer
    ),
    # multi-token prediction: layers numbered after the main ones carry these besides a full
    # transformer layer; embed and head are the main model's (shared in Megatron)
    Role(L + "mtp.enorm.weight", None, lambda s, lay: (s.hidden_size,), _mtp),
    Role(L + "mtp.hnorm.weight", None, lambda s, lay: (s.hidden_size,), _mtp),
    Role(L + "mtp.eh_proj.weight", COLUMN, lambda s, lay: (s.hidden_size, 2 * s.hidden_size), _mtp),
    Role(L + "mtp.norm.weight", None, lambda s, lay: (s.hidden_size,), _mtp),
    Role(L + "mtp.embed.weight", COLUMN, lambda s, lay: (_vocab(s, lay), s.hidden_size), _mtp),
    Role(L + "mtp.head.weight", COLUMN, lambda s, lay: (_vocab(s, lay), s.hidden_size), _mtp),
]

# LoRA adapters attach to linear layers: ``<target>.lora_a.weight`` [r, in] and
# ``<target>.lora_b.weight`` [out, r], and for DoRA ``<target>.lora_magnitude.weight`` [out].
# A column-parallel target keeps A whole and splits B and the magnitude like the weight; a
# row-parallel target splits A like the weight (dim 1) and keeps B and the magnitude whole.
# The rank may differ per target (peft's rank_pattern): the verifier reads it from the tensor.
LINEAR_TARGETS = (
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.qkv",
    "attn.o",
    "mlp.gate",
    "mlp.up",
    "mlp.gate_up",
    "mlp.fc1",
    "mlp.down",
    "mlp.experts.{e}.gate",
    "mlp.experts.{e}.up",
    "mlp.experts.{e}.gate_up",
    "mlp.experts.{e}.down",
    "mlp.shared.gate",
    "mlp.shared.up",
    "mlp.shared.gate_up",
    "mlp.shared.down",
)

_TABLE: dict[str, Role] = {}
_SUB_ROLES: dict[tuple[str, int], Role] = {}  # layer roles copied into sublayers, made when asked
_STACK_ROLES: dict[tuple[str, str], Role] = {}  # layer roles copied into stacks, made when asked


@lru_cache(maxsize=1)
def _order() -> dict[str, int]:
    return {t: n for n, t in enumerate(_TABLE)}


def _lora_roles(target: Role) -> list[Role]:
    rule = target.split  # None: a linear layer whole on every rank, its A and B too
    base = target.template[: -len(".weight")]

    def full(s: ModelSpec, lay: Layout, i: int) -> tuple[int, ...]:
        return target.shape(s, lay, i) if target.per_layer else target.shape(s, lay)

    def a_shape(s: ModelSpec, lay: Layout, i: int = -1) -> tuple[int, ...]:
        return (s.lora_rank or 0, full(s, lay, i)[1])

    def b_shape(s: ModelSpec, lay: Layout, i: int = -1) -> tuple[int, ...]:
        return (full(s, lay, i)[0], s.lora_rank or 0)

    def m_shape(s: ModelSpec, lay: Layout, i: int = -1) -> tuple[int, ...]:
        return full(s, lay, i)[:1]

    per_layer = target.per_layer
    column = rule is not None and rule.dim == 0
    return [
        Role(
            base + ".lora_a.weight",
            None if rule is None or column else ROW,
            a_shape,
            None,
            per_layer=per_layer,
            stack=target.stack,
        ),
        Role(
            base + ".lora_b.weight",
            rule if column else None,
            b_shape,
            None,
            per_layer=per_layer,
            stack=target.stack,
        ),
        Role(
            base + ".lora_magnitude.weight",
            rule if column else None,
            m_shape,
            None,
            per_layer=per_layer,
            stack=target.stack,
        ),
    ]


def _saved_role(target: Role) -> Role:
    """A full tensor saved with an adapter (peft's modules_to_save) that replaces its base tensor
    ``<module>.<leaf>``: ``<module>.lora_saved.<leaf>``, split and shaped like it."""
    return Role(
        saved_name(target.template),
        target.split,
        target.shape,
        None,
        parts=target.parts,
        per_layer=target.per_layer,
        stack=target.stack,
    )


def register_role(*roles: Role, lora: bool = False) -> None:
    """Add roles to the table (a family's own tensors), each with the role of an adapter's saved
    copy of it; ``lora=True`` also adds LoRA A/B (and DoRA magnitude) roles for each (linear
    layers).  Registering an existing template again replaces its row in place."""
    for role in roles:
        _TABLE[role.template] = role
        _TABLE[saved_name(role.template)] = _saved_role(role)
        if lora:
            for r in _lora_roles(role):
                _TABLE[r.template] = r
    _SUB_ROLES.clear()
    _STACK_ROLES.clear()
    _order.cache_clear()


register_role(*_BUILTIN)
register_role(*_VISION_ROLES)
register_role(*_PIXTRAL_LLAMA4_ROLES)
register_role(*_DEEPSTACK_ROLES)
register_role(*_POOL_HEAD_ROLES)
register_role(
    *(r for r in _BUILTIN if r.template[len(L) :] in {t + ".weight" for t in LINEAR_TARGETS}), lora=True
)
# the linear layers of a vision tower's own blocks (its layers' are LINEAR_TARGETS above): the
# mergers, adapters and projectors peft's target_modules can name
VISION_LINEAR_TARGETS = (
    *(V + t for t in ("merger.fc1", "merger.fc2", "merger.proj", "merger.gate", "merger.up", "merger.down")),
    *(V + t for t in ("patch_merger", "adapter.fc1", "adapter.fc2", "projector.fc1", "projector.fc2")),
    *(
        V + t
        for t in (
            "shuffle_proj.fc1",
            "shuffle_proj.fc2",
            "pool_head.attn.o",
            "pool_head.fc1",
            "pool_head.fc2",
        )
    ),
    "layers.{i}.deepstack.fc1",
    "layers.{i}.deepstack.fc2",
)
register_role(
    *(
        r
        for r in (*_VISION_ROLES, *_PIXTRAL_LLAMA4_ROLES, *_DEEPSTACK_ROLES, *_POOL_HEAD_ROLES)
        if r.template in {t + ".weight" for t in VISION_LINEAR_TARGETS}
    ),
    lora=True,
)
# block out_gate: the attention output times the sigmoid of its own projection of the input,
# channel by channel, before o_proj (HY-V4's MLA; AFMoE's, whose family predates the block):
# [heads x value head size, hidden], split over TP with the heads.  Last in a layer's canonical
# order, where AFMoE's own row was.
register_role(
    Role(
        L + "attn.gate.weight",
        COLUMN,
        lambda s, lay, i: (_o_cols(s, i), s.hidden_size),
        lambda s, lay, i: s.has_attention(i) and (s.has_block(i, "out_gate") or s.family == "afmoe"),
        per_layer=True,
    )
)


# block head_gate (Step-3.5's g_proj): one sigmoid gate per head, a scalar projection of the layer's
# input, [heads, hidden], split over TP with the heads; Megatron fuses it into linear_qkv (qkv_rule)
register_role(
    Role(
        L + "attn.head_gate.weight",
        COLUMN,
        lambda s, lay, i: (s.attn_heads(i), s.hidden_size),
        lambda s, lay, i: s.has_attention(i) and s.has_block(i, "head_gate") and _split_qkv(s, lay),
        per_layer=True,
    )
)


def roles() -> Iterable[Role]:
    return _TABLE.values()


def role(name: str) -> Role | None:
    """The role of canonical tensor ``name`` (None when no table row covers it); a name in a
    sublayer (``layers.N.sub<k>.<role>``) has the role of ``layers.N.<role>`` copied there, a
    layer's name in a stack (``vision.layers.N.<role>``) the role of ``layers.N.<role>`` asked of
    the stack's spec."""
    template = role_of(name)
    r = _TABLE.get(template)
    stack, inner = split_stack(template)
    if r is None and stack is not None and inner.startswith(L) and inner in _TABLE:
        key = (inner, stack)
        if key not in _STACK_ROLES:
            _STACK_ROLES[key] = attrs.evolve(_TABLE[inner], template=template, stack=stack)
        return _STACK_ROLES[key]
    if r is None and template.startswith(L):
        sub, rest = split_sub(template[len(L) :])
        if sub is not None and L + rest in _TABLE:
            return _sub_role(L + rest, sub)
    return r


def _sub_role(template: str, sub: int) -> Role:
    """Role ``template`` (``layers.{i}.<role>``) copied into sublayer ``sub``."""
    key = (template, sub)
    if key not in _SUB_ROLES:
        _SUB_ROLES[key] = attrs.evolve(_TABLE[template], template=_in_sub(template, sub), sub=sub)
    return _SUB_ROLES[key]


def _in_sub(template: str, sub: int) -> str:
    return f"{L}{SUB}{sub}.{template[len(L) :]}"


def _asks(r: Role, spec: ModelSpec, layout: Layout, layer: int) -> bool:
    """Whether layer role ``r`` is present in ``layer``: asked of the part of the layer its name
    lies in (a sublayer, or the layer's own blocks; see ModelSpec.scoped), of the stack's spec and
    layout for a stack's role (none where the model lacks the stack)."""
    assert r.present is not None
    if r.stack is not None:
        sub = getattr(spec, r.stack, None)
        return sub is not None and r.present(sub, layout.for_stack(r.stack), layer)
    if layer < 0 or not spec.layer_blocks:
        return r.sub is None and r.present(spec, layout, layer)
    if r.sub is not None and r.sub not in spec.sublayers(layer):
        return False
    return r.present(spec.scoped(r.sub), layout, layer)


def split_rule(name: str, spec: ModelSpec | None = None) -> Split | None:
    """The TP rule of canonical tensor ``name``; a role cut part by part gets its parts' sizes
    from ``spec`` (required for such a role)."""
    r = role(name)
    if r is None:
        raise KeyError(f"no tensor-parallel rule for {name!r} (role {role_of(name)!r})")
    if r.parts is not None and r.split is not None:
        if spec is None:
            raise KeyError(f"{name}: its tensor-parallel parts depend on the model; pass its spec")
        return attrs.evolve(r.split, sizes=r.parts(spec.stack_spec(r.stack)))
    return r.split


def tp_of(name: str, layout: Layout) -> int:
    """The tensor-parallel size canonical tensor ``name`` is split over in ``layout``: the expert
    TP size for an expert's, its stack's own for a stack's (a vision tower's), else the TP size."""
    stack, _ = split_stack(name)
    if stack is not None:
        return layout.for_stack(stack).tp
    return layout.expert_tp if expert_of(name) is not None else layout.tp


def _layer_of(name: str) -> int:
    """The layer number of a layer's canonical name (in its stack), -1 for other names."""
    layer, _ = split_layer(split_stack(name)[1])
    return -1 if layer is None else layer


def is_present(spec: ModelSpec, layout: Layout, name: str) -> bool:
    """Whether a model with ``spec`` has canonical tensor ``name`` in its layer (a name no role
    covers, or one a model may or may not carry, counts as present)."""
    r = role(name)
    if r is None or r.present is None:
        return True
    return _asks(r, spec, layout, _layer_of(name))


def expected_shape(
    spec: ModelSpec, layout: Layout, name: str, rank: int | None = None
) -> tuple[int, ...] | None:
    """The full (unsharded) shape ``name`` must have; None when the role is unknown (the verifier
    reports it) or LoRA without a rank.  ``rank``: a LoRA factor's own rank (peft's rank_pattern
    gives targets different ranks), else the spec's."""
    r = role(name)
    if r is None or (r.present is None and spec.lora_rank is None):
        return None
    if r.stack is not None:
        spec, layout = spec.stack_spec(r.stack), layout.for_stack(r.stack)
    if rank is not None and name.endswith((".lora_a.weight", ".lora_b.weight")):
        spec = attrs.evolve(spec, lora_rank=rank)
    if r.per_layer:
        return r.shape(spec, layout, _layer_of(name))
    return r.shape(spec, layout)


def expected_names(spec: ModelSpec, layout: Layout) -> set[str]:
    """Every canonical tensor the spec implies (LoRA aside), for completeness checks."""
    names: set[str] = set()
    experts = range(spec.num_experts)
    for stack in STACKS:  # a stack's layers hold its spec's layer roles (no experts, no sublayers)
        sub = getattr(spec, stack)
        if sub is None:
            continue
        for r in _TABLE.values():
            if r.present is not None and r.template.startswith(L) and not r.per_expert:
                for i in range(sub.num_layers):
                    if r.present(sub, layout.for_stack(stack), i):
                        names.add(f"{stack}.{r.template.format(i=i)}")
    for r in _TABLE.values():
        if r.present is None:
            continue
        if r.stack is not None:
            if _asks(r, spec, layout, -1):
                names.add(r.template)
            continue
        if not r.template.startswith(L):
            if r.present(spec, layout, -1):
                names.add(r.template)
            continue
        for i in range(spec.total_layers):
            for sub in (None, *spec.sublayers(i)):
                here = r if sub is None else _sub_role(r.template, sub)
                if _asks(here, spec, layout, i):
                    if r.per_expert:
                        names.update(here.template.format(i=i, e=e) for e in experts)
                    else:
                        names.add(here.template.format(i=i))
    return names


_TOP = {
    "embed.weight": 0,
    "ple_embed.weight": 0,
    "ple_proj.weight": 0,
    "ple_norm.weight": 0,
    "pos_embed.weight": 0,
    "embed_norm.weight": 0,
    "embed_norm.bias": 0,
    "final_norm.weight": 2,
    "final_norm.bias": 2,
    "lm_head.weight": 3,
    "lm_head.bias": 3,
}


def canonical_order(name: str) -> tuple:
    """Sort key: a stack's tensors first (a vision tower: its patch embedding, layers, merger),
    then the embedding, layers in order (experts in order; the layer's own roles, then each
    sublayer's, each in table order), final norm, lm_head."""
    order = _order()
    stack, inner = split_stack(name)
    if stack is not None:
        layer, rest = split_layer(inner)
        if layer is None:
            after = ".merger." in "." + inner or inner.startswith(_AFTER_TOWER_LAYERS + ("shuffle_proj.",))
            at = 1 << 30 if after else -1
            return (-1 - STACKS.index(stack), at, -1, -1, order.get(role_of(name), len(order)), name)
        return (
            -1 - STACKS.index(stack),
            layer,
            -1,
            -1,
            order.get(role_of(layer_name(layer, rest)), len(order)),
            name,
        )
    layer, rest = split_layer(name)
    if layer is not None:
        sub, rest = split_sub(rest)
        rank = order.get(role_of(layer_name(layer, rest)), len(order))
        expert = expert_of(name)
        return (1, layer, -1 if expert is None else expert, -1 if sub is None else sub, rank, name)
    return (_TOP.get(name, 4), 0, -1, -1, order.get(name, len(order)), name)
