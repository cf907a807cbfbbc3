"""Wave-B families: sparse-attention and frontier MoE models with a transformers 5 class.

Each entry's HF names and config keys were checked against transformers 5's modeling and
configuration files; Megatron names follow MindSpeed-LLM v2's ``configs/checkpoint/model_cfg.json``.
"""

from __future__ import annotations

import re

from ckpt_ir.errors import FormatError, option
from ckpt_ir.families import ConfigKey, Family, register
from ckpt_ir.families.llama import ATTENTION, EMBED_AND_HEAD, GATED_MLP, LLAMA_NORMS, C, L, config_with
from ckpt_ir.families.moe import (
    DEEPSEEK_MOE_CONFIG,
    DEEPSEEK_TENSORS,
    MLA_CONFIG,
    MTP,
    QWEN_EXPERTS,
    QWEN_MOE_CONFIG,
    QWEN_SHARED,
    _deepseek_router,
    _first_k_dense,
    _qwen_router,
)
from ckpt_ir.families.wave_a import HUNYUAN_MOE


def _mlp_dense_layers(cfg: dict) -> tuple[int, ...]:
    """Dense-MLP layers from transformers 5's ``mlp_layer_types`` ("dense" / "sparse"), else
    DeepSeek's first_k_dense_replace / moe_layer_freq rule."""
    types = cfg.get("mlp_layer_types")
    if types is None:
        return _first_k_dense(cfg)
    return tuple(i for i, t in enumerate(types) if t == "dense")


def _shared_index_layers(cfg: dict) -> tuple[int, ...]:
    """Layers whose DSA attention reuses the previous layer's top-k and so has no indexer: the
    ``"shared"`` entries of GLM-5's ``indexer_types``, else its ``index_topk_pattern`` ("F" / "S")
    or ``index_topk_freq`` / ``index_skip_topk_offset`` schedule (transformers' rule); none when
    the config names no schedule (DeepSeek-V3.2: an indexer in every layer)."""
    types = cfg.get("indexer_types")
    if types is None and isinstance(cfg.get("index_topk_pattern"), str):
        types = [{"F": "full", "S": "shared"}[c] for c in cfg["index_topk_pattern"]]
    if types is not None:
        return tuple(i for i, t in enumerate(types) if t == "shared")
    freq, offset = cfg.get("index_topk_freq"), cfg.get("index_skip_topk_offset")
    if not freq or offset is None:
        return ()
    return tuple(i for i in range(cfg["num_hidden_layers"]) if max(i - offset + 1, 0) % max(freq, 1))


# DeepSeek sparse attention: the lightning indexer beside MLA (LayerNorm k_norm with a bias)
INDEXER = tuple(
    (L + f"self_attn.indexer.{t}", C + f"attn.indexer.{t}")
    for t in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
)
DSA_CONFIG = (
    *DEEPSEEK_MOE_CONFIG,
    *MLA_CONFIG,
    ConfigKey("dense_layers", None, _mlp_dense_layers),
    # read-only: transformers saves no MTP weights, so the frontend counts the layers present
    ConfigKey("mtp_layers", None, lambda cfg: cfg.get("num_nextn_predict_layers") or 0),
    ConfigKey("shared_index_layers", None, _shared_index_layers),
)

# DeepSeek-V3.2: DeepSeek-V3 (MLA with q-LoRA, shared experts, score bias, MTP) plus the indexer
register(
    Family(
        name="deepseek_v32",
        model_types=("deepseek_v32",),
        architecture="DeepseekV32ForCausalLM",
        tensors=DEEPSEEK_TENSORS + INDEXER + MTP,
        config=config_with(
            *DSA_CONFIG,
            ConfigKey("index_heads", "index_n_heads", 64),
            ConfigKey("index_head_dim", "index_head_dim", 128),
        ),
        constants=(("router_bias", True),),
        mindspeed_names=("deepseek32",),
        megatron_args=_deepseek_router,
    )
)
# GLM-5: the same MLA + DSA + DeepSeek MoE tensors; "shared" indexer layers carry no indexer
register(
    Family(
        name="glm_moe_dsa",
        model_types=("glm_moe_dsa",),
        architecture="GlmMoeDsaForCausalLM",
        tensors=DEEPSEEK_TENSORS + INDEXER + MTP,
        config=config_with(
            *DSA_CONFIG,
            ConfigKey("index_heads", "index_n_heads", 32),
            ConfigKey("index_head_dim", "index_head_dim", 128),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
        ),
        constants=(("router_bias", True),),
        mindspeed_names=("glm5",),
        megatron_args=_deepseek_router,
    )
)


def _hy_v3_router(cfg: dict) -> dict:
    """Hunyuan V3 routing: sigmoid scores with a score-correction bias, top-k without groups,
    weights renormalised and scaled by router_scaling_factor."""
    return {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_pre_softmax": False,
        "moe_router_topk_scaling_factor": cfg.get("router_scaling_factor"),
    }


