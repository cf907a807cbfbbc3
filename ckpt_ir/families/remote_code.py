"""Remote-code families: models whose HF modeling code lives in the model repository
(``auto_map`` in config.json), not in transformers, with their own tensor names and most with
packed [q; k; v] / [gate; up] tensors (internlm2, baichuan, chatglm, qwen, minicpm,
bailing_moe_v2; MiMo and Step-3.5, from Megatron-Bridge's mapping tables; sarvam_moe, now in transformers, with Ling 2.0's names).  One table entry each; PLM, a remote-code model with multi-latent attention, is
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

from ckpt_ir.errors import FormatError
from ckpt_ir.families import ConfigKey, ExpertStack, Family, Packed, Swapped, Tested, register
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


# Step-3.5 (stepfun-ai/Step-3.5-Flash, model_type "step3p5", Step3p5ForCausalLM; remote code, no
# transformers class).  Facts: Megatron-Bridge models/stepfun/step35_bridge.py (+ step35_provider.py,
# configuration_step35.py):
# * names (step35_bridge.py:399-466): Llama's embedding, norms, q/k/v/o and dense MLP, per-head
#   q_norm / k_norm, self_attn.g_proj (one scalar gate per head, [heads, hidden]); MoE layers hold
#   the router moe.gate.weight and its score bias moe.router_bias, the experts stacked as
#   moe.gate_proj / moe.up_proj [E, I, H] and moe.down_proj [E, H, I] (:447-464), and one shared
#   expert share_expert.{gate,up,down}_proj (:419, :456-460);
# * layer_types: "sliding_attention" layers have attention_other_setting's heads, query groups and
#   head size (bridge :299-316, provider Step35DecoderLayer :113-124; defaults 96 / 8 / 128), the
#   full-attention layers the config's (block window_attention); every layer's g_proj is block
#   head_gate, fused into linear_qkv as megatron-core 0.16's attention_output_gate (no
#   head_wise_attn_gate field there: bridge :60-61, :284-287), per group [q heads; each head's gate
#   row repeated head_dim times; k; v] (param_mapping.py merge_qkvg_weights / split_qkvg_weights);
# * MoE in moe_layers_enum's layers (a "3,4,..." string or a list, :377-392), dense elsewhere;
# * num_nextn_predict_layers dense MTP layers model.layers.{N + k} (:468-547) with enorm, hnorm,
#   eh_proj and transformer.shared_head.norm (Megatron's mtp final_layernorm); the checkpoint also
#   stores transformer.shared_head.output, a copy of lm_head (:223-257);
# * norms zero-centred as stored (zero_centered, default True: layernorm_zero_centered_gamma, :336),
#   q/k norms with use_qk_norm (:337), router bias with use_moe_router_bias (:357).
# Args (the provider's fields): per-layer rotary percents (partial_rotary_factors) and rope bases
# (a rope_theta list), the sliding-window shape and the router's settings.
_STEP35_SLIDING = {"num_attention_heads": 96, "num_attention_groups": 8, "head_dim": 128}  # bridge :300-305


def _step35_sliding(cfg: dict[str, Any], key: str) -> int:
    other = cfg.get("attention_other_setting") or {}
    if other.get("attention_type") == "sliding_attention" and key in other:
        return int(other[key])
    return _STEP35_SLIDING[key]


def _step35_moe_layers(cfg: dict[str, Any]) -> set[int]:
    enum = cfg.get("moe_layers_enum")
    if enum is None:  # configuration_step35.py:123-166: layers 3..44
        return set(range(3, 45))
    return {int(x) for x in (enum.split(",") if isinstance(enum, str) else enum) if str(x).strip()}


def _step35_types(cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(main layers' types, MTP layers' types): layer_types may list both (configuration_step35.py
    _split_mtp_layer_types), or mtp_layer_types the latter; full attention where nothing says."""
    n, k = cfg["num_hidden_layers"], _step35_mtp(cfg)
    types = list(cfg.get("layer_types") or ["full_attention"] * n)
    mtp = list(cfg.get("mtp_layer_types") or (types[n:] if len(types) == n + k else []))
    return types[:n], mtp or ["full_attention"] * k


def _step35_mtp(cfg: dict[str, Any]) -> int:
    return int(cfg.get("num_nextn_predict_layers", 3))  # configuration_step35.py:122


def _step35_mixer(cfg: dict[str, Any], kind: str) -> tuple[str, ...]:
    mixer = "window_attention" if kind == "sliding_attention" else "attention"
    return (mixer, "head_gate") if cfg.get("use_head_wise_attn_gate", True) else (mixer,)


