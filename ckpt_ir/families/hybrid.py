"""Hybrid-attention families, whose layers mix attention kinds (qwen3_next, qwen3_5, qwen3_5_moe:
gated-delta-net linear-attention layers between gated full-attention layers; olmo_hybrid:
gated-delta-net layers between OLMo 2's post-norm attention layers).  One table entry each, built
from the fragments in ``blocks.py``.

Each entry's HF names and config keys were checked against transformers 5's modeling and
configuration files; Megatron names follow MindSpeed-LLM v2's ``configs/checkpoint/model_cfg.json``
(qwen3-next) and megatron-core's GatedDeltaNet (``ssm/gated_delta_net.py``; Megatron-Bridge's
``qwen3_next_bridge.py`` / ``qwen35_bridge.py``), chosen by ``--gdn-keys``.
"""

from __future__ import annotations

import re

from ckpt_ir.errors import FormatError, setting
from ckpt_ir.families import ConfigKey, Family, Joined, Packed, Tested, register
from ckpt_ir.families.blocks import (
    ATTENTION,
    EMBED_AND_HEAD,
    FULL_QK_NORM,
    GATED_MLP,
    LLAMA_NORMS,
    O_BIAS,
    PROJECTIONS,
    QWEN_EXPERTS,
    QWEN_MOE_CONFIG,
    QWEN_SHARED,
    C,
    L,
    config_with,
    qwen_router_args,
    rope_parameters,
)


def _linear_layers(cfg: dict) -> tuple[int, ...]:
    """Qwen3-Next: the "linear_attention" entries of layer_types, else every layer but each
    full_attention_interval-th (transformers' and MindSpeed-LLM's rule)."""
    types = cfg.get("layer_types")
    if types is not None:
        return tuple(i for i, t in enumerate(types) if t == "linear_attention")
    step = cfg.get("full_attention_interval") or 4
    return tuple(i for i in range(cfg["num_hidden_layers"]) if (i + 1) % step)


# Gated-delta-net layers (linear_attn.*) beside gated full attention (q_proj yields [q; gate] per
# head).  The projections q / k / v / z (output gate) / b (beta) / a (alpha) are canonical tensors of
# their own: Qwen3-Next packs them per key head (in_proj_qkvz [q_g; k_g; v_g; z_g], in_proj_ba
# [b_g; a_g]: transformers' modeling_qwen3_next.py fix_query_key_value_ordering), Qwen3.5 stores
# in_proj_qkv flat [q; k; v] and z / b / a apart (modeling_qwen3_5.py); the norm is a plain
# (ones-initialised) RMSNorm over one head's values, the other norms are zero-centred (1 + w)
GDN_TENSORS = tuple(
    (L + f"linear_attn.{h}", C + f"attn.gdn.{c}")
    for h, c in (
        ("conv1d.weight", "conv1d.weight"),
        ("A_log", "A_log"),
        ("dt_bias", "dt_bias"),
        ("norm.weight", "norm.weight"),
        ("out_proj.weight", "out.weight"),
    )
)


def _gdn(parts: str) -> tuple[str, ...]:
    """The canonical templates of gated-delta-net projections ``parts`` (e.g. "qkvz")."""
    return tuple(f"{C}attn.gdn.{p}.weight" for p in parts)


