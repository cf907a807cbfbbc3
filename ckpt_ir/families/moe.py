"""Mixture-of-experts decoder families with grouped- or multi-head attention (mixtral, qwen2_moe,
qwen3_moe, glm4_moe, hunyuan_v1_moe, phimoe, minimax_m2, hy_v3, olmoe, gpt_oss).  One table entry
each, built from the fragments in ``blocks.py``; the MoE families with multi-latent attention are
in ``mla.py``.

On disk, transformers writes one tensor per expert (``...experts.N.gate_proj.weight``) except for
gpt-oss, whose experts are stacked per layer (:class:`ExpertStack`); the canonical names are
``layers.I.mlp.experts.N.{gate,up,down}.weight``, plus ``mlp.router.*``, ``mlp.shared.*`` and
``mlp.shared_gate.weight``.  Each entry's HF names and config keys were checked against
transformers 5's modeling and configuration files; Megatron names follow MindSpeed-LLM v2's
``configs/checkpoint/model_cfg.json``, or Megatron-Bridge's bridge where MindSpeed-LLM lacks the
family (olmoe, gpt_oss).
"""

from __future__ import annotations

from typing import Any

from ckpt_ir.families import ConfigKey, ExpertStack, Family, Tested, register
from ckpt_ir.families.blocks import (
    ATTENTION,
    DEEPSEEK_MOE,
    DEEPSEEK_MOE_CONFIG,
    EMBED_AND_HEAD,
    FULL_QK_NORM,
    GATED_MLP,
    HUNYUAN_ATTENTION,
    LLAMA_NORMS,
    MTP,
    PROJECTIONS,
    QWEN_EXPERTS,
    QWEN_MOE_CONFIG,
    QWEN_SHARED,
    C,
    L,
    config_with,
    deepseek_router_args,
    mlp_dense_layers,
    qwen_router_args,
    window_skip_freq,
)

MIXTRAL_MOE = (
    (L + "block_sparse_moe.gate.weight", C + "mlp.router.weight"),
    (L + "block_sparse_moe.experts.{e}.w1.weight", C + "mlp.experts.{e}.gate.weight"),
    (L + "block_sparse_moe.experts.{e}.w3.weight", C + "mlp.experts.{e}.up.weight"),
    (L + "block_sparse_moe.experts.{e}.w2.weight", C + "mlp.experts.{e}.down.weight"),
)

register(
    Family(
        name="mixtral",
        model_types=("mixtral",),
        architecture="MixtralForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + MIXTRAL_MOE,
        config=config_with(
            ConfigKey("qkv_bias", None, False),
            ConfigKey("num_experts", "num_local_experts"),
            ConfigKey("moe_topk", "num_experts_per_tok"),
            ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
        ),
        mindspeed_names=("mixtral",),
        tested=Tested(
            round_trip=("random (20 pairs): --tp 1/2 --pp 1/2 --ep 1/2/4 [--etp 1] [--moe-grouped-gemm]",),
            mcore_logits=(
                "--ep 2",
                "--ep 4",
                "--tp 2",
                "--ep 2 --moe-grouped-gemm",
                "--pp 2 --ep 2",
                "--tp 2 --ep 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--pp 2 --ep 2 --vpp-layers 1",
                "--tp 2 --ep 2 --etp 1",
                "--tp 2 --ep 4 --etp 1",
                "--tp 2 --pp 2 --ep 2 --etp 1",
            ),
        ),
    )
)
register(
    Family(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        architecture="Qwen2MoeForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP + QWEN_EXPERTS + QWEN_SHARED,
        config=config_with(
            *QWEN_MOE_CONFIG, ConfigKey("shared_ffn_hidden_size", "shared_expert_intermediate_size", 0)
        ),
        constants=(("qkv_bias", True), ("shared_expert_gate", True)),
        mindspeed_names=("qwen2-moe",),
        megatron_args=qwen_router_args,
        tested=Tested(
            round_trip=("random (20 pairs): --tp 1/2 --pp 1/2 --ep 1/2/4 [--etp 1] [--moe-grouped-gemm]",),
            mcore_logits=(
                "--ep 2",
                "--pp 2 --ep 2",
                "--tp 2 --ep 2",
                "--tp 2 --ep 2 --etp 1 --moe-grouped-gemm",
            ),
        ),
    )
)
register(
    Family(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        architecture="Qwen3MoeForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP + QWEN_EXPERTS,
        config=config_with(*QWEN_MOE_CONFIG),
        constants=(("qk_norm", True),),
        mindspeed_names=("qwen3-moe",),
        megatron_args=qwen_router_args,
        tested=Tested(
            round_trip=("random (20 pairs): --tp 1/2 --pp 1/2 --ep 1/2/4 [--etp 1] [--moe-grouped-gemm]",),
            mcore_logits=(
                "--ep 2",
                "--tp 2 --moe-grouped-gemm",
                "--tp 2 --ep 2",
                "--tp 2 --ep 2 --etp 1 --moe-grouped-gemm",
            ),
        ),
    )
)

