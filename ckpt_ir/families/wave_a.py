"""Families of MindSpeed-LLM's registry that reuse the llama / MoE vocabulary: one entry each.

Each entry's HF names and config keys were checked against transformers 5's modeling and
configuration files; the differences from its base family are noted beside it.
"""

from __future__ import annotations

from ckpt_ir.families import ConfigKey, Family, Packed, register
from ckpt_ir.families.llama import ATTENTION, EMBED_AND_HEAD, GATED_MLP, LLAMA_NORMS, C, L, config_with
from ckpt_ir.families.moe import (
    DEEPSEEK_MOE,
    DEEPSEEK_MOE_CONFIG,
    DEEPSEEK_TENSORS,
    MIXTRAL_MOE,
    MLA_ATTENTION,
    MLA_CONFIG,
    MTP,
    _deepseek_router,
    _deepseek_v2_router,
)

# GLM: the HF MLP packs [gate; up] in one gate_up_proj (same rule as Phi-3's)
GLM_GATE_UP = Packed(
    L + "mlp.gate_up_proj.weight",
    (C + "mlp.gate.weight", C + "mlp.up.weight"),
    ("ffn_hidden_size", "ffn_hidden_size"),
)
GLM_DOWN = ((L + "mlp.down_proj.weight", C + "mlp.down.weight"),)
# GLM-4-0414: sandwich norms; its "post_attention_layernorm" is the pre-MLP norm
GLM4_NORMS = (
    (L + "post_self_attn_layernorm.weight", C + "post_attn_norm.weight"),
    (L + "post_attention_layernorm.weight", C + "mlp_norm.weight"),
    (L + "post_mlp_layernorm.weight", C + "post_mlp_norm.weight"),
)
# head_dim is its own config key (128 by default, not hidden / heads); qkv bias on by default
GLM_CONFIG = config_with(
    ConfigKey("head_dim", "head_dim", 128), ConfigKey("qkv_bias", "attention_bias", True)
)

register(
    Family(
        name="seed_oss",
        model_types=("seed_oss",),
        architecture="SeedOssForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP,
        config=config_with(
            ConfigKey("head_dim", "head_dim", 128), ConfigKey("qkv_bias", "attention_bias", True)
        ),
        mindspeed_names=("seed-oss",),
    )
)
register(
    Family(
        name="glm",
        model_types=("glm",),
        architecture="GlmForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GLM_DOWN,
        packed=(GLM_GATE_UP,),
        config=GLM_CONFIG,
        mindspeed_names=("glm4_9b",),
    )
)
register(
    Family(
        name="glm4",
        model_types=("glm4",),
        architecture="Glm4ForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + GLM4_NORMS + GLM_DOWN,
        packed=(GLM_GATE_UP,),
        config=GLM_CONFIG,
        constants=(("post_norms", True),),
        mindspeed_names=("glm4",),
    )
)

# DeepSeek-V2: V3's tensors without MTP and without the router score bias; V2-Lite has no q-LoRA
# (q_lora_rank null: q_proj instead of q_a / q_b), which the MLA roles already cover
register(
    Family(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        architecture="DeepseekV2ForCausalLM",
        tensors=DEEPSEEK_TENSORS,
        config=config_with(*DEEPSEEK_MOE_CONFIG, *MLA_CONFIG),
        mindspeed_names=("deepseek2", "deepseek2-lite"),
        megatron_args=_deepseek_v2_router,
    )
)
# MiniCPM3: dense MLA with q-LoRA, tied embeddings; its muP scales (scale_emb, scale_depth,
# dim_model_base) are config values carried through unchanged
register(
    Family(
        name="minicpm3",
        model_types=("minicpm3",),
        architecture="MiniCPM3ForCausalLM",
        tensors=EMBED_AND_HEAD + MLA_ATTENTION + LLAMA_NORMS + GATED_MLP,
        config=config_with(*MLA_CONFIG, ConfigKey("tied_embeddings", "tie_word_embeddings", True)),
        mindspeed_names=("minicpm3",),
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
        megatron_args=_deepseek_router,  # sigmoid scores + score bias, group-limited top-k, scaled
    )
)

# Hunyuan: q/k norms are "query_layernorm" / "key_layernorm" (per head, always present); the MoE
# layer has one shared MLP as wide as the experts and a router named gate.wg
HUNYUAN_ATTENTION = tuple((h, c) for h, c in ATTENTION if "_norm." not in h) + (
    (L + "self_attn.query_layernorm.weight", C + "attn.q_norm.weight"),
    (L + "self_attn.key_layernorm.weight", C + "attn.k_norm.weight"),
)
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


