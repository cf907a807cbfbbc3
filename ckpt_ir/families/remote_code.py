"""Remote-code families: models whose HF modeling code lives in the model repository
(``auto_map`` in config.json), not in transformers, with their own tensor names and most with
packed [q; k; v] / [gate; up] tensors (internlm2, baichuan, chatglm, qwen, minicpm,
bailing_moe_v2; MiMo, from Megatron-Bridge's mapping table; sarvam_moe, now in transformers, with Ling 2.0's names).  One table entry each; PLM, a remote-code model with multi-latent attention, is
in ``mla.py``.

ckpt-ir never runs that code: the family is chosen from config.json's ``model_type`` (then
``architectures``) and the tensors are read by name.  HF output keeps ``auto_map`` (config.json
is written back from the source's own) and the ``*.py`` files travel as side files (the source
directory, a Megatron checkpoint's ``hf/`` folder, or ``--hf-config``), so the result loads with
``trust_remote_code=True``.

Tensor names, shapes and packings come from each model's published modeling file and MindSpeed-LLM's
``configs/checkpoint/model_cfg.json``; the facts each entry relies on are noted beside it.  Config
values that only the forward pass uses (Baichuan2's NormHead, Baichuan-13B's ALiBi, MiniCPM's muP
scales) ride along in the config unchanged.

Derived config values are read with ``ConfigKey(field, None, fn)``: a key with no HF name is never
written back, so the source's config.json comes back exactly as it was.
"""

from __future__ import annotations

import re
from typing import Any

from ckpt_ir.families import ConfigKey, Family, Packed, Swapped, Tested, register
from ckpt_ir.families.blocks import (
    DEEPSEEK_MOE,
    EMBED_AND_HEAD,
    GATED_MLP,
    LLAMA_NORMS,
    LLAMA_TENSORS,
    SARVAM_MOE_CONFIG,
    C,
    L,
    config_with,
    deepseek_router_args,
    default_head_dim,
    default_kv_heads,
    first_k_dense_layers,
)

QKV_PARTS = (C + "attn.q.weight", C + "attn.k.weight", C + "attn.v.weight")
QKV_BIAS_PARTS = (C + "attn.q.bias", C + "attn.k.bias", C + "attn.v.bias")
QKV_ROWS = ("q_size", "kv_size", "kv_size")
GATE_UP_PARTS = (C + "mlp.gate.weight", C + "mlp.up.weight")


def _derived(field: str, fn: Any) -> ConfigKey:
    """A spec field computed from the config and never written back (its source keys are)."""
    return ConfigKey(field, None, fn)


# spec fields the llama-style config keys would otherwise add to a remote config that lacks them
NOT_WRITTEN = (_derived("head_dim", default_head_dim), ConfigKey("qkv_bias", None, False))

# InternLM2: llama's model with its own names; wqkv packs per key/value head g the rows
# [q heads of g; k_g; v_g] (modeling_internlm2.py: rearrange 'b q (h gs d) -> b q h gs d' with
# gs = 2 + heads_per_group; q = [..., :gs-2, :], k = [..., -2, :], v = [..., -1, :]), which is
# Megatron's own linear_qkv order; w1 = gate, w3 = up, w2 = down
register(
    Family(
        name="internlm2",
        model_types=("internlm2",),
        architecture="InternLM2ForCausalLM",
        tensors=(
            ("model.tok_embeddings.weight", "embed.weight"),
            ("model.norm.weight", "final_norm.weight"),
            ("output.weight", "lm_head.weight"),
            (L + "attention_norm.weight", C + "attn_norm.weight"),
            (L + "attention.wo.weight", C + "attn.o.weight"),
            (L + "ffn_norm.weight", C + "mlp_norm.weight"),
            (L + "feed_forward.w1.weight", C + "mlp.gate.weight"),
            (L + "feed_forward.w3.weight", C + "mlp.up.weight"),
            (L + "feed_forward.w2.weight", C + "mlp.down.weight"),
        ),
        packed=(Packed(L + "attention.wqkv.weight", QKV_PARTS, QKV_ROWS, groups="num_kv_heads"),),
        config=config_with(*NOT_WRITTEN),
        mindspeed_names=("internlm2",),
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --pp 2 --num-layer-list 1,3",
            ),
            mcore_logits=("--tp 2",),
        ),
    )
)

