"""Mixture-of-experts decoder families: one table entry each.

On disk, transformers writes one tensor per expert (``...experts.N.gate_proj.weight``); the
canonical names are ``layers.I.mlp.experts.N.{gate,up,down}.weight``, plus ``mlp.router.*``,
``mlp.shared.*`` and ``mlp.shared_gate.weight``.
"""

from __future__ import annotations

from ckpt_ir.families import ConfigKey, Family, register
from ckpt_ir.families.llama import (
    ATTENTION,
    EMBED_AND_HEAD,
    GATED_MLP,
    LLAMA_NORMS,
    C,
    L,
    config_with,
)


def _qwen_dense_layers(cfg: dict) -> tuple[int, ...]:
    """Qwen MoE: layer i is sparse iff not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    step = cfg.get("decoder_sparse_step") or 1
    only = set(cfg.get("mlp_only_layers") or ())
    return tuple(i for i in range(cfg["num_hidden_layers"]) if i in only or (i + 1) % step)


QWEN_EXPERTS = (
    (L + "mlp.gate.weight", C + "mlp.router.weight"),
    (L + "mlp.experts.{e}.gate_proj.weight", C + "mlp.experts.{e}.gate.weight"),
    (L + "mlp.experts.{e}.up_proj.weight", C + "mlp.experts.{e}.up.weight"),
    (L + "mlp.experts.{e}.down_proj.weight", C + "mlp.experts.{e}.down.weight"),
)
QWEN_SHARED = (
    (L + "mlp.shared_expert.gate_proj.weight", C + "mlp.shared.gate.weight"),
    (L + "mlp.shared_expert.up_proj.weight", C + "mlp.shared.up.weight"),
    (L + "mlp.shared_expert.down_proj.weight", C + "mlp.shared.down.weight"),
    (L + "mlp.shared_expert_gate.weight", C + "mlp.shared_gate.weight"),
)
QWEN_MOE_CONFIG = (
    ConfigKey("num_experts", "num_experts", aliases=("num_local_experts",)),
    ConfigKey("moe_topk", "num_experts_per_tok"),
    ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size"),
    ConfigKey("dense_layers", None, _qwen_dense_layers),
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
    )
)


def _qwen_router(cfg: dict) -> dict:
    """Qwen MoE without norm_topk_prob: softmax over all experts, then top-k (not renormalised)."""
    return {"moe_router_pre_softmax": not cfg.get("norm_topk_prob", False)}


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
        megatron_args=_qwen_router,
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
        megatron_args=_qwen_router,
    )
)


def _first_k_dense(cfg: dict) -> tuple[int, ...]:
    """DeepSeek: the first ``first_k_dense_replace`` layers are dense; then every
    ``moe_layer_freq``-th layer is MoE (MTP layers, numbered after the main ones, are MoE)."""
    k, freq = cfg.get("first_k_dense_replace") or 0, cfg.get("moe_layer_freq") or 1
    return tuple(i for i in range(cfg["num_hidden_layers"]) if i < k or (i - k) % freq)


def _shared_ffn(cfg: dict) -> int:
    return (cfg.get("n_shared_experts") or 0) * cfg["moe_intermediate_size"]


MLA_ATTENTION = (
    (L + "input_layernorm.weight", C + "attn_norm.weight"),
    (L + "self_attn.q_proj.weight", C + "attn.q.weight"),
    (L + "self_attn.q_a_proj.weight", C + "attn.q_a.weight"),
    (L + "self_attn.q_a_layernorm.weight", C + "attn.q_a_norm.weight"),
    (L + "self_attn.q_b_proj.weight", C + "attn.q_b.weight"),
    (L + "self_attn.kv_a_proj_with_mqa.weight", C + "attn.kv_a.weight"),
    (L + "self_attn.kv_a_layernorm.weight", C + "attn.kv_a_norm.weight"),
    (L + "self_attn.kv_b_proj.weight", C + "attn.kv_b.weight"),
    (L + "self_attn.o_proj.weight", C + "attn.o.weight"),
)
DEEPSEEK_MOE = (
    (L + "mlp.gate.weight", C + "mlp.router.weight"),
    (L + "mlp.gate.e_score_correction_bias", C + "mlp.router.bias"),
    (L + "mlp.experts.{e}.gate_proj.weight", C + "mlp.experts.{e}.gate.weight"),
    (L + "mlp.experts.{e}.up_proj.weight", C + "mlp.experts.{e}.up.weight"),
    (L + "mlp.experts.{e}.down_proj.weight", C + "mlp.experts.{e}.down.weight"),
    (L + "mlp.shared_experts.gate_proj.weight", C + "mlp.shared.gate.weight"),
    (L + "mlp.shared_experts.up_proj.weight", C + "mlp.shared.up.weight"),
    (L + "mlp.shared_experts.down_proj.weight", C + "mlp.shared.down.weight"),
)
# DeepSeek-V3's multi-token-prediction layers (model.layers.{num_hidden_layers + k}) add these to a
# full decoder layer; embed_tokens and shared_head.head repeat the main embedding and lm_head
MTP = (
    (L + "enorm.weight", C + "mtp.enorm.weight"),
    (L + "hnorm.weight", C + "mtp.hnorm.weight"),
    (L + "eh_proj.weight", C + "mtp.eh_proj.weight"),
    (L + "shared_head.norm.weight", C + "mtp.norm.weight"),
    (L + "shared_head.head.weight", C + "mtp.head.weight"),
    (L + "embed_tokens.weight", C + "mtp.embed.weight"),
)


def _deepseek_router(cfg: dict) -> dict:
    """DeepSeek-V3 routing: sigmoid scores with a score-correction bias, group-limited top-k, scaled."""
    return {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_pre_softmax": False,
        "moe_router_topk_scaling_factor": cfg.get("routed_scaling_factor"),
        "moe_router_num_groups": cfg.get("n_group"),
        "moe_router_group_topk": cfg.get("topk_group"),
    }


def _deepseek_v2_router(cfg: dict) -> dict:
    """DeepSeek-V2 routing: the top-k of a softmax over all experts, not renormalised, scaled by
    ``routed_scaling_factor``; ``group_limited_greedy`` limits it to ``topk_group`` groups ranked
    by their best expert.  megatron-core ranks groups by the sum of their top ``topk / topk_group``
    scores, which is the best score only when ``topk == topk_group`` (where grouping changes
    nothing), so its group-limited routing is the closest Megatron form, not DeepSeek-V2's."""
    grouped = cfg.get("topk_method") == "group_limited_greedy"
    return {
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": True,
        "moe_router_topk_scaling_factor": cfg.get("routed_scaling_factor"),
        "moe_router_num_groups": cfg.get("n_group") if grouped else None,
        "moe_router_group_topk": cfg.get("topk_group") if grouped else None,
    }