# (MindSpeed-LLM's "hunyuan" name is given to the MoE family only, so the name picks one family)
register(
    Family(
        name="hunyuan_v1_dense",
        model_types=("hunyuan_v1_dense",),
        architecture="HunYuanDenseV1ForCausalLM",
        tensors=EMBED_AND_HEAD + HUNYUAN_ATTENTION + LLAMA_NORMS + GATED_MLP,
        config=config_with(),
        constants=(("qk_norm", True),),
    )
)
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
        megatron_args=_deepseek_router,  # sigmoid scores with a score-correction bias
    )
)

# BLOOM: LayerNorm with biases (also on the embedding output), biases on every linear layer, a
# non-gated GELU MLP (dense_h_to_4h -> gelu -> dense_4h_to_h, 4 x hidden wide), tied embeddings
# and ALiBi instead of rotary.  query_key_value packs [q; k; v] head by head (transformers views
# it as [heads, 3, head_dim]), which is Megatron's per-group linear_qkv order with one head per
# group.
B = "transformer.h.{i}."
BLOOM_QKV = tuple(
    Packed(
        B + "self_attention.query_key_value." + kind,
        (C + "attn.q." + kind, C + "attn.k." + kind, C + "attn.v." + kind),
        ("q_size", "kv_size", "kv_size"),
        groups="num_heads",
    )
    for kind in ("weight", "bias")
)
BLOOM_TENSORS = (
    ("transformer.word_embeddings.weight", "embed.weight"),
    ("transformer.word_embeddings_layernorm.weight", "embed_norm.weight"),
    ("transformer.word_embeddings_layernorm.bias", "embed_norm.bias"),
    (B + "input_layernorm.weight", C + "attn_norm.weight"),
    (B + "input_layernorm.bias", C + "attn_norm.bias"),
    (B + "self_attention.dense.weight", C + "attn.o.weight"),
    (B + "self_attention.dense.bias", C + "attn.o.bias"),
    (B + "post_attention_layernorm.weight", C + "mlp_norm.weight"),
    (B + "post_attention_layernorm.bias", C + "mlp_norm.bias"),
    (B + "mlp.dense_h_to_4h.weight", C + "mlp.fc1.weight"),
    (B + "mlp.dense_h_to_4h.bias", C + "mlp.fc1.bias"),
    (B + "mlp.dense_4h_to_h.weight", C + "mlp.down.weight"),
    (B + "mlp.dense_4h_to_h.bias", C + "mlp.down.bias"),
    ("transformer.ln_f.weight", "final_norm.weight"),
    ("transformer.ln_f.bias", "final_norm.bias"),
    ("lm_head.weight", "lm_head.weight"),
)


def _bloom_hidden(cfg: dict) -> int:
    return cfg.get("hidden_size") or cfg["n_embed"]


def _bloom_args(cfg: dict) -> dict:
    """Megatron / MindSpeed-LLM settings of BLOOM's semantics (its model_cfg.json 'bloom' entry):
    ALiBi, biases on every linear layer, the embedding LayerNorm, GELU without gating (bloom_gelu is
    the tanh form, Megatron's ``openai_gelu``)."""
    return {
        "position_embedding_type": "alibi",
        "use_rotary_position_embeddings": False,
        "add_bias_linear": True,
        "embed_layernorm": True,
        "norm_has_bias": True,
        "fc_type": "h_to_4h",
        "openai_gelu": True,
        "apply_residual_connection_post_layernorm": bool(
            cfg.get("apply_residual_connection_post_layernorm", False)
        ),
    }


register(
    Family(
        name="bloom",
        model_types=("bloom",),
        architecture="BloomForCausalLM",
        tensors=BLOOM_TENSORS,
        packed=BLOOM_QKV,
        config=(
            ConfigKey("num_layers", "n_layer", aliases=("num_hidden_layers",)),
            ConfigKey("hidden_size", "hidden_size", aliases=("n_embed",)),
            ConfigKey("ffn_hidden_size", None, lambda cfg: 4 * _bloom_hidden(cfg)),
            ConfigKey("num_heads", "n_head", aliases=("num_attention_heads",)),
            ConfigKey("num_kv_heads", None, lambda cfg: cfg.get("n_head") or cfg["num_attention_heads"]),
            ConfigKey(
                "head_dim",
                None,
                lambda cfg: _bloom_hidden(cfg) // (cfg.get("n_head") or cfg["num_attention_heads"]),
            ),
            ConfigKey("vocab_size", "vocab_size"),
            ConfigKey("norm_eps", "layer_norm_epsilon", 1e-5),
            ConfigKey("tied_embeddings", "tie_word_embeddings", True),
        ),
        constants=(
            ("qkv_bias", True),
            ("o_bias", True),
            ("mlp_bias", True),
            ("norm_bias", True),
            ("embed_norm", True),
            ("gated_mlp", False),
            ("activation", "gelu_pytorch_tanh"),  # bloom_gelu is the tanh approximation
        ),
        mindspeed_names=("bloom", "bloom_3b"),
        megatron_args=_bloom_args,
    )
)