# Baichuan / Baichuan2 (7B, 13B): llama's names with W_pack = [q; k; v] (multi-head: k and v as
# wide as q).  Baichuan2's NormHead normalises lm_head's rows in the forward pass: the stored
# weight is the raw one, carried as is.  (13B uses ALiBi instead of rotary: no tensor for it.)
register(
    Family(
        name="baichuan",
        model_types=("baichuan",),
        architecture="BaichuanForCausalLM",
        tensors=EMBED_AND_HEAD
        + (
            (L + "input_layernorm.weight", C + "attn_norm.weight"),
            (L + "self_attn.o_proj.weight", C + "attn.o.weight"),
        )
        + LLAMA_NORMS
        + GATED_MLP,
        packed=(Packed(L + "self_attn.W_pack.weight", QKV_PARTS, QKV_ROWS),),
        config=config_with(*NOT_WRITTEN, _derived("num_kv_heads", default_kv_heads)),
        mindspeed_names=("baichuan2", "baichuan"),
        tested=Tested(
            round_trip=(
                "--pp 2 --vpp-layers 1",
                "--tp 2 --pp 2",
            ),
            mcore_logits=("--tp 2 --pp 2",),
        ),
    )
)


def _glm_groups(cfg: dict) -> int:
    return cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else cfg["num_attention_heads"]


def _glm_rotary(cfg: dict) -> dict:
    """ChatGLM rotates interleaved pairs of the first half of each head (modeling_chatglm.py:
    rot_dim = kv_channels // 2, x.reshape(..., rot_dim // 2, 2)), base 10000 x rope_ratio."""
    return {
        "rotary_percent": 0.5,
        "rotary_interleaved": True,
        "rotary_base": 10000 * (cfg.get("rope_ratio") or 1),
    }


# ChatGLM2/3 (and the remote-code GLM-4-9B, model_type "chatglm"): query_key_value = [q; k; v]
# with multi_query_group_num key/value heads, not interleaved (modeling_chatglm.py splits the
# output into [heads*d, groups*d, groups*d]); dense_h_to_4h = [gate; up] (swiglu: chunk(2), silu
# on the first); qkv bias when add_qkv_bias.  The saved rotary_pos_emb.inv_freq buffer is
# recomputed by the model.
G = "transformer.encoder.layers.{i}."
register(
    Family(
        name="chatglm",
        model_types=("chatglm",),
        architecture="ChatGLMModel",
        tensors=(
            ("transformer.embedding.word_embeddings.weight", "embed.weight"),
            ("transformer.encoder.final_layernorm.weight", "final_norm.weight"),
            ("transformer.output_layer.weight", "lm_head.weight"),
            (G + "input_layernorm.weight", C + "attn_norm.weight"),
            (G + "self_attention.dense.weight", C + "attn.o.weight"),
            (G + "post_attention_layernorm.weight", C + "mlp_norm.weight"),
            (G + "mlp.dense_4h_to_h.weight", C + "mlp.down.weight"),
        ),
        packed=(
            Packed(G + "self_attention.query_key_value.weight", QKV_PARTS, QKV_ROWS),
            Packed(G + "self_attention.query_key_value.bias", QKV_BIAS_PARTS, QKV_ROWS),
            Packed(G + "mlp.dense_h_to_4h.weight", GATE_UP_PARTS, ("ffn_hidden_size", "ffn_hidden_size")),
        ),
        config=(
            ConfigKey("num_layers", "num_layers"),
            ConfigKey("hidden_size", "hidden_size"),
            ConfigKey("ffn_hidden_size", "ffn_hidden_size"),
            ConfigKey("num_heads", "num_attention_heads"),
            _derived("num_kv_heads", _glm_groups),
            ConfigKey("head_dim", "kv_channels", default_head_dim),
            ConfigKey("vocab_size", "padded_vocab_size"),
            ConfigKey("norm_eps", "layernorm_epsilon", 1e-5),
            ConfigKey("qkv_bias", "add_qkv_bias", False),
            _derived("tied_embeddings", False),
            _derived("activation", "silu"),
        ),
        mindspeed_names=("chatglm3",),
        megatron_args=_glm_rotary,
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --pp 2 --num-layer-list 3,1",
            ),
            mcore_logits=("--tp 2",),
        ),
    )
)

