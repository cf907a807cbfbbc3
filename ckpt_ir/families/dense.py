"""Dense decoder families: grouped- or multi-head attention and one MLP per layer, no experts
(llama, mistral, qwen2, qwen3, gemma, gemma2, phi3, seed_oss, glm, glm4, hunyuan_v1_dense, bloom,
gemma3_text, olmo2, granite, internlm3, ernie4_5, smollm3, ministral3, arcee, exaone4, olmo3,
cohere, cohere2).  One table entry each, built from the fragments in ``blocks.py``.

Each entry's HF names and config keys were checked against transformers 5's modeling and
configuration files; the differences from Llama are noted beside it.  Megatron names follow
MindSpeed-LLM v2's ``configs/checkpoint/model_cfg.json``, or Megatron-Bridge's bridge where
MindSpeed-LLM lacks the family (noted beside it).
"""

from __future__ import annotations

from typing import Any

from ckpt_ir.families import ConfigKey, ExpertStack, Family, Packed, Tested, register
from ckpt_ir.families.blocks import (
    ATTENTION,
    EMBED_AND_HEAD,
    FULL_QK_NORM,
    GATED_MLP,
    GATED_MLP_BIASES,
    HUNYUAN_ATTENTION,
    LLAMA_BIAS_CONFIG,
    LLAMA_NORMS,
    LLAMA_TENSORS,
    O_BIAS,
    PROJECTIONS,
    QWEN_EXPERTS,
    C,
    L,
    config_with,
    mlp_dense_layers,
    window_skip_freq,
    yarn_args,
)
from ckpt_ir.ir.names import COLUMN
from ckpt_ir.ir.roles import Role, register_role

# Gemma-2 has four norms per layer; its "post_attention_layernorm" is *after* attention.
SANDWICH_NORMS = (
    (L + "post_attention_layernorm.weight", C + "post_attn_norm.weight"),
    (L + "pre_feedforward_layernorm.weight", C + "mlp_norm.weight"),
    (L + "post_feedforward_layernorm.weight", C + "post_mlp_norm.weight"),
)

register(
    Family(
        name="llama",
        model_types=("llama",),
        architecture="LlamaForCausalLM",
        tensors=LLAMA_TENSORS,
        config=config_with(),
        mindspeed_names=("llama2", "llama3", "llama"),
        tested=Tested(
            round_trip=("--tp 2 --pp 2",),
            mcore_logits=(
                "--tp 2",
                "--pp 2 --vpp-layers 1",
                "--tp 1 --pp 1",
                "--tp 2 --make-vocab-size-divisible-by 64",
                "--tp 2 --pp 2",
            ),
        ),
    )
)
register(
    Family(
        name="mistral",
        model_types=("mistral",),
        architecture="MistralForCausalLM",
        tensors=LLAMA_TENSORS,
        config=config_with(ConfigKey("qkv_bias", None, False)),
        mindspeed_names=("mistral", "magistral"),
        tested=Tested(
            round_trip=("--tp 2 --pp 2",),
            mcore_missing="not run: Llama's GPTModel, which the llama cases check",
        ),
    )
)
register(
    Family(
        name="qwen2",
        model_types=("qwen2",),
        architecture="Qwen2ForCausalLM",
        tensors=LLAMA_TENSORS,
        config=config_with(),
        constants=(("qkv_bias", True),),
        mindspeed_names=("qwen25", "qwen2"),
        tested=Tested(
            round_trip=("--tp 2 --pp 2",),
            mcore_logits=(
                "--tp 2",
                "--tp 1 --pp 1",
                "--tp 2 --pp 2",
            ),
        ),
    )
)
register(
    Family(
        name="qwen3",
        model_types=("qwen3",),
        architecture="Qwen3ForCausalLM",
        tensors=LLAMA_TENSORS,
        config=config_with(),
        constants=(("qk_norm", True),),
        mindspeed_names=("qwen3",),
        tested=Tested(
            round_trip=("--tp 2 --pp 2",),
            mcore_logits=(
                "--pp 2",
                "--tp 2",
                "--tp 1 --pp 1",
            ),
        ),
    )
)
register(
    Family(
        name="gemma",
        model_types=("gemma",),
        architecture="GemmaForCausalLM",
        tensors=LLAMA_TENSORS,
        config=config_with(
            ConfigKey("tied_embeddings", "tie_word_embeddings", True),
            ConfigKey("activation", "hidden_activation", "gelu_pytorch_tanh"),
        ),
        mindspeed_names=("gemma",),
        tested=Tested(
            round_trip=("--pp 2",),
            mcore_missing="no: megatron-core 0.16's GPTModel does not scale the embeddings (Gemma multiplies them by sqrt(hidden_size))",
        ),
    )
)
register(
    Family(
        name="gemma2",
        model_types=("gemma2",),
        architecture="Gemma2ForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + SANDWICH_NORMS + GATED_MLP,
        config=config_with(
            ConfigKey("tied_embeddings", "tie_word_embeddings", True),
            ConfigKey("activation", "hidden_activation", "gelu_pytorch_tanh"),
        ),
        constants=(("post_norms", True),),
        mindspeed_names=("gemma2",),
        tested=Tested(
            round_trip=("--tp 2 --pp 2",),
            mcore_missing="no: no post-attention / post-MLP norms, no embedding scaling, no logit soft-capping",
        ),
    )
)
register(
    Family(
        name="phi3",
        model_types=("phi3",),
        architecture="Phi3ForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP,
        packed=(
            Packed(
                L + "self_attn.qkv_proj.weight",
                (C + "attn.q.weight", C + "attn.k.weight", C + "attn.v.weight"),
                ("q_size", "kv_size", "kv_size"),
            ),
            Packed(
                L + "mlp.gate_up_proj.weight",
                (C + "mlp.gate.weight", C + "mlp.up.weight"),
                ("ffn_hidden_size", "ffn_hidden_size"),
            ),
        ),
        config=config_with(ConfigKey("qkv_bias", None, False)),
        mindspeed_names=("phi3.5", "phi3"),
        tested=Tested(
            round_trip=("--tp 2 --pp 2",),
            mcore_missing="not run: Llama's GPTModel (the packed HF tensors are ckpt-ir's side), which the llama cases check",
        ),
    )
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
        tested=Tested(
            round_trip=("--tp 2 --pp 2",),
            mcore_logits=("--tp 2",),
            mindspeed=(
                ("seed-oss-tp1pp2-layers", "identical"),
                ("seed-oss-tp2pp2", "identical"),
            ),
        ),
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
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --pp 2 --num-layer-list 1,3",
            ),
            mcore_logits=("--tp 2",),
        ),
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
        tested=Tested(
            round_trip=(
                "--pp 2 --vpp-layers 1",
                "--tp 2 --pp 2",
            ),
            mcore_missing="no: GPTModel has no post-attention / post-MLP norms",
        ),
    )
)

