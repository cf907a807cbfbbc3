"""Open-weight families outside MindSpeed-LLM's registry: Gemma 3, OLMo 2, OLMoE, gpt-oss.

Each entry's HF names and config keys were checked against transformers 5's modeling and
configuration files; the Megatron-Core keys and args follow Megatron-Bridge's bridges for
gemma3, olmoe and gpt_oss (OLMo 2 has none there; it takes the post-norm keys of gemma2 / glm4,
from MindSpeed-LLM).  Sliding windows and per-layer-type rope bases are config values carried through the HF
config; the Megatron args name them as megatron-core's ``TransformerConfig`` fields where one
exists (docs/families.md lists the rest).
"""

from __future__ import annotations

from typing import Any

from ckpt_ir.families import ConfigKey, ExpertStack, Family, register
from ckpt_ir.families.llama import (
    ATTENTION,
    EMBED_AND_HEAD,
    GATED_MLP,
    LLAMA_NORMS,
    SANDWICH_NORMS,
    C,
    L,
    config_with,
)
from ckpt_ir.families.moe import QWEN_EXPERTS, _qwen_router

# q/k RMSNorm over the whole projection (OLMo 2, OLMoE): the full-width roles, which Megatron-Bridge's
# OLMoE bridge keeps under the q_layernorm / k_layernorm keys
FULL_QK_NORM = (
    (L + "self_attn.q_norm.weight", C + "attn.q_full_norm.weight"),
    (L + "self_attn.k_norm.weight", C + "attn.k_full_norm.weight"),
)
PROJECTIONS = tuple((h, c) for h, c in ATTENTION if "_proj." in h)


def _rope(cfg: dict[str, Any], layer_type: str) -> float | None:
    """A layer type's rope base: transformers 5 nests rope_parameters per layer type; older
    configs keep rope_theta (global) and rope_local_base_freq (sliding) on top."""
    params = cfg.get("rope_parameters") or {}
    nested = params.get(layer_type) if isinstance(params.get(layer_type), dict) else None
    if nested is not None:
        return nested.get("rope_theta")
    key = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
    return cfg.get(key, params.get("rope_theta"))


def _window_skip_freq(cfg: dict[str, Any]) -> int | list[int] | None:
    """Megatron's window_attn_skip_freq: every N-th layer global (an int), or a 0/1 list per layer
    (1 = sliding) when the pattern is irregular."""
    types = cfg.get("layer_types")
    if not types:
        return cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
    pattern = [int(t == "sliding_attention") for t in types]
    for n in range(1, len(types) + 1):
        if pattern == [int((i + 1) % n != 0) for i in range(len(types))]:
            return n
    return pattern


# Gemma 3: Gemma 2's sandwich norms plus per-head q/k norms; embeddings tied and scaled by
# sqrt(hidden) in the forward (no tensor); sliding-window and global layers with their own rope bases
def _gemma3_args(cfg: dict[str, Any]) -> dict[str, Any]:
    scalar = cfg.get("query_pre_attn_scalar")
    return {
        # HF's window counts the query's own position: Megatron's (left, right) is (window - 1, 0)
        "window_size": [cfg["sliding_window"] - 1, 0] if cfg.get("sliding_window") else None,
        "window_attn_skip_freq": _window_skip_freq(cfg),
        "rotary_base": _rope(cfg, "full_attention"),
        "rotary_base_local": _rope(cfg, "sliding_attention"),
        "softmax_scale": scalar**-0.5 if scalar else None,
        "layernorm_zero_centered_gamma": True,  # Gemma's RMSNorm scales by (1 + weight)
        "apply_embedding_scaling": True,  # embeddings times sqrt(hidden_size)
    }


register(
    Family(
        name="gemma3_text",
        model_types=("gemma3_text",),
        architecture="Gemma3ForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + SANDWICH_NORMS + GATED_MLP,
        config=config_with(
            ConfigKey("head_dim", "head_dim", 256),
            ConfigKey("tied_embeddings", "tie_word_embeddings", True),
            ConfigKey("activation", "hidden_activation", "gelu_pytorch_tanh"),
        ),
        constants=(("qk_norm", True), ("post_norms", True)),
        megatron_args=_gemma3_args,
        # Megatron-Bridge's Gemma 3 layers fold the post norms into the projections before them
        megatron_keys=(
            (
                "decoder.layers.{i}.self_attention.linear_proj.post_layernorm.weight",
                C + "post_attn_norm.weight",
            ),
            ("decoder.layers.{i}.mlp.linear_fc2.post_layernorm.weight", C + "post_mlp_norm.weight"),
        ),
    )
)

# OLMo 2: no pre-norms at all; the norms follow attention and the MLP ("post_attention_layernorm"
# is after attention), q/k norms over the full projection width
OLMO2_NORMS = (
    (L + "post_attention_layernorm.weight", C + "post_attn_norm.weight"),
    (L + "post_feedforward_layernorm.weight", C + "post_mlp_norm.weight"),
)
register(
    Family(
        name="olmo2",
        model_types=("olmo2",),
        architecture="Olmo2ForCausalLM",
        tensors=EMBED_AND_HEAD
        + PROJECTIONS
        + ((L + "self_attn.o_proj.bias", C + "attn.o.bias"),)
        + FULL_QK_NORM
        + OLMO2_NORMS
        + GATED_MLP,
        config=config_with(
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5), ConfigKey("o_bias", "attention_bias", False)
        ),
        constants=(("pre_norms", False), ("post_norms", True), ("qk_full_norm", True)),
        megatron_args=lambda cfg: {"post_norm_only": True},
    )
)

# OLMoE: llama pre-norms, full-width q/k norms, Qwen-MoE-named experts and router (mlp.gate),
# softmax routing over all experts without renormalising the top-k (norm_topk_prob false)
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
        megatron_args=_qwen_router,
    )
)

# gpt-oss: biases on q/k/v/o, on the router and on every expert; a learned softmax offset per head
# ("sinks"); each layer's experts stacked in one tensor per kind, matrices stored [in, out] and
# gate/up interleaved column by column (gate = [..., 0::2], up = [..., 1::2]).  Megatron-Bridge
# de-interleaves fc1 to [gate; up] per expert, as the canonical roles hold it.
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
        "window_attn_skip_freq": _window_skip_freq(cfg),
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
    )
)