# GLM-4.5 / 4.5-Air: grouped-query attention (optional q/k norm, qkv bias, partial rotary) with
# DeepSeek-V3's MoE block (first dense layers, shared experts, router score bias) and MTP layers
register(
    Family(
        name="glm4_moe",
        model_types=("glm4_moe",),
        architecture="Glm4MoeForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP + DEEPSEEK_MOE + MTP,
        config=config_with(
            *DEEPSEEK_MOE_CONFIG,
            ConfigKey("qk_norm", "use_qk_norm", False),
            ConfigKey("mtp_layers", None, lambda cfg: cfg.get("num_nextn_predict_layers") or 0),
        ),
        constants=(("router_bias", True),),
        mindspeed_names=("glm45-moe", "glm45", "glm45-air"),
        megatron_args=deepseek_router_args,  # sigmoid scores + score bias, group-limited top-k, scaled
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_logits=(
                "--pp 2 --ep 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mindspeed=(
                ("glm45-tp2ep2-grouped", "identical"),
                ("glm45-tp2pp2", "identical"),
            ),
        ),
    )
)

# Hunyuan V1 MoE: Hunyuan's q/k norms; the MoE layer has one shared MLP as wide as the experts and
# a router named gate.wg
HUNYUAN_MOE = (
    (L + "mlp.gate.wg.weight", C + "mlp.router.weight"),
    (L + "mlp.experts.{e}.gate_proj.weight", C + "mlp.experts.{e}.gate.weight"),
    (L + "mlp.experts.{e}.up_proj.weight", C + "mlp.experts.{e}.up.weight"),
    (L + "mlp.experts.{e}.down_proj.weight", C + "mlp.experts.{e}.down.weight"),
    (L + "mlp.shared_mlp.gate_proj.weight", C + "mlp.shared.gate.weight"),
    (L + "mlp.shared_mlp.up_proj.weight", C + "mlp.shared.up.weight"),
    (L + "mlp.shared_mlp.down_proj.weight", C + "mlp.shared.down.weight"),
)


def _hunyuan_topk(cfg: dict) -> int:
    """moe_topk may be one value per layer; shapes do not depend on it, the list rides along."""
    topk = cfg.get("moe_topk", 1)
    return max(topk) if isinstance(topk, list) else topk


register(
    Family(
        name="hunyuan_v1_moe",
        model_types=("hunyuan_v1_moe",),
        architecture="HunYuanMoEV1ForCausalLM",
        tensors=EMBED_AND_HEAD + HUNYUAN_ATTENTION + LLAMA_NORMS + HUNYUAN_MOE,
        config=config_with(
            ConfigKey("num_experts", "num_experts"),
            ConfigKey("moe_topk", None, _hunyuan_topk),
            ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
            ConfigKey("shared_ffn_hidden_size", "intermediate_size"),
        ),
        constants=(("qk_norm", True),),
        mindspeed_names=("hunyuan",),
        fp32_in_transformers=("mlp.gate.wg.weight",),  # nn.Linear(..., dtype=torch.float32)
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_missing="no: q/k norm after rotary",
        ),
    )
)