# Hunyuan V1 dense: Llama with per-head q/k norms named query_layernorm / key_layernorm
# (MindSpeed-LLM's "hunyuan" name is given to the MoE family only, so the name picks one family)
register(
    Family(
        name="hunyuan_v1_dense",
        model_types=("hunyuan_v1_dense",),
        architecture="HunYuanDenseV1ForCausalLM",
        tensors=EMBED_AND_HEAD + HUNYUAN_ATTENTION + LLAMA_NORMS + GATED_MLP,
        config=config_with(),
        constants=(("qk_norm", True),),
        tested=Tested(round_trip=("--tp 2 --pp 2",), mcore_missing="no: q/k norm after rotary"),
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
        tested=Tested(
            round_trip=(
                "--pp 2 --vpp-layers 1",
                "--tp 2 --pp 2",
                "--tp 2 --pp 2 --num-layer-list 1,3",
            ),
            mcore_missing="no: no ALiBi and no embedding LayerNorm in GPTModel",
        ),
    )
)


# Gemma 3 and OLMo 2 are not in MindSpeed-LLM's registry: Gemma 3's Megatron-Core keys and args
# follow Megatron-Bridge's gemma3 bridge; OLMo 2 has none there and takes the post-norm keys of
# gemma2 / glm4 (from MindSpeed-LLM).  Sliding windows and per-layer-type rope bases are config
# values carried through the HF config; the Megatron args name them as megatron-core's
# ``TransformerConfig`` fields where one exists (docs/families.md lists the rest).
def _rope(cfg: dict[str, Any], layer_type: str) -> float | None:
    """A layer type's rope base: transformers 5 nests rope_parameters per layer type; older
    configs keep rope_theta (global) and rope_local_base_freq (sliding) on top."""
    params = cfg.get("rope_parameters") or {}
    nested = params.get(layer_type) if isinstance(params.get(layer_type), dict) else None
    if nested is not None:
        return nested.get("rope_theta")
    key = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
    return cfg.get(key, params.get("rope_theta"))


# Gemma 3: Gemma 2's sandwich norms plus per-head q/k norms; embeddings tied and scaled by
# sqrt(hidden) in the forward (no tensor); sliding-window and global layers with their own rope bases
def _gemma3_args(cfg: dict[str, Any]) -> dict[str, Any]:
    scalar = cfg.get("query_pre_attn_scalar")
    return {
        # HF's window counts the query's own position: Megatron's (left, right) is (window - 1, 0)
        "window_size": [cfg["sliding_window"] - 1, 0] if cfg.get("sliding_window") else None,
        "window_attn_skip_freq": window_skip_freq(cfg),
        "rotary_base": _rope(cfg, "full_attention"),
        "rotary_base_local": _rope(cfg, "sliding_attention"),
        "softmax_scale": scalar**-0.5 if scalar else None,
        "layernorm_zero_centered_gamma": True,  # Gemma's RMSNorm scales by (1 + weight)
        "apply_embedding_scaling": True,  # embeddings times sqrt(hidden_size)
    }