def _hy_v3_dense_layers(cfg: dict) -> tuple[int, ...]:
    """mlp_layer_types, else the first ``first_k_dense_replace`` layers (transformers: 1)."""
    if cfg.get("mlp_layer_types") is not None:
        return _mlp_dense_layers(cfg)
    return tuple(range(min(cfg.get("first_k_dense_replace", 1), cfg["num_hidden_layers"])))


# Hunyuan V3 (HYV3): GQA with per-head q/k norms under the usual q_norm / k_norm names (V1 calls
# them query_layernorm / key_layernorm), a router at mlp.router.gate with its score bias at
# mlp.expert_bias, shared experts at mlp.shared_mlp, dense first layers from mlp_layer_types
HY_V3_MOE = (
    (L + "mlp.router.gate.weight", C + "mlp.router.weight"),
    (L + "mlp.expert_bias", C + "mlp.router.bias"),
    *HUNYUAN_MOE[1:],  # experts and shared_mlp as in Hunyuan V1
)
# its multi-token-prediction layers are model.layers.{num_hidden_layers + k} (transformers ignores
# them): a MoE decoder layer plus DeepSeek-V3's enorm / hnorm / eh_proj, the head norm named
# final_layernorm, and no embedding / head copies (MindSpeed-LLM's HYV3 mtp_layers_* entries)
HY_V3_MTP = tuple(
    (L + hf, C + c)
    for hf, c in (
        ("enorm.weight", "mtp.enorm.weight"),
        ("hnorm.weight", "mtp.hnorm.weight"),
        ("eh_proj.weight", "mtp.eh_proj.weight"),
        ("final_layernorm.weight", "mtp.norm.weight"),
    )
)
register(
    Family(
        name="hy_v3",
        model_types=("hy_v3",),
        architecture="HYV3ForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP + HY_V3_MOE + HY_V3_MTP,
        config=config_with(
            ConfigKey("num_experts", "num_experts"),
            ConfigKey("moe_topk", "num_experts_per_tok"),
            ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size"),
            ConfigKey(
                "shared_ffn_hidden_size",
                None,
                lambda cfg: (cfg.get("num_shared_experts") or 0) * cfg["moe_intermediate_size"],
            ),
            ConfigKey("dense_layers", None, _hy_v3_dense_layers),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            # read-only: the release's config has no MTP count; the frontend counts the MTP layers
            # present (a layer holding enorm / hnorm / eh_proj is one)
            ConfigKey("mtp_layers", None, lambda cfg: cfg.get("num_nextn_predict_layers") or 0),
        ),
        constants=(("qk_norm", True), ("router_bias", True)),
        mindspeed_names=("HYV3",),
        megatron_args=_hy_v3_router,
    )
)


def _linear_layers(cfg: dict) -> tuple[int, ...]:
    """Qwen3-Next: the "linear_attention" entries of layer_types, else every layer but each
    full_attention_interval-th (transformers' and MindSpeed-LLM's rule)."""
    types = cfg.get("layer_types")
    if types is not None:
        return tuple(i for i, t in enumerate(types) if t == "linear_attention")
    step = cfg.get("full_attention_interval") or 4
    return tuple(i for i in range(cfg["num_hidden_layers"]) if (i + 1) % step)


# Qwen3-Next: gated-delta-net layers (linear_attn.*) and gated full attention (q_proj yields
# [q; gate] per head) in a Qwen2-MoE block (shared expert with a sigmoid gate)
GATED_DELTA_NET = tuple(
    (L + f"linear_attn.{h}", C + f"attn.gdn.{c}")
    for h, c in (
        ("in_proj_qkvz.weight", "in_qkvz.weight"),
        ("in_proj_ba.weight", "in_ba.weight"),
        ("conv1d.weight", "conv1d.weight"),
        ("A_log", "A_log"),
        ("dt_bias", "dt_bias"),
        ("norm.weight", "norm.weight"),
        ("out_proj.weight", "out.weight"),
    )
)
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
            f"MTP layer {k} cannot be written (pass {option('mtp_layers', 1)} / drop the others)"
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
        + GATED_DELTA_NET
        + QWEN3_NEXT_MTP,
        config=config_with(
            *QWEN_MOE_CONFIG,
            ConfigKey("shared_ffn_hidden_size", "shared_expert_intermediate_size", 0),
            ConfigKey("head_dim", "head_dim", 256),
            ConfigKey("linear_layers", None, _linear_layers),
            ConfigKey("linear_k_heads", "linear_num_key_heads", 16),
            ConfigKey("linear_v_heads", "linear_num_value_heads", 32),
            ConfigKey("linear_k_dim", "linear_key_head_dim", 128),
            ConfigKey("linear_v_dim", "linear_value_head_dim", 128),
            ConfigKey("linear_conv_kernel", "linear_conv_kernel_dim", 4),
        ),
        constants=(("qk_norm", True), ("shared_expert_gate", True), ("attn_gate", True)),
        mindspeed_names=("qwen3-next",),
        megatron_args=_qwen_router,
        hf_rename=_qwen3_next_mtp_keys,
    )
)