# PhiMoE (Phi-3.5-MoE): LayerNorm with biases everywhere, biases on q/k/v and o_proj, optional
# lm_head bias, Mixtral's block_sparse_moe experts.  (MindSpeed-LLM's phi3.5-moe converter is reported to drop
# the norm, o_proj and lm_head biases; they are carried here.)
PHIMOE_BIASES = (
    (L + "input_layernorm.bias", C + "attn_norm.bias"),
    (L + "post_attention_layernorm.bias", C + "mlp_norm.bias"),
    (L + "self_attn.o_proj.bias", C + "attn.o.bias"),
    ("model.norm.bias", "final_norm.bias"),
    ("lm_head.bias", "lm_head.bias"),
)
register(
    Family(
        name="phimoe",
        model_types=("phimoe",),
        architecture="PhimoeForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + PHIMOE_BIASES + MIXTRAL_MOE,
        config=config_with(
            ConfigKey("num_experts", "num_local_experts"),
            ConfigKey("moe_topk", "num_experts_per_tok"),
            ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("o_bias", "attention_bias", False),
            ConfigKey("lm_head_bias", "lm_head_bias", False),
        ),
        constants=(("norm_bias", True),),
        mindspeed_names=("phi3.5-moe",),
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm --norm-names te",
            ),
            mcore_missing="no: sparsemixer routing; o bias without MLP biases",
            mindspeed=(
                (
                    "phi3.5-moe-tp2ep2-grouped",
                    "differs: MindSpeed drops the LayerNorm, o_proj and lm_head biases",
                ),
                ("phi3.5-moe-tp2pp2", "differs: MindSpeed drops the LayerNorm, o_proj and lm_head biases"),
            ),
        ),
    )
)

# MiniMax-M2: q/k RMSNorm over the full projection width (q_norm [heads*head_dim], k_norm
# [kv_heads*head_dim]), Mixtral-named experts, sigmoid router with a score-correction bias
MINIMAX_ATTENTION = tuple((h, c) for h, c in ATTENTION if "_norm." not in h) + (
    (L + "self_attn.q_norm.weight", C + "attn.q_full_norm.weight"),
    (L + "self_attn.k_norm.weight", C + "attn.k_full_norm.weight"),
)
register(
    Family(
        name="minimax_m2",
        model_types=("minimax_m2",),
        architecture="MiniMaxM2ForCausalLM",
        tensors=EMBED_AND_HEAD
        + MINIMAX_ATTENTION
        + LLAMA_NORMS
        + MIXTRAL_MOE
        + ((L + "block_sparse_moe.e_score_correction_bias", C + "mlp.router.bias"),),
        config=config_with(
            ConfigKey("num_experts", "num_local_experts"),
            ConfigKey("moe_topk", "num_experts_per_tok"),
            ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
            ConfigKey("qkv_bias", None, False),
        ),
        constants=(("qk_full_norm", True), ("router_bias", True)),
        mindspeed_names=("minimax_m2",),
        megatron_args=deepseek_router_args,  # sigmoid scores with a score-correction bias
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_missing="no: full-width q/k norm (Megatron-Bridge's own module)",
            mindspeed=(
                ("minimax_m2-tp2ep2-grouped", "identical"),
                ("minimax_m2-tp2pp2", "identical"),
            ),
        ),
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
        return mlp_dense_layers(cfg)
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
        tested=Tested(
            round_trip=(
                "--tp 2 --ep 2",
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--tp 2 --pp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_logits=(
                "--pp 2 --ep 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mindspeed=(
                ("HYV3-mtp-tp2ep2", "identical"),
                ("HYV3-mtp-tp2pp2ep2-grouped", "identical"),
            ),
        ),
    )
)

# OLMoE: llama pre-norms, full-width q/k norms (kept under q_layernorm / k_layernorm by
# Megatron-Bridge's OLMoE bridge), Qwen-MoE-named experts and router (mlp.gate), softmax routing
# over all experts without renormalising the top-k (norm_topk_prob false)
register(
    Family(
        name="olmoe",
        model_types=("olmoe",),
        architecture="OlmoeForCausalLM",
        tensors=EMBED_AND_HEAD
        + ((L + "input_layernorm.weight", C + "attn_norm.weight"),)
        + PROJECTIONS
        + FULL_QK_NORM
        + LLAMA_NORMS
        + QWEN_EXPERTS,
        config=config_with(
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("num_experts", "num_experts"),
            ConfigKey("moe_topk", "num_experts_per_tok"),
            ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
        ),
        constants=(("qk_full_norm", True),),
        megatron_args=qwen_router_args,
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_missing="no: full-width q/k norm (Megatron-Bridge's OLMoESelfAttention)",
        ),
    )
)