# Megatron-Bridge's keys of post norms folded into the projection before them (its Gemma 3 and
# EXAONE 4.0 bridges, TERowParallelLinearLayerNorm)
BRIDGE_POST_NORM_KEYS = (
    ("decoder.layers.{i}.self_attention.linear_proj.post_layernorm.weight", C + "post_attn_norm.weight"),
    ("decoder.layers.{i}.mlp.linear_fc2.post_layernorm.weight", C + "post_mlp_norm.weight"),
)

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
        megatron_keys=BRIDGE_POST_NORM_KEYS,  # Megatron-Bridge gemma3_bridge.py
        tested=Tested(
            round_trip=(
                "--ckpt-format torch_dist",
                "--tp 2 --pp 2",
                "--tp 2 --pp 2 --num-layer-list 1,3 --norm-names te",
            ),
            mcore_missing="no: no post-attention / post-MLP norms, one rope base for all layers",
        ),
    )
)

# OLMo 2: no pre-norms at all; the norms follow attention and the MLP ("post_attention_layernorm"
# is after attention), q/k norms over the full projection width
OLMO2_NORMS = (
    (L + "post_attention_layernorm.weight", C + "post_attn_norm.weight"),
    (L + "post_feedforward_layernorm.weight", C + "post_mlp_norm.weight"),
)
OLMO2_TENSORS = EMBED_AND_HEAD + PROJECTIONS + O_BIAS + FULL_QK_NORM + OLMO2_NORMS + GATED_MLP
OLMO2_CONFIG = config_with(
    ConfigKey("norm_eps", "rms_norm_eps", 1e-5), ConfigKey("o_bias", "attention_bias", False)
)
OLMO2_CONSTANTS = (("pre_norms", False), ("post_norms", True), ("qk_full_norm", True))
register(
    Family(
        name="olmo2",
        model_types=("olmo2",),
        architecture="Olmo2ForCausalLM",
        tensors=OLMO2_TENSORS,
        config=OLMO2_CONFIG,
        constants=OLMO2_CONSTANTS,
        megatron_args=lambda cfg: {"post_norm_only": True},
        tested=Tested(
            round_trip=(
                "--pp 2 --vpp-layers 1",
                "--tp 2 --pp 2",
            ),
            mcore_missing="no: no post-norm-only layers, q/k norm per head only",
        ),
    )
)


# None of the families below is in MindSpeed-LLM's configs/checkpoint/model_cfg.json (its InternLM3
# example converts with --model-type-hf llama2, the llama family), and Megatron-Bridge has a bridge
# for EXAONE 4.0 alone (and the vision-language Ministral 3): their Megatron keys are the canonical
# ones but where noted.  HF names and config keys from transformers 5.25's modeling_<family>.py /
# configuration_<family>.py.


def _window(cfg: dict[str, Any]) -> dict[str, Any]:
    """Sliding-window layers as megatron-core's TransformerConfig fields (none without a window)."""
    window = cfg.get("sliding_window")
    if not window:
        return {}
    return {"window_size": [window - 1, 0], "window_attn_skip_freq": window_skip_freq(cfg)}


def _rotary_on_sliding_layers(cfg: dict[str, Any], everywhere_without_window: bool) -> dict[str, Any]:
    """megatron-core's no_rope_freq (1 = no rotary) of models whose layers have rotary only where
    layer_types says sliding_attention and the config has a window; without a window EXAONE 4.0
    rotates in every layer (``everywhere_without_window``), Cohere 2 in none."""
    window = cfg.get("sliding_window")
    if not window and everywhere_without_window:
        return {}
    types = cfg.get("layer_types") or ()
    return {"no_rope_freq": [int(not window or t != "sliding_attention") for t in types]}


# Llama's tensors with its optional biases (attention_bias: q, k, v, o; mlp_bias: gate, up, down)
LLAMA_BIASED = LLAMA_TENSORS + O_BIAS + GATED_MLP_BIASES

# IBM Granite (modeling_granite.py): Llama; the embedding, residual and logits multipliers are
# config values megatron-core has no field for (carried in the HF config); attention_multiplier is
# the softmax scale
register(
    Family(
        name="granite",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 1,3 --norm-names te",),
            mcore_missing="no: the embedding, residual and logits multipliers (megatron-core has no field for them)",
        ),
        model_types=("granite",),
        architecture="GraniteForCausalLM",
        tensors=LLAMA_BIASED,
        config=config_with(*LLAMA_BIAS_CONFIG),
        megatron_args=lambda cfg: {"softmax_scale": cfg.get("attention_multiplier")},
    )
)

# InternLM3 (configuration_internlm3.py; transformers runs it as LlamaForCausalLM): head_dim its own
# key.  The hub's remote-code config names the biases qkv_bias (q, k, v) and bias (o and the MLP),
# transformers' attention_bias and mlp_bias, which it requires equal
register(
    Family(
        name="internlm3",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 3,1",),
            mcore_logits=("--tp 2 --pp 2 --num-layer-list 1,3",),
        ),
        model_types=("internlm3",),
        architecture="InternLM3ForCausalLM",
        tensors=LLAMA_BIASED,
        config=config_with(
            ConfigKey("head_dim", "head_dim", 128),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("qkv_bias", "attention_bias", False, aliases=("qkv_bias",)),
            ConfigKey("o_bias", "mlp_bias", False, aliases=("bias",)),
            ConfigKey("mlp_bias", "mlp_bias", False, aliases=("bias",)),
        ),
    )
)

