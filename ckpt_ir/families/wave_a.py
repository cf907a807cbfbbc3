"""Families of MindSpeed-LLM's registry that reuse the llama / MoE vocabulary: one entry each.

Each entry's HF names and config keys were checked against transformers 5's modeling and
configuration files; the differences from its base family are noted beside it.
"""

from __future__ import annotations

from ckpt_ir.families import ConfigKey, Family, Packed, register
from ckpt_ir.families.llama import ATTENTION, EMBED_AND_HEAD, GATED_MLP, LLAMA_NORMS, C, L, config_with

# GLM: the HF MLP packs [gate; up] in one gate_up_proj (same rule as Phi-3's)
GLM_GATE_UP = Packed(L + "mlp.gate_up_proj.weight", (C + "mlp.gate.weight", C + "mlp.up.weight"),
                     ("ffn_hidden_size", "ffn_hidden_size"))
GLM_DOWN = ((L + "mlp.down_proj.weight", C + "mlp.down.weight"),)
# GLM-4-0414: sandwich norms; its "post_attention_layernorm" is the pre-MLP norm
GLM4_NORMS = (
    (L + "post_self_attn_layernorm.weight", C + "post_attn_norm.weight"),
    (L + "post_attention_layernorm.weight", C + "mlp_norm.weight"),
    (L + "post_mlp_layernorm.weight", C + "post_mlp_norm.weight"),
)
# head_dim is its own config key (128 by default, not hidden / heads); qkv bias on by default
GLM_CONFIG = config_with(ConfigKey("head_dim", "head_dim", 128), ConfigKey("qkv_bias", "attention_bias", True))

register(Family(
    name="seed_oss", model_types=("seed_oss",), architecture="SeedOssForCausalLM",
    tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP,
    config=config_with(ConfigKey("head_dim", "head_dim", 128), ConfigKey("qkv_bias", "attention_bias", True)),
    mindspeed_names=("seed-oss",),
))
register(Family(
    name="glm", model_types=("glm",), architecture="GlmForCausalLM",
    tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GLM_DOWN, packed=(GLM_GATE_UP,),
    config=GLM_CONFIG, mindspeed_names=("glm4_9b",),
))
register(Family(
    name="glm4", model_types=("glm4",), architecture="Glm4ForCausalLM",
    tensors=EMBED_AND_HEAD + ATTENTION + GLM4_NORMS + GLM_DOWN, packed=(GLM_GATE_UP,),
    config=GLM_CONFIG, constants=(("post_norms", True),), mindspeed_names=("glm4",),
))