# Qwen (v1): c_attn = [q; k; v] with a bias, multi-head; the MLP computes w1(x) * silu(w2(x)), so
# w2 is the gate and w1 the up projection (MindSpeed-LLM maps them the same way), and
# intermediate_size is twice the MLP width (w1, w2: intermediate_size // 2 rows each)
Q = "transformer.h.{i}."
register(
    Family(
        name="qwen",
        model_types=("qwen",),
        architecture="QWenLMHeadModel",
        tensors=(
            ("transformer.wte.weight", "embed.weight"),
            ("transformer.ln_f.weight", "final_norm.weight"),
            ("lm_head.weight", "lm_head.weight"),
            (Q + "ln_1.weight", C + "attn_norm.weight"),
            (Q + "attn.c_proj.weight", C + "attn.o.weight"),
            (Q + "ln_2.weight", C + "mlp_norm.weight"),
            (Q + "mlp.w2.weight", C + "mlp.gate.weight"),
            (Q + "mlp.w1.weight", C + "mlp.up.weight"),
            (Q + "mlp.c_proj.weight", C + "mlp.down.weight"),
        ),
        packed=(
            Packed(Q + "attn.c_attn.weight", QKV_PARTS, QKV_ROWS),
            Packed(Q + "attn.c_attn.bias", QKV_BIAS_PARTS, QKV_ROWS),
        ),
        config=(
            ConfigKey("num_layers", "num_hidden_layers"),
            ConfigKey("hidden_size", "hidden_size"),
            _derived("ffn_hidden_size", lambda cfg: cfg["intermediate_size"] // 2),
            ConfigKey("num_heads", "num_attention_heads"),
            _derived("num_kv_heads", default_kv_heads),
            ConfigKey("head_dim", "kv_channels", default_head_dim),
            ConfigKey("vocab_size", "vocab_size"),
            ConfigKey("norm_eps", "layer_norm_epsilon", 1e-6),
            ConfigKey("tied_embeddings", "tie_word_embeddings", False),
            _derived("activation", "silu"),
        ),
        constants=(("qkv_bias", True),),
        mindspeed_names=("qwen",),
        # the rotary base is "rotary_emb_base" (10000 for Qwen-7B, 1000000 for 14B / 72B)
        megatron_args=lambda cfg: {"rotary_base": cfg.get("rotary_emb_base") or 10000},
        tested=Tested(
            round_trip=(
                "--pp 2 --vpp-layers 1",
                "--tp 2 --pp 2",
            ),
            mcore_logits=("--tp 2",),
        ),
    )
)

# MiniCPM (2B) and MiniCPM-MoE (8x2B) share model_type "minicpm": llama's names; the MoE model's
# layers have a router "mlp.gate" [experts, hidden] and experts w1 = gate, w3 = up, w2 = down, each
# intermediate_size wide.  muP scales (scale_emb, scale_depth, dim_model_base) are config values.
register(
    Family(
        name="minicpm",
        model_types=("minicpm",),
        architecture="MiniCPMForCausalLM",
        tensors=LLAMA_TENSORS
        + (
            (L + "mlp.gate.weight", C + "mlp.router.weight"),
            (L + "mlp.experts.{e}.w1.weight", C + "mlp.experts.{e}.gate.weight"),
            (L + "mlp.experts.{e}.w3.weight", C + "mlp.experts.{e}.up.weight"),
            (L + "mlp.experts.{e}.w2.weight", C + "mlp.experts.{e}.down.weight"),
        ),
        config=config_with(
            *NOT_WRITTEN,
            ConfigKey("tied_embeddings", "tie_word_embeddings", True),
            _derived("num_experts", lambda cfg: cfg.get("num_experts") or 0),
            _derived("moe_topk", lambda cfg: cfg.get("num_experts_per_tok") or 0),
            _derived("moe_ffn_hidden_size", lambda cfg: cfg["intermediate_size"]),
        ),
        mindspeed_names=("minicpm", "minicpm-moe"),
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--tp 2 --pp 2 --ep 2",
                "--tp 2 --pp 2 --noop-layers 2,5",
            ),
            mcore_missing="no: muP scales (embedding, residual branches, logits)",
        ),
    )
)