# ERNIE 4.5 dense (modeling_ernie4_5.py): use_bias on every linear layer, tied embeddings, rotary on
# interleaved pairs (Megatron's rotary_interleaved, as Megatron-Bridge's ERNIE 4.5 MoE provider
# ernie_45_bridge.py sets it; Bridge has no dense ERNIE 4.5)
register(
    Family(
        name="ernie4_5",
        tested=Tested(round_trip=("--tp 2 --pp 2 --num-layer-list 1,3",), mcore_logits=("--tp 2",)),
        model_types=("ernie4_5",),
        architecture="Ernie4_5ForCausalLM",
        tensors=LLAMA_BIASED,
        config=config_with(
            ConfigKey("head_dim", "head_dim", 128),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("tied_embeddings", "tie_word_embeddings", True),
            *(ConfigKey(field, "use_bias", False) for field in ("qkv_bias", "o_bias", "mlp_bias")),
        ),
        megatron_args=lambda cfg: {"rotary_interleaved": True},
    )
)


def _smollm3_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """SmolLM3's NoPE layers (no_rope_layers, 1 = rotary; by default every no_rope_layer_interval-th
    layer has none) as megatron-core's no_rope_freq (1 = no rotary); its optional sliding windows."""
    every = cfg.get("no_rope_layer_interval") or 4
    rotary = cfg.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(cfg["num_hidden_layers"])]
    return {
        "no_rope_freq": [1 - int(r) for r in rotary],
        **(_window(cfg) if cfg.get("use_sliding_window") else {}),
    }


# SmolLM3 (modeling_smollm3.py): Llama with rotary left out of some layers, tied embeddings
register(
    Family(
        name="smollm3",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 3,1",), mcore_logits=("--pp 2 --num-layer-list 3,1",)
        ),
        model_types=("smollm3",),
        architecture="SmolLM3ForCausalLM",
        tensors=LLAMA_BIASED,
        config=config_with(ConfigKey("tied_embeddings", "tie_word_embeddings", True), *LLAMA_BIAS_CONFIG),
        megatron_args=_smollm3_args,
    )
)

# Ministral 3 (modeling_ministral3.py, the text model of Mistral 3): Mistral's tensors, head_dim its
# own key, YaRN rope (Megatron-Bridge's provider fields; its ministral3_bridge.py maps the
# vision-language model's language_model.* to these keys) and Llama 4's query scaling by position,
# 1 + llama_4_scaling_beta * log(1 + floor(pos / original_max_position_embeddings)), which is 1 below
# original_max_position_embeddings and has no megatron-core field
register(
    Family(
        name="ministral3",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 1,3 --norm-names te",), mcore_logits=("--tp 2",)
        ),
        model_types=("ministral3",),
        architecture="Ministral3ForCausalLM",
        tensors=LLAMA_TENSORS,
        config=config_with(
            ConfigKey("head_dim", "head_dim", 128),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("qkv_bias", None, False),
        ),
        megatron_args=lambda cfg: {**yarn_args(cfg), **_window(cfg)},
    )
)

# Arcee AFM (modeling_arcee.py): Llama attention, a non-gated MLP up_proj -> relu2 -> down_proj
# (Megatron's linear_fc1 is up alone, squared_relu)
UP_DOWN_MLP = (
    (L + "mlp.up_proj.weight", C + "mlp.fc1.weight"),
    (L + "mlp.up_proj.bias", C + "mlp.fc1.bias"),
    (L + "mlp.down_proj.weight", C + "mlp.down.weight"),
    (L + "mlp.down_proj.bias", C + "mlp.down.bias"),
)
register(
    Family(
        name="arcee",
        tested=Tested(round_trip=("--tp 2 --pp 2 --num-layer-list 1,3",), mcore_logits=("--tp 2",)),
        model_types=("arcee",),
        architecture="ArceeForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + O_BIAS + LLAMA_NORMS + UP_DOWN_MLP,
        config=config_with(
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("activation", "hidden_act", "relu2"),
            *LLAMA_BIAS_CONFIG,
        ),
        constants=(("gated_mlp", False),),
    )
)

# EXAONE 4.0 (modeling_exaone4.py): OLMo 2's post-norm-only layers with per-head q/k norms; with a
# sliding window, the layers layer_types marks global have no rotary.  Megatron keys and the post
# norms' place from Megatron-Bridge's exaone4_bridge.py
QK_NORMS = tuple((h, c) for h, c in ATTENTION if "_norm." in h)
register(
    Family(
        name="exaone4",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 1,3 --norm-names te",),
            mcore_missing="no: post-norm-only layers",
        ),
        model_types=("exaone4",),
        architecture="Exaone4ForCausalLM",
        tensors=EMBED_AND_HEAD + PROJECTIONS + QK_NORMS + OLMO2_NORMS + GATED_MLP,
        config=config_with(ConfigKey("norm_eps", "rms_norm_eps", 1e-5), ConfigKey("qkv_bias", None, False)),
        constants=(("pre_norms", False), ("post_norms", True), ("qk_norm", True)),
        megatron_args=lambda cfg: {
            "post_norm_only": True,
            **_window(cfg),
            **_rotary_on_sliding_layers(cfg, everywhere_without_window=True),
        },
        megatron_keys=BRIDGE_POST_NORM_KEYS,
    )
)