# gpt-oss: biases on q/k/v/o, on the router and on every expert; a learned softmax offset per head
# ("sinks"); each layer's experts stacked in one tensor per kind, matrices stored [in, out] and
# gate/up interleaved column by column (gate = [..., 0::2], up = [..., 1::2]).  Megatron-Bridge
# de-interleaves fc1 to [gate; up] per expert, as the canonical roles hold it; the sliding window
# and rope settings are config values, named in the args as megatron-core's TransformerConfig fields.
GPT_OSS_TENSORS = (
    EMBED_AND_HEAD
    + ((L + "input_layernorm.weight", C + "attn_norm.weight"),)
    + PROJECTIONS
    + (
        (L + "self_attn.o_proj.bias", C + "attn.o.bias"),
        (L + "self_attn.sinks", C + "attn.sinks"),
    )
    + LLAMA_NORMS
    + (
        (L + "mlp.router.weight", C + "mlp.router.weight"),
        (L + "mlp.router.bias", C + "mlp.router.logit_bias"),
    )
)
EXPERT = C + "mlp.experts.{e}."
GPT_OSS_EXPERTS = (
    ExpertStack(L + "mlp.experts.gate_up_proj", (EXPERT + "gate.weight", EXPERT + "up.weight"), True, True),
    ExpertStack(
        L + "mlp.experts.gate_up_proj_bias", (EXPERT + "gate.bias", EXPERT + "up.bias"), interleaved=True
    ),
    ExpertStack(L + "mlp.experts.down_proj", (EXPERT + "down.weight",), transposed=True),
    ExpertStack(L + "mlp.experts.down_proj_bias", (EXPERT + "down.bias",)),
)


def _gpt_oss_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """Megatron-Bridge's GPT-OSS provider settings, as TransformerConfig field names."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    yarn = rope.get("rope_type", rope.get("type")) == "yarn"
    window = cfg.get("sliding_window")
    return {
        "add_bias_linear": True,
        "softmax_type": "learnable",
        "window_size": [window - 1, 0] if window else None,
        "window_attn_skip_freq": window_skip_freq(cfg),
        "swiglu": False,
        "quick_geglu": True,  # (up + 1) * gate * sigmoid(1.702 gate), both clamped
        "glu_linear_offset": 1.0,
        "activation_func_clamp_value": cfg.get("swiglu_limit"),
        "moe_router_pre_softmax": False,
        "moe_router_load_balancing_type": "none",
        "rotary_base": rope.get("rope_theta", cfg.get("rope_theta")),
        **(
            {
                "position_embedding_type": "yarn",
                "yarn_rotary_scaling_factor": rope.get("factor"),
                "yarn_original_max_position_embeddings": rope.get("original_max_position_embeddings"),
                "yarn_beta_fast": rope.get("beta_fast"),
                "yarn_beta_slow": rope.get("beta_slow"),
                "yarn_correction_range_round_to_int": bool(rope.get("truncate", True)),
            }
            if yarn
            else {}
        ),
    }


register(
    Family(
        name="gpt_oss",
        model_types=("gpt_oss",),
        architecture="GptOssForCausalLM",
        tensors=GPT_OSS_TENSORS,
        stacked=GPT_OSS_EXPERTS,
        config=config_with(
            ConfigKey("head_dim", "head_dim", 64),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("qkv_bias", "attention_bias", True),
            ConfigKey("o_bias", "attention_bias", True),
            ConfigKey("num_experts", "num_local_experts"),
            ConfigKey("moe_topk", "num_experts_per_tok"),
            ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
        ),
        constants=(("attn_sinks", True), ("router_logit_bias", True), ("expert_bias", True)),
        megatron_args=_gpt_oss_args,
        tested=Tested(
            round_trip=(
                "--ckpt-format torch_dist",
                "--tp 2 --ep 2 --etp 1",
                "--tp 2 --pp 2 --etp 1",
            ),
            mcore_logits=(
                "--pp 2 --ep 2",
                "--tp 2 --ep 2 --etp 1",
                "--tp 2 --pp 2 --etp 1",
            ),
        ),
    )
)