# Ling 2.0 (BailingMoeV2: Ling-mini / flash / 1T; config model_type "bailing_moe_v2" or
# "bailing_moe"): query_key_value = [q heads; k heads; v heads] (the modeling file views it as
# heads + 2 * kv_heads heads of head_dim and splits), per-head query_layernorm / key_layernorm
# before rotary, dense output; DeepSeek-V3's MoE block (first_k_dense_replace dense layers, shared
# experts num_shared_experts x moe_intermediate_size wide, sigmoid router with its score bias
# stored as mlp.gate.expert_bias).  The published checkpoints have no MTP layers.
BAILING_TENSORS = (
    ("model.word_embeddings.weight", "embed.weight"),
    ("model.norm.weight", "final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    (L + "input_layernorm.weight", C + "attn_norm.weight"),
    (L + "attention.query_layernorm.weight", C + "attn.q_norm.weight"),
    (L + "attention.key_layernorm.weight", C + "attn.k_norm.weight"),
    (L + "attention.dense.weight", C + "attn.o.weight"),
    *LLAMA_NORMS,
    *GATED_MLP,
    *((h, c) for h, c in DEEPSEEK_MOE if "e_score_correction_bias" not in h),
    (L + "mlp.gate.expert_bias", C + "mlp.router.bias"),
)
BAILING_PACKED = (
    Packed(L + "attention.query_key_value.weight", QKV_PARTS, QKV_ROWS),
    Packed(L + "attention.query_key_value.bias", QKV_BIAS_PARTS, QKV_ROWS),
)
register(
    Family(
        name="bailing_moe_v2",
        model_types=("bailing_moe_v2", "bailing_moe"),
        architecture="BailingMoeV2ForCausalLM",
        tensors=BAILING_TENSORS,
        packed=BAILING_PACKED,
        config=config_with(
            ConfigKey("head_dim", "head_dim", default_head_dim),
            ConfigKey("qkv_bias", "use_qkv_bias", False),
            ConfigKey("qk_norm", "use_qk_norm", False),
            ConfigKey("num_experts", "num_experts"),
            ConfigKey("moe_topk", "num_experts_per_tok"),
            ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size"),
            _derived(
                "shared_ffn_hidden_size",
                lambda c: (c.get("num_shared_experts") or 0) * c["moe_intermediate_size"],
            ),
            _derived("dense_layers", first_k_dense_layers),
        ),
        constants=(("router_bias", True),),
        mindspeed_names=("bailing_mini",),
        megatron_args=deepseek_router_args,  # sigmoid scores + expert bias, group-limited top-k, scaled
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_logits=("--tp 2 --ep 2 --moe-grouped-gemm",),
            mindspeed=(
                ("bailing_mini-nobias-tp2ep2-grouped", "identical"),
                ("bailing_mini-tp2ep2-grouped", "differs only by linear_qkv.bias, which MindSpeed drops"),
                ("bailing_mini-tp2pp2", "differs only by linear_qkv.bias, which MindSpeed drops"),
            ),
        ),
    )
)