QWEN3_NEXT_GDN = (
    Packed(
        L + "linear_attn.in_proj_qkvz.weight",
        _gdn("qkvz"),
        ("linear_qk_size", "linear_qk_size", "linear_v_size", "linear_v_size"),
        groups="linear_k_heads",
    ),
    Packed(
        L + "linear_attn.in_proj_ba.weight",
        _gdn("ba"),
        ("linear_v_heads", "linear_v_heads"),
        groups="linear_k_heads",
    ),
)
QWEN3_5_GDN = (
    Packed(
        L + "linear_attn.in_proj_qkv.weight",
        _gdn("qkv"),
        ("linear_qk_size", "linear_qk_size", "linear_v_size"),
    ),
)
QWEN3_5_GDN_TENSORS = GDN_TENSORS + tuple((L + f"linear_attn.in_proj_{p}.weight", _gdn(p)[0]) for p in "zba")
GDN_CONFIG = (
    ConfigKey("head_dim", "head_dim", 256),
    ConfigKey("linear_layers", None, _linear_layers),
    ConfigKey("linear_k_heads", "linear_num_key_heads", 16),
    ConfigKey("linear_v_heads", "linear_num_value_heads", 32),
    ConfigKey("linear_k_dim", "linear_key_head_dim", 128),
    ConfigKey("linear_v_dim", "linear_value_head_dim", 128),
    ConfigKey("linear_conv_kernel", "linear_conv_kernel_dim", 4),
)
# gated attention, and every norm zero-centred but the gated-delta-net's (megatron-core's
# apply_layernorm_1p; its out_norm holds the HF norm - 1)
GATED_ATTENTION = (("qk_norm", True), ("attn_gate", True), ("zero_centred_norms", True))
MCORE_MISSING = "no: gated-delta-net layers need flash-linear-attention (Triton)"
# Qwen3-Next's multi-token-prediction layer sits outside model.layers (transformers ignores
# ^mtp.*; MindSpeed-LLM's qwen3-next entry and its mtp_reorder_flag): its decoder layer is
# mtp.layers.{k}.* (a full-attention MoE layer), and DeepSeek-V3's enorm / hnorm / eh_proj / head
# norm are the un-numbered mtp.pre_fc_norm_embedding / pre_fc_norm_hidden / fc / norm, with no
# embedding or head copies.  Renamed to model.layers.{num_hidden_layers + k}.* (own tensors under
# model.layers.{n}.mtp.*) so the table below reads them like any layer.
QWEN3_NEXT_MTP = tuple(
    (L + "mtp." + hf, C + c)
    for hf, c in (
        ("pre_fc_norm_embedding.weight", "mtp.enorm.weight"),
        ("pre_fc_norm_hidden.weight", "mtp.hnorm.weight"),
        ("fc.weight", "mtp.eh_proj.weight"),
        ("norm.weight", "mtp.norm.weight"),
    )
)
_MTP_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
_MTP_OWN = re.compile(r"^mtp\.(pre_fc_norm_embedding|pre_fc_norm_hidden|fc|norm)\.weight$")
_TABLE_MTP = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _qwen3_next_mtp_keys(key: str, num_layers: int, to_hf: bool) -> str:
    """mtp.layers.k.X <-> model.layers.{num_layers + k}.X; mtp.fc.weight etc. <->
    model.layers.{num_layers}.mtp.fc.weight (un-numbered: one MTP layer, as released)."""
    if not to_hf:
        if m := _MTP_LAYER.match(key):
            return f"model.layers.{num_layers + int(m.group(1))}.{m.group(2)}"
        return f"model.layers.{num_layers}.{key}" if _MTP_OWN.match(key) else key
    m = _TABLE_MTP.match(key)
    if not m or int(m.group(1)) < num_layers:
        return key
    k, rest = int(m.group(1)) - num_layers, m.group(2)
    if not rest.startswith("mtp."):
        return f"mtp.layers.{k}.{rest}"
    if k:
        raise FormatError(
            f"{key}: Qwen3-Next's HF layout names one MTP layer's fc / norms without a number; "
            f"MTP layer {k} cannot be written (pass {setting('mtp_layers', 1)} / drop the others)"
        )
    return rest