# OLMo 3 (modeling_olmo3.py): OLMo 2's tensors; sliding-window and global layers with a rope base each
register(
    Family(
        name="olmo3",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 3,1",), mcore_missing="no: post-norm-only layers"
        ),
        model_types=("olmo3",),
        architecture="Olmo3ForCausalLM",
        tensors=OLMO2_TENSORS,
        config=OLMO2_CONFIG,
        constants=OLMO2_CONSTANTS,
        megatron_args=lambda cfg: {
            "post_norm_only": True,
            **_window(cfg),
            "rotary_base": _rope(cfg, "full_attention"),
            "rotary_base_local": _rope(cfg, "sliding_attention"),
        },
    )
)


# Cohere (Command R, modeling_cohere.py) and Cohere 2 (Command R7B / A, modeling_cohere2.py): one
# LayerNorm per layer without a bias (a weight only, as an RMSNorm's), which attention and MLP read
# in parallel (x + attn(n(x)) + mlp(n(x)): ModelSpec.parallel_attn_mlp, no mlp_norm); rotary on
# interleaved pairs; the logits times logit_scale (a config value).  Cohere's use_qk_norm (Command
# R+) adds a LayerNorm per head with weights of its own, [heads, head_dim]: roles of this family,
# split over TP with the heads, under Megatron's q_layernorm / k_layernorm keys.  Cohere 2 has
# sliding-window layers and rotary on those only.
def _cohere_qk_norm(s: Any, lay: Any, i: int) -> bool:
    return s.family == "cohere" and bool(s.extra.get("use_qk_norm")) and s.has_attention(i)


register_role(
    Role(C + "attn.q_head_norm.weight", COLUMN, lambda s, lay: (s.num_heads, s.head_dim), _cohere_qk_norm),
    Role(C + "attn.k_head_norm.weight", COLUMN, lambda s, lay: (s.num_kv_heads, s.head_dim), _cohere_qk_norm),
)
COHERE_TENSORS = (
    EMBED_AND_HEAD
    + ((L + "input_layernorm.weight", C + "attn_norm.weight"),)
    + PROJECTIONS
    + O_BIAS
    + GATED_MLP
)
COHERE_CONFIG = config_with(
    ConfigKey("norm_eps", "layer_norm_eps", 1e-5),
    ConfigKey("tied_embeddings", "tie_word_embeddings", True),
    ConfigKey("o_bias", "attention_bias", False),
)
COHERE_ARGS = {"normalization": "LayerNorm", "rotary_interleaved": True}
register(
    Family(
        name="cohere",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 1,3",),
            mcore_missing="no: parallel attention and MLP on one norm, bias-free LayerNorm, logit scale",
        ),
        model_types=("cohere",),
        architecture="CohereForCausalLM",
        tensors=COHERE_TENSORS
        + (
            (L + "self_attn.q_norm.weight", C + "attn.q_head_norm.weight"),
            (L + "self_attn.k_norm.weight", C + "attn.k_head_norm.weight"),
        ),
        config=COHERE_CONFIG,
        constants=(("parallel_attn_mlp", True),),
        megatron_args=lambda cfg: COHERE_ARGS,
        megatron_keys=(
            ("decoder.layers.{i}.self_attention.q_layernorm.weight", C + "attn.q_head_norm.weight"),
            ("decoder.layers.{i}.self_attention.k_layernorm.weight", C + "attn.k_head_norm.weight"),
        ),
    )
)
register(
    Family(
        name="cohere2",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 3,1 --norm-names te",),
            mcore_missing="no: parallel attention and MLP on one norm, bias-free LayerNorm, logit scale",
        ),
        model_types=("cohere2",),
        architecture="Cohere2ForCausalLM",
        tensors=COHERE_TENSORS,
        config=COHERE_CONFIG,
        constants=(("parallel_attn_mlp", True),),
        megatron_args=lambda cfg: {
            **COHERE_ARGS,
            **_window(cfg),
            **_rotary_on_sliding_layers(cfg, everywhere_without_window=False),
        },
    )
)