MLA_CONFIG = (
    ConfigKey("q_lora_rank", "q_lora_rank", 0, null=0),
    ConfigKey("kv_lora_rank", "kv_lora_rank"),
    ConfigKey("qk_nope_dim", "qk_nope_head_dim"),
    ConfigKey("qk_rope_dim", "qk_rope_head_dim"),
    ConfigKey("v_head_dim", "v_head_dim"),
    ConfigKey("head_dim", None, lambda cfg: cfg["qk_rope_head_dim"]),
    ConfigKey("qkv_bias", None, False),
)
DEEPSEEK_MOE_CONFIG = (
    ConfigKey("num_experts", "n_routed_experts"),
    ConfigKey("moe_topk", "num_experts_per_tok"),
    ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size"),
    ConfigKey("shared_ffn_hidden_size", None, _shared_ffn),
    ConfigKey("dense_layers", None, _first_k_dense),
)
DEEPSEEK_TENSORS = EMBED_AND_HEAD + MLA_ATTENTION + LLAMA_NORMS + GATED_MLP + DEEPSEEK_MOE

register(
    Family(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        architecture="DeepseekV3ForCausalLM",
        tensors=DEEPSEEK_TENSORS + MTP,
        config=config_with(
            *DEEPSEEK_MOE_CONFIG,
            *MLA_CONFIG,
            # read-only: transformers saves no MTP weights, so the frontend counts the layers present
            ConfigKey("mtp_layers", None, lambda cfg: cfg.get("num_nextn_predict_layers") or 0),
        ),
        constants=(("router_bias", True),),
        mindspeed_names=("deepseek3",),
        megatron_args=_deepseek_router,
    )
)