register(
    Family(
        name="qwen3_next",
        model_types=("qwen3_next",),
        architecture="Qwen3NextForCausalLM",
        tensors=EMBED_AND_HEAD
        + ATTENTION
        + LLAMA_NORMS
        + GATED_MLP
        + QWEN_EXPERTS
        + QWEN_SHARED
        + GDN_TENSORS
        + QWEN3_NEXT_MTP,
        packed=QWEN3_NEXT_GDN,
        config=config_with(
            *QWEN_MOE_CONFIG,
            ConfigKey("shared_ffn_hidden_size", "shared_expert_intermediate_size", 0),
            *GDN_CONFIG,
        ),
        constants=(*GATED_ATTENTION, ("shared_expert_gate", True)),
        mindspeed_names=("qwen3-next",),
        megatron_args=qwen_router_args,
        hf_rename=_qwen3_next_mtp_keys,
        tested=Tested(
            round_trip=(
                "--ep 2 --moe-grouped-gemm",
                "--pp 2 --num-layer-list 3,1",
                "--tp 2 --pp 2 --num-layer-list 3,1",
                "--tp 2 --pp 2 --ep 2 --num-layer-list 3,1",
                "--ckpt-format torch_dist",
            ),
            mcore_missing=MCORE_MISSING,
            mindspeed=(
                ("qwen3-next-mtp-ep2-grouped", "identical"),
                ("qwen3-next-mtp-pp2-layers", "identical"),
            ),
        ),
    )
)
# Qwen3.5 (text; the released checkpoints are the vision-language model, whose language model is
# under model.language_model.*): Qwen3-Next's blocks with the flat GDN projections, a dense MLP
# (Qwen3_5ForCausalLM) or a Qwen MoE whose router renormalises the top-k (Qwen3_5MoeForCausalLM);
# no MindSpeed-LLM form, so megatron-core's modules (Megatron-Bridge's qwen35_bridge.py)
register(
    Family(
        name="qwen3_5",
        model_types=("qwen3_5_text",),
        architecture="Qwen3_5ForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP + QWEN3_5_GDN_TENSORS + QWEN3_NEXT_MTP,
        packed=QWEN3_5_GDN,
        config=config_with(*GDN_CONFIG),
        constants=GATED_ATTENTION,
        hf_rename=_qwen3_next_mtp_keys,  # its MTP layer as Qwen3-Next's (qwen35_bridge.py)
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 3,1", "--ckpt-format torch_dist"),
            mcore_missing=MCORE_MISSING,
        ),
    )
)
register(
    Family(
        name="qwen3_5_moe",
        model_types=("qwen3_5_moe_text",),
        architecture="Qwen3_5MoeForCausalLM",
        tensors=EMBED_AND_HEAD
        + ATTENTION
        + LLAMA_NORMS
        + QWEN_EXPERTS
        + QWEN_SHARED
        + QWEN3_5_GDN_TENSORS
        + QWEN3_NEXT_MTP,
        packed=QWEN3_5_GDN,
        hf_rename=_qwen3_next_mtp_keys,
        # every layer MoE: no dense MLP, intermediate_size null (not read, not written)
        config=tuple(
            k
            for k in config_with(
                *QWEN_MOE_CONFIG,
                ConfigKey("shared_ffn_hidden_size", "shared_expert_intermediate_size", 0),
                *GDN_CONFIG,
            )
            if k.field != "ffn_hidden_size"
        ),
        constants=(*GATED_ATTENTION, ("shared_expert_gate", True)),
        megatron_args=lambda cfg: {"moe_router_pre_softmax": False},
        tested=Tested(
            round_trip=("--tp 2 --ep 2 --moe-grouped-gemm", "--pp 2 --ep 2 --num-layer-list 1,3"),
            mcore_missing=MCORE_MISSING,
        ),
    )
)