# Cohere 2 MoE (modeling_cohere2_moe.py): Cohere 2's layer (one norm feeding attention and MLP in
# parallel) with, in mlp_layer_types' sparse layers, a MoE: router mlp.gate (top-k of the logits,
# then a softmax over them: megatron-core's default), experts as the hub and transformers' save store
# them, mlp.experts.<e>.gate_proj / up_proj / down_proj (stacked in memory only), shared experts
# mlp.shared_experts.* num_shared_experts x intermediate_size wide, added to or averaged with the
# experts' output (shared_expert_combination_strategy, carried in the HF config); its dense layers
# are prefix_dense_intermediate_size wide and rotate in every layer with
# prefix_dense_sliding_window_pattern 1 (force_rope).  Megatron keys: megatron-core's MoE layer
def _cohere2_moe_args(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {**COHERE_ARGS, **_window(cfg), **_rotary_on_sliding_layers(cfg, everywhere_without_window=False)}
    dense = mlp_dense_layers(cfg)
    if "no_rope_freq" in out and cfg.get("prefix_dense_sliding_window_pattern", 1) == 1:
        out["no_rope_freq"] = [0 if i in dense else f for i, f in enumerate(out["no_rope_freq"])]
    return out


register(
    Family(
        name="cohere2_moe",
        tested=Tested(
            round_trip=("--tp 2 --ep 2", "--pp 2 --ep 2 --num-layer-list 1,3"),
            mcore_missing="no: parallel attention and MLP on one norm, bias-free LayerNorm, logit scale",
        ),
        model_types=("cohere2_moe",),
        architecture="Cohere2MoeForCausalLM",
        tensors=COHERE_TENSORS
        + QWEN_EXPERTS
        + tuple(
            (L + f"mlp.shared_experts.{p}_proj.weight", C + f"mlp.shared.{p}.weight")
            for p in ("gate", "up", "down")
        ),
        config=config_with(
            *COHERE_CONFIG,
            ConfigKey(
                "ffn_hidden_size",
                None,
                lambda cfg: cfg.get("prefix_dense_intermediate_size") or cfg["intermediate_size"],
            ),
            ConfigKey("num_experts", "num_experts"),
            ConfigKey("moe_topk", "num_experts_per_tok"),
            ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
            ConfigKey(
                "shared_ffn_hidden_size",
                None,
                lambda cfg: cfg["intermediate_size"] * (cfg.get("num_shared_experts") or 0),
            ),
            ConfigKey("dense_layers", None, mlp_dense_layers),
        ),
        constants=(("parallel_attn_mlp", True),),
        megatron_args=_cohere2_moe_args,
    )
)


# Apertus (modeling_apertus.py): Llama attention with per-head q/k norms (attention_bias on q, k, v
# and o), its two norms named attention_layernorm / feedforward_layernorm, and a non-gated MLP
# up_proj -> xIELU -> down_proj.  xIELU (transformers' XIELUActivation, hidden_act "xielu") has
# learned gains alpha_p / alpha_n per layer and the constants beta / eps, which transformers saves as
# buffers and Megatron keeps as floats (roles mlp.act.*, ir/roles.py; Megatron-Bridge's Apertus
# bridge: mlp.activation_func.alpha_p / alpha_n).  The Swiss AI Megatron-LM fork's arg is xielu; the
# default rope is llama3's scaling (megatron-core's use_rope_scaling)
def _apertus_args(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = cfg.get("rope_parameters") or {}
    llama3 = rope.get("rope_type", rope.get("type")) == "llama3"
    return {
        "xielu": cfg.get("hidden_act", "xielu") == "xielu",
        **({"use_rope_scaling": True, "rope_scaling_factor": rope.get("factor")} if llama3 else {}),
    }


register(
    Family(
        name="apertus",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 1,3",),
            mcore_missing="no: megatron-core 0.16 has no xIELU activation (the Swiss AI Megatron-LM fork and Megatron-Bridge's Apertus bridge bring their own)",
        ),
        model_types=("apertus",),
        architecture="ApertusForCausalLM",
        tensors=EMBED_AND_HEAD
        + tuple((h, c) for h, c in ATTENTION if "input_layernorm" not in h)
        + O_BIAS
        + (
            (L + "attention_layernorm.weight", C + "attn_norm.weight"),
            (L + "feedforward_layernorm.weight", C + "mlp_norm.weight"),
            (L + "mlp.up_proj.weight", C + "mlp.fc1.weight"),
            (L + "mlp.down_proj.weight", C + "mlp.down.weight"),
            *((L + f"mlp.act_fn.{p}", C + f"mlp.act.{p}") for p in ("alpha_p", "alpha_n", "beta", "eps")),
        ),
        config=config_with(
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("activation", "hidden_act", "xielu"),
            *LLAMA_BIAS_CONFIG[:2],
        ),
        constants=(("gated_mlp", False), ("qk_norm", True)),
        megatron_args=_apertus_args,
    )
)


# Gemma 4's text model (modeling_gemma4.py, model_type gemma4_text): Gemma 3's sandwich norms and
# per-head q/k norms (a weightless v norm: no tensor; scores unscaled, softmax_scale 1), and blocks
# of its own in each layer (ModelSpec.layer_blocks, from the config):
# * global_attention in its full-attention layers (layer_types): heads of global_head_dim and
#   num_global_key_value_heads key / value heads (transformers 5 saves them as per_layer_config
#   overrides of those layers), with attention_k_eq_v no v_proj (the keys are the values);
# * kv_shared in its last num_kv_shared_layers layers: q_proj, q_norm, o_proj only (the keys and
#   values are the last earlier layer's of the same type), and with use_double_wide_mlp a dense MLP
#   twice intermediate_size wide;
# * ple: with hidden_size_per_layer_input, a per-layer input embedding (the model's
#   embed_tokens_per_layer, per_layer_model_projection, per_layer_projection_norm) gated into each
#   layer (per_layer_input_gate, per_layer_projection, post_per_layer_input_norm);
# * layer_scalar: the layer's output scale (a buffer transformers saves);
# * moe (with moe_branch) in every layer with enable_moe_block (Gemma 4 26B-A4B): a MoE beside the
#   dense MLP, reading the layer's input after attention (router: a weightless RMSNorm, times
#   router.scale and hidden**-0.5, softmax, top-k renormalised, times per_expert_scale; experts
#   stacked gate_up_proj [E, 2F, H] / down_proj [E, H, F] after pre_feedforward_layernorm_2), each
#   branch normed after (post_feedforward_layernorm_1 / _2), their sum by post_feedforward_layernorm.
# Megatron keys: Megatron-Bridge's Gemma 4 dense model (gemma4_bridge.py: post_self_attn_layernorm,
# the per-layer input modules, layer_scalar, per_layer_embedding ...); its linear_qkv of a layer
# without k / v of its own pads them (zeros, v = k), and so does ckpt-ir's (qkv_pads_kv, with the
# kv-shared layers' k_layernorm of ones: docs/families.md).  The MoE model's keys are Bridge's MoE path's (_moe_mapping_registry,
# gemma4_bridge.py:507-578 at 067f987): the dense MLP is mlp.shared_experts (its pre-norm
# pre_shared_expert_layernorm), the experts' pre-norm pre_mlp_layernorm, the post norms
# self_attention.linear_proj.post_layernorm, mlp.post_shared_expert_layernorm,
# mlp.post_moe_layernorm and post_ffn_layernorm, the router's scales mlp.router.scale /
# per_expert_scale.
def _gemma4_layer_types(cfg: dict[str, Any]) -> list[str]:
    """transformers' layer_types: every sliding_window_pattern-th layer (6) full, the last full."""
    n = cfg["num_hidden_layers"]
    types = list(cfg.get("layer_types") or ())
    if not types:
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    if types:
        types[-1] = "full_attention"
    return types


def _gemma4_global(cfg: dict[str, Any], key: str, legacy: str, default: Any) -> Any:
    """A full-attention layer's head_dim / num_key_value_heads: transformers 5's per_layer_config
    overrides (one value for every full layer, none for the sliding ones), else the released
    configs' global_head_dim / num_global_key_value_heads (the latter with attention_k_eq_v only)."""
    from ckpt_ir.errors import FormatError

    types = _gemma4_layer_types(cfg)
    overrides = cfg.get("per_layer_config")
    if overrides is None:
        if legacy == "num_global_key_value_heads" and not cfg.get("attention_k_eq_v"):
            return default
        return cfg.get(legacy) or default
    values = {int(i): o.get(key, default) for i, o in overrides.items()}
    full = {values.get(i, default) for i, t in enumerate(types) if t == "full_attention"}
    sliding = [i for i, t in enumerate(types) if t != "full_attention" and i in values]
    if len(full) > 1 or sliding:
        raise FormatError(
            f"config.json: per_layer_config sets {key} other than one value for every full-attention "
            f"layer ({overrides}); ckpt-ir's global_attention block has one size for them all"
        )
    return full.pop() if full else default


def _gemma4_blocks(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:

    n, shared = cfg["num_hidden_layers"], cfg.get("num_kv_shared_layers") or 0
    ple = cfg.get("hidden_size_per_layer_input", 256)
    out = []
    for i, t in enumerate(_gemma4_layer_types(cfg)):
        mixer = "global_attention" if t == "full_attention" else "attention"
        parts = ("kv_shared",) if i >= n - shared else ()
        moe = ("moe", "moe_branch") if cfg.get("enable_moe_block") else ()
        out.append((mixer, *parts, "mlp", *moe, *(("ple",) if ple else ()), "layer_scalar"))
    return tuple(out)


_EXPERT = C + "mlp.experts.{e}."
_GEMMA4_MOE_KEYS = tuple(
    ("decoder.layers.{i}." + m, C + c)
    for m, c in (
        ("self_attention.linear_proj.post_layernorm.weight", "post_attn_norm.weight"),
        ("pre_shared_expert_layernorm.weight", "mlp_norm.weight"),
        ("mlp.shared_experts.linear_fc1.weight", "mlp.gate_up.weight"),
        ("mlp.shared_experts.linear_fc2.weight", "mlp.down.weight"),
        ("mlp.post_shared_expert_layernorm.weight", "post_dense_norm.weight"),
        ("pre_mlp_layernorm.weight", "moe_norm.weight"),
        ("mlp.router.scale", "mlp.router.scale"),
        ("mlp.router.per_expert_scale", "mlp.router.expert_scale"),
        ("mlp.post_moe_layernorm.weight", "post_moe_norm.weight"),
        ("post_ffn_layernorm.weight", "post_mlp_norm.weight"),
    )
)


def _gemma4_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """Megatron-Bridge's Gemma 4 dense provider fields (gemma4_provider.py), which its model reads."""
    types = _gemma4_layer_types(cfg)
    full = (cfg.get("rope_parameters") or {}).get("full_attention") or {}
    return {
        "window_size": [cfg["sliding_window"] - 1, 0] if cfg.get("sliding_window") else None,
        "window_attn_skip_freq": [int(t == "sliding_attention") for t in types],
        "sliding_window_rope_base": _rope(cfg, "sliding_attention"),
        "full_attention_rope_base": _rope(cfg, "full_attention"),
        "full_attention_rope_partial_factor": full.get("partial_rotary_factor", 1.0),
        "global_kv_channels": _gemma4_global(cfg, "head_dim", "global_head_dim", 512),
        "num_global_query_groups": _gemma4_global(
            cfg, "num_key_value_heads", "num_global_key_value_heads", cfg["num_key_value_heads"]
        ),
        "attention_k_eq_v": bool(cfg.get("attention_k_eq_v")),
        "num_kv_shared_layers": cfg.get("num_kv_shared_layers") or 0,
        "use_double_wide_mlp": bool(cfg.get("use_double_wide_mlp")),
        "per_layer_embed_dim": cfg.get("hidden_size_per_layer_input", 256),
        "per_layer_embed_vocab_size": cfg.get("vocab_size_per_layer_input", 262144),
        "final_logit_softcapping": cfg.get("final_logit_softcapping"),
        "softmax_scale": 1.0,
        "scale_embeddings_by_hidden_size": True,  # embeddings times sqrt(hidden_size)
    }


register(
    Family(
        name="gemma4_text",
        tested=Tested(
            # the MoE model (enable_moe_block): --tp 2 --ep 2, --pp 2 --ep 2 --num-layer-list 1,3
            round_trip=(
                "--tp 2 --pp 2 --num-layer-list 1,3",
                "--tp 2 --ep 2",
                "--pp 2 --ep 2 --num-layer-list 1,3",
            ),
            mcore_missing="no: megatron-core 0.16 has no per-layer inputs, shared keys / values, layers of two attention sizes, post norms or logit soft-capping (nor a MoE beside a dense MLP)",
        ),
        model_types=("gemma4_text",),
        architecture="Gemma4ForCausalLM",
        tensors=EMBED_AND_HEAD
        + ATTENTION
        + SANDWICH_NORMS
        + GATED_MLP
        + O_BIAS
        + (
            ("model.embed_tokens_per_layer.weight", "ple_embed.weight"),
            ("model.per_layer_model_projection.weight", "ple_proj.weight"),
            ("model.per_layer_projection_norm.weight", "ple_norm.weight"),
            (L + "per_layer_input_gate.weight", C + "ple.gate.weight"),
            (L + "per_layer_projection.weight", C + "ple.proj.weight"),
            (L + "post_per_layer_input_norm.weight", C + "ple.norm.weight"),
            (L + "layer_scalar", C + "layer_scalar"),
            (L + "router.proj.weight", C + "mlp.router.weight"),
            (L + "router.scale", C + "mlp.router.scale"),
            (L + "router.per_expert_scale", C + "mlp.router.expert_scale"),
            (L + "pre_feedforward_layernorm_2.weight", C + "moe_norm.weight"),
            (L + "post_feedforward_layernorm_1.weight", C + "post_dense_norm.weight"),
            (L + "post_feedforward_layernorm_2.weight", C + "post_moe_norm.weight"),
        ),
        stacked=(
            ExpertStack(L + "experts.gate_up_proj", (_EXPERT + "gate.weight", _EXPERT + "up.weight")),
            ExpertStack(L + "experts.down_proj", (_EXPERT + "down.weight",)),
        ),
        config=config_with(
            ConfigKey("head_dim", "head_dim", 256),
            ConfigKey("tied_embeddings", "tie_word_embeddings", True),
            ConfigKey("activation", "hidden_activation", "gelu_pytorch_tanh"),
            *LLAMA_BIAS_CONFIG[:2],
            ConfigKey(
                "global_head_dim", None, lambda cfg: _gemma4_global(cfg, "head_dim", "global_head_dim", 512)
            ),
            ConfigKey(
                "global_kv_heads",
                None,
                lambda cfg: _gemma4_global(
                    cfg, "num_key_value_heads", "num_global_key_value_heads", cfg["num_key_value_heads"]
                ),
            ),
            ConfigKey("global_k_eq_v", "attention_k_eq_v", False),
            ConfigKey("kv_shared_wide_mlp", "use_double_wide_mlp", False),
            ConfigKey("ple_dim", None, lambda cfg: cfg.get("hidden_size_per_layer_input", 256)),
            ConfigKey("ple_vocab", None, lambda cfg: cfg.get("vocab_size_per_layer_input", 262144)),
            ConfigKey("layer_blocks", None, _gemma4_blocks),
            ConfigKey("num_experts", None, lambda cfg: cfg.get("num_experts") or 0),
            ConfigKey("moe_topk", None, lambda cfg: cfg.get("top_k_experts") or 0),
            ConfigKey("moe_ffn_hidden_size", None, lambda cfg: cfg.get("moe_intermediate_size") or 0),
        ),
        constants=(("qk_norm", True), ("post_norms", True), ("qkv_pads_kv", True)),
        megatron_args=_gemma4_args,
        megatron_keys=(("decoder.layers.{i}.post_self_attn_layernorm.weight", C + "post_attn_norm.weight"),),
        megatron_variants=(("moe_branch", _GEMMA4_MOE_KEYS),),
    )
)