# Sarvam-30B (model_type "sarvam_moe"): Ling 2.0's tensor names -- Megatron-Bridge's
# models/sarvam/sarvam_moe_bridge.py:57-103 maps model.word_embeddings, attention.query_key_value
# ([q; k; v], ConcatenatedQKVMapping), attention.query_layernorm / key_layernorm, attention.dense,
# mlp.gate.expert_bias and the DeepSeek-style experts / shared_experts onto GPTModel's own keys.
# transformers 5 runs it as Glm4MoeForCausalLM (models/sarvam_moe: GLM-4.5's config with full
# rotary) and renames those tensors at load only (conversion_mapping.py "sarvam_moe"), so
# save_pretrained writes them back under these names: one naming.  The config is GLM-4.5's
# (n_routed_experts, n_shared_experts, attention_bias) or the release's spellings (num_experts,
# num_shared_experts, use_qkv_bias: SarvamMoEConfig.attribute_map); routing is DeepSeek-V3's.
register(
    Family(
        name="sarvam_moe",
        model_types=("sarvam_moe",),
        architecture="SarvamMoEForCausalLM",
        tensors=BAILING_TENSORS,
        packed=BAILING_PACKED,
        config=config_with(
            *SARVAM_MOE_CONFIG,
            ConfigKey("qkv_bias", "attention_bias", False, aliases=("use_qkv_bias",)),
            ConfigKey("qk_norm", "use_qk_norm", True),
        ),
        constants=(("router_bias", True),),
        megatron_args=deepseek_router_args,  # sigmoid scores + expert bias, group-limited top-k, scaled
        tested=Tested(
            round_trip=(
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--pp 2 --ep 2 --num-layer-list 1,2",
            ),
            mcore_missing="not run: GLM-4.5's GPTModel (glm4_moe), which its cases check",
        ),
    )
)

# MiMo (XiaomiMiMo/MiMo-7B, model_type "mimo", MiMoForCausalLM; Megatron-Bridge
# models/mimo/mimo_bridge.py): Qwen2's layers and names (the bridge extends Qwen2Bridge; :39-40 qkv
# bias, no q/k norm) plus num_nextn_predict_layers multi-token-prediction layers (:42-45) stored as
# model.mtp_layers.{k}.*: a Qwen2 decoder layer under its usual names (:75-111) with
# token_layernorm / hidden_layernorm / final_layernorm = Megatron's enorm / hnorm / final_layernorm
# (:52-70) and input_proj = eh_proj with its column halves swapped (:117-126: input_proj acts on
# [hidden; embedding], eh_proj on [embedding; hidden]); no embedding / head copies.  Read, the MTP
# layers are model.layers.{num_hidden_layers + k} of the table (hf_rename).
_MIMO_MTP_HF = re.compile(r"^model\.mtp_layers\.(\d+)\.(.+)$")
_MIMO_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _mimo_mtp_keys(key: str, num_layers: int, to_hf: bool) -> str:
    """model.mtp_layers.{k}.X <-> model.layers.{num_layers + k}.X."""
    if not to_hf:
        m = _MIMO_MTP_HF.match(key)
        return f"model.layers.{num_layers + int(m.group(1))}.{m.group(2)}" if m else key
    m = _MIMO_LAYER.match(key)
    if m and int(m.group(1)) >= num_layers:
        return f"model.mtp_layers.{int(m.group(1)) - num_layers}.{m.group(2)}"
    return key


register(
    Family(
        name="mimo",
        model_types=("mimo",),
        architecture="MiMoForCausalLM",
        tensors=LLAMA_TENSORS
        + (
            (L + "token_layernorm.weight", C + "mtp.enorm.weight"),
            (L + "hidden_layernorm.weight", C + "mtp.hnorm.weight"),
            (L + "final_layernorm.weight", C + "mtp.norm.weight"),
        ),
        swapped=(Swapped(L + "input_proj.weight", C + "mtp.eh_proj.weight"),),
        config=config_with(
            *NOT_WRITTEN,
            ConfigKey("mtp_layers", None, lambda cfg: cfg.get("num_nextn_predict_layers") or 0),
        ),
        constants=(("qkv_bias", True),),
        hf_rename=_mimo_mtp_keys,
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2 --num-layer-list 1,3",
                "--tp 2",
            ),
            mcore_missing="no: remote code only (transformers has no MiMo class, so no logits oracle)",
        ),
    )
)