# OLMo-Hybrid (transformers' modeling_olmo_hybrid.py): layer_types picks, per layer, a gated-delta-net
# layer (an input norm, the mixer, a pre-MLP norm, the MLP: blocks gdn, mlp) or OLMo 2's attention
# layer, whose norms follow attention and the MLP (blocks attention, mlp, post_norms; q / k norms
# over the whole projection).  The mixer's projections are apart (q, k, v, g = the output gate z,
# b, a) and its conv is three tensors, q_conv1d / k_conv1d / v_conv1d, which transformers joins
# into one conv1d [q; k; v] on load and cuts into three torch.chunk pieces on save (not K / K / V:
# docs/reference/composed-blocks.md §1.2): read whatever the cut, written as transformers cuts it.
# On disk the norms are attention_layer_norm (the input norm) and feedforward_layer_norm, the
# pre-MLP norm of a gated-delta-net layer and the post-attention norm of an attention layer; the
# mixer's o_norm is a plain RMSNorm like every other norm (not zero-centred)
def _olmo_hybrid_layers(cfg: dict) -> tuple[tuple[str, ...], ...]:
    """Each layer's blocks from layer_types, else transformers' default (every fourth layer full
    attention, the last one when that leaves none)."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)]
        types[-1] = types[-1] if "full_attention" in types else "full_attention"
    kinds = {"linear_attention": ("gdn", "mlp"), "full_attention": ("attention", "mlp", "post_norms")}
    if len(types) != n or any(t not in kinds for t in types):
        raise FormatError(
            f"config.json: layer_types must list linear_attention or full_attention for each of the {n} "
            f"layers, got {types}"
        )
    return tuple(kinds[t] for t in types)


def _olmo_hybrid_k_dim(cfg: dict) -> int:
    return int(0.75 * cfg["hidden_size"] / (cfg.get("linear_num_key_heads") or cfg["num_attention_heads"]))


OLMO_GDN = "model.layers.{i}.linear_attn."
register(
    Family(
        name="olmo_hybrid",
        model_types=("olmo_hybrid",),
        architecture="OlmoHybridForCausalLM",
        tensors=EMBED_AND_HEAD
        + PROJECTIONS
        + O_BIAS
        + FULL_QK_NORM
        + GATED_MLP
        + (
            (L + "attention_layer_norm.weight", C + "attn_norm.weight"),
            # the first of the two a layer has: gated-delta-net layers, attention layers
            (L + "feedforward_layer_norm.weight", C + "mlp_norm.weight"),
            (L + "feedforward_layer_norm.weight", C + "post_attn_norm.weight"),
            (L + "post_feedforward_layernorm.weight", C + "post_mlp_norm.weight"),
            *((OLMO_GDN + f"{p}_proj.weight", _gdn(c)[0]) for p, c in zip("qkvgba", "qkvzba")),
            (OLMO_GDN + "A_log", C + "attn.gdn.A_log"),
            (OLMO_GDN + "dt_bias", C + "attn.gdn.dt_bias"),
            (OLMO_GDN + "o_norm.weight", C + "attn.gdn.norm.weight"),
            (OLMO_GDN + "o_proj.weight", C + "attn.gdn.out.weight"),
        ),
        joined=(
            Joined(
                C + "attn.gdn.conv1d.weight", tuple(OLMO_GDN + f"{p}_conv1d.weight" for p in "qkv"), dim=0
            ),
        ),
        config=config_with(
            ConfigKey("norm_eps", "rms_norm_eps", 1e-6),
            ConfigKey("o_bias", "attention_bias", False),
            # no head_dim in OlmoHybridConfig (its attention reads one if the config has it)
            ConfigKey(
                "head_dim",
                None,
                lambda cfg: cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            ),
            ConfigKey("layer_blocks", None, _olmo_hybrid_layers),
            ConfigKey("linear_k_heads", "linear_num_key_heads", lambda cfg: cfg["num_attention_heads"]),
            ConfigKey("linear_v_heads", "linear_num_value_heads", lambda cfg: cfg["num_attention_heads"]),
            ConfigKey("linear_k_dim", "linear_key_head_dim", _olmo_hybrid_k_dim),
            ConfigKey("linear_v_dim", "linear_value_head_dim", lambda cfg: 2 * _olmo_hybrid_k_dim(cfg)),
            ConfigKey("linear_conv_kernel", "linear_conv_kernel_dim", 4),
        ),
        constants=(("qk_full_norm", True),),
        # released checkpoints have no rotary embedding (rope_parameters null): NoPE
        megatron_args=lambda cfg: (
            {} if rope_parameters(cfg).get("rope_theta") else {"position_embedding_type": "none"}
        ),
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 3,1", "--ckpt-format torch_dist"),
            mcore_missing=(
                "no: post-norm-only attention layers, and megatron-core's GatedDeltaNet has no "
                "linear_allow_neg_eigval (beta = 2 sigmoid) and needs flash-linear-attention"
            ),
        ),
    )
)
