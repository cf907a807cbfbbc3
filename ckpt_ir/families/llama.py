"""Llama-style decoder families: one table entry each.

Every entry lists its HF tensor names against canonical names; roles a model may lack (biases,
q/k norms, lm_head when tied) are simply absent from the checkpoint and the frontend accepts that.
"""

from __future__ import annotations

from ckpt_ir.families import ConfigKey, Family, Packed, register


def _head_dim(cfg: dict) -> int:
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def _kv_heads(cfg: dict) -> int:
    return cfg["num_attention_heads"]


L = "model.layers.{i}."
C = "layers.{i}."

EMBED_AND_HEAD = (
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
ATTENTION = (
    (L + "input_layernorm.weight", C + "attn_norm.weight"),
    (L + "self_attn.q_proj.weight", C + "attn.q.weight"),
    (L + "self_attn.k_proj.weight", C + "attn.k.weight"),
    (L + "self_attn.v_proj.weight", C + "attn.v.weight"),
    (L + "self_attn.q_proj.bias", C + "attn.q.bias"),
    (L + "self_attn.k_proj.bias", C + "attn.k.bias"),
    (L + "self_attn.v_proj.bias", C + "attn.v.bias"),
    (L + "self_attn.o_proj.weight", C + "attn.o.weight"),
    (L + "self_attn.q_norm.weight", C + "attn.q_norm.weight"),
    (L + "self_attn.k_norm.weight", C + "attn.k_norm.weight"),
)
GATED_MLP = (
    (L + "mlp.gate_proj.weight", C + "mlp.gate.weight"),
    (L + "mlp.up_proj.weight", C + "mlp.up.weight"),
    (L + "mlp.down_proj.weight", C + "mlp.down.weight"),
)
LLAMA_NORMS = ((L + "post_attention_layernorm.weight", C + "mlp_norm.weight"),)
# Gemma-2 has four norms per layer; its "post_attention_layernorm" is *after* attention.
SANDWICH_NORMS = (
    (L + "post_attention_layernorm.weight", C + "post_attn_norm.weight"),
    (L + "pre_feedforward_layernorm.weight", C + "mlp_norm.weight"),
    (L + "post_feedforward_layernorm.weight", C + "post_mlp_norm.weight"),
)

BASE_CONFIG = (
    ConfigKey("num_layers", "num_hidden_layers"),
    ConfigKey("hidden_size", "hidden_size"),
    ConfigKey("ffn_hidden_size", "intermediate_size"),
    ConfigKey("num_heads", "num_attention_heads"),
    ConfigKey("num_kv_heads", "num_key_value_heads", _kv_heads),
    ConfigKey("head_dim", "head_dim", _head_dim),
    ConfigKey("vocab_size", "vocab_size"),
    ConfigKey("norm_eps", "rms_norm_eps", 1e-6),
    ConfigKey("tied_embeddings", "tie_word_embeddings", False),
    ConfigKey("qkv_bias", "attention_bias", False),
    ConfigKey("activation", "hidden_act", "silu"),
)


def config_with(*overrides: ConfigKey) -> tuple[ConfigKey, ...]:
    """The base llama-style config keys with some replaced or added (by ModelSpec field)."""
    by_field = {k.field: k for k in BASE_CONFIG}
    by_field.update({k.field: k for k in overrides})
    return tuple(by_field.values())


LLAMA_TENSORS = EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP

register(
    Family(
        name="llama",
        model_types=("llama",),
        architecture="LlamaForCausalLM",
        tensors=LLAMA_TENSORS,
        config=config_with(),
        mindspeed_names=("llama2", "llama3", "llama"),
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
    )
)