def _step35_blocks(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    moe = _step35_moe_layers(cfg)
    main, _ = _step35_types(cfg)
    return tuple((*_step35_mixer(cfg, t), "moe" if i in moe else "mlp") for i, t in enumerate(main))


def _step35_mtp_blocks(cfg: dict[str, Any]) -> tuple[str, ...]:
    _, mtp = _step35_types(cfg)
    if not mtp:
        return ()
    if len(set(mtp)) > 1:
        raise FormatError(
            f"config.json: Step-3.5's MTP layers mix attention types {mtp}; ckpt-ir gives all MTP layers "
            f"one kind of block, so this checkpoint cannot be converted"
        )
    return (*_step35_mixer(cfg, mtp[0]), "mlp")  # MTP layers are dense (bridge :116-138)


def _step35_args(cfg: dict[str, Any]) -> dict[str, Any]:
    main, mtp = _step35_types(cfg)
    rope = cfg.get("rope_theta")
    out: dict[str, Any] = {
        "attention_output_gate": bool(cfg.get("use_head_wise_attn_gate", True)),
        "layer_types": main + mtp,
        "sliding_attention_setting": {
            "window_size": [int(cfg["sliding_window"]), 0]
            if cfg.get("sliding_window") is not None
            else [512, 0],
            "num_attention_heads": _step35_sliding(cfg, "num_attention_heads"),
            "num_query_groups": _step35_sliding(cfg, "num_attention_groups"),
            "kv_channels": _step35_sliding(cfg, "head_dim"),
        },
        "rotary_percents": cfg.get("partial_rotary_factors"),
        "rotary_base": float(rope[0]) if isinstance(rope, list) else rope,
        "rotary_base_per_layer": [float(x) for x in rope] if isinstance(rope, list) else None,
        "moe_layer_freq": [int(i in _step35_moe_layers(cfg)) for i in range(cfg["num_hidden_layers"])],
        "moe_router_enable_expert_bias": bool(cfg.get("use_moe_router_bias", False)),
        "moe_router_pre_softmax": False,
        "swiglu_limits": cfg.get("swiglu_limits"),
        "swiglu_limits_shared": cfg.get("swiglu_limits_shared"),
    }
    if cfg.get("moe_router_activation") is not None:
        out["moe_router_score_function"] = cfg["moe_router_activation"]
    if cfg.get("moe_router_scaling_factor") is not None:
        out["moe_router_topk_scaling_factor"] = float(cfg["moe_router_scaling_factor"])
    if cfg.get("need_fp32_gate"):
        out["moe_router_dtype"] = "fp32"
    return out


_STEP35_EXPERT = C + "mlp.experts.{e}."
register(
    Family(
        name="step3p5",
        model_types=("step3p5",),
        architecture="Step3p5ForCausalLM",
        tensors=EMBED_AND_HEAD
        + tuple((h, c) for h, c in LLAMA_TENSORS if h.startswith(L) and ".bias" not in h)
        + (
            (L + "self_attn.g_proj.weight", C + "attn.head_gate.weight"),
            (L + "moe.gate.weight", C + "mlp.router.weight"),
            (L + "moe.router_bias", C + "mlp.router.bias"),
            (L + "share_expert.gate_proj.weight", C + "mlp.shared.gate.weight"),
            (L + "share_expert.up_proj.weight", C + "mlp.shared.up.weight"),
            (L + "share_expert.down_proj.weight", C + "mlp.shared.down.weight"),
            (L + "enorm.weight", C + "mtp.enorm.weight"),
            (L + "hnorm.weight", C + "mtp.hnorm.weight"),
            (L + "eh_proj.weight", C + "mtp.eh_proj.weight"),
            (L + "transformer.shared_head.norm.weight", C + "mtp.norm.weight"),
            (L + "transformer.shared_head.output.weight", C + "mtp.head.weight"),
        ),
        stacked=(
            ExpertStack(L + "moe.gate_proj.weight", (_STEP35_EXPERT + "gate.weight",)),
            ExpertStack(L + "moe.up_proj.weight", (_STEP35_EXPERT + "up.weight",)),
            ExpertStack(L + "moe.down_proj.weight", (_STEP35_EXPERT + "down.weight",)),
        ),
        config=config_with(
            *NOT_WRITTEN,
            ConfigKey("num_kv_heads", "num_attention_groups"),
            ConfigKey("head_dim", "head_dim", 128),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            _derived("tied_embeddings", lambda cfg: bool(cfg.get("tie_word_embeddings", False))),
            _derived("activation", lambda cfg: "silu"),
            _derived("qk_norm", lambda cfg: bool(cfg.get("use_qk_norm", False))),
            _derived("zero_centred_norms", lambda cfg: bool(cfg.get("zero_centered", True))),
            ConfigKey("num_experts", "moe_num_experts"),
            ConfigKey("moe_topk", "moe_top_k"),
            ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size"),
            _derived(
                "shared_ffn_hidden_size",
                lambda cfg: cfg.get("share_expert_dim") or cfg.get("share_expert_dims", 1280),
            ),
            _derived("router_bias", lambda cfg: bool(cfg.get("use_moe_router_bias", False))),
            _derived("layer_blocks", _step35_blocks),
            _derived("mtp_layers", _step35_mtp),
            _derived("mtp_blocks", _step35_mtp_blocks),
            _derived("window_heads", lambda cfg: _step35_sliding(cfg, "num_attention_heads")),
            _derived("window_kv_heads", lambda cfg: _step35_sliding(cfg, "num_attention_groups")),
            _derived("window_head_dim", lambda cfg: _step35_sliding(cfg, "head_dim")),
        ),
        megatron_args=_step35_args,
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2 --num-layer-list 1,3",
                "--tp 2 --ep 2",
            ),
            mcore_missing="no: remote code only (transformers has no Step-3.5 class, so no logits oracle)",
        ),
    )
)
