"""Table fragments that more than one family module uses; this module registers no family.

A fragment is a tuple of (HF name template, canonical template) pairs for one block of a layer
(Llama-style embedding and head, attention, gated MLP and norms; the q/k-norm variants; the Qwen
and DeepSeek MoE blocks; DeepSeek-V3's multi-token-prediction layer), or the config keys and
Megatron router args that go with it.  Roles a model may lack (biases, q/k norms, lm_head when
tied) are simply absent from its checkpoint and the frontend accepts that.  A fragment that one
family module alone uses stays in that module.
"""

from __future__ import annotations

from typing import Any

from ckpt_ir.families import ConfigKey, ExpertStack


def default_head_dim(cfg: dict) -> int:
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def default_kv_heads(cfg: dict) -> int:
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
LLAMA_TENSORS = EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP
# transformers' LlamaAttention / LlamaMLP biases: attention_bias puts one on q, k, v (ATTENTION) and
# o, mlp_bias on gate, up and down (Granite, InternLM3, SmolLM3, ERNIE 4.5's use_bias)
O_BIAS = ((L + "self_attn.o_proj.bias", C + "attn.o.bias"),)
GATED_MLP_BIASES = (
    (L + "mlp.gate_proj.bias", C + "mlp.gate.bias"),
    (L + "mlp.up_proj.bias", C + "mlp.up.bias"),
    (L + "mlp.down_proj.bias", C + "mlp.down.bias"),
)


def in_sublayer(
    pairs: tuple[tuple[str, str], ...], sub: int, modules: dict[str, str]
) -> tuple[tuple[str, str], ...]:
    """Layer fragment ``pairs`` (HF ``model.layers.{i}.<module>...``, canonical ``layers.{i}....``)
    as sublayer ``sub`` of a layer made of sublayers (see ``ckpt_ir.ir.blocks``): each canonical
    name under ``layers.{i}.sub<sub>.``, each HF name's first module below the layer renamed by
    ``modules`` (``{k}`` the sublayer: LongCat-Flash's ``"self_attn": "self_attn.{k}"``)."""
    out = []
    for hf, canon in pairs:
        module, _, rest = hf[len(L) :].partition(".")
        module = modules.get(module, module).format(k=sub)
        out.append((f"{L}{module}.{rest}", f"{C}sub{sub}.{canon[len(C) :]}"))
    return tuple(out)


BASE_CONFIG = (
    ConfigKey("num_layers", "num_hidden_layers"),
    ConfigKey("hidden_size", "hidden_size"),
    ConfigKey("ffn_hidden_size", "intermediate_size"),
    ConfigKey("num_heads", "num_attention_heads"),
    ConfigKey("num_kv_heads", "num_key_value_heads", default_kv_heads),
    ConfigKey("head_dim", "head_dim", default_head_dim),
    ConfigKey("vocab_size", "vocab_size"),
    ConfigKey("norm_eps", "rms_norm_eps", 1e-6),
    ConfigKey("tied_embeddings", "tie_word_embeddings", False),
    ConfigKey("qkv_bias", "attention_bias", False),
    ConfigKey("activation", "hidden_act", "silu"),
)


# the ModelSpec fields of those biases, read from the same keys
LLAMA_BIAS_CONFIG = (
    ConfigKey("qkv_bias", "attention_bias", False),
    ConfigKey("o_bias", "attention_bias", False),
    ConfigKey("mlp_bias", "mlp_bias", False),
)


def config_with(*overrides: ConfigKey) -> tuple[ConfigKey, ...]:
    """The base llama-style config keys with some replaced or added (by ModelSpec field)."""
    by_field = {k.field: k for k in BASE_CONFIG}
    by_field.update({k.field: k for k in overrides})
    return tuple(by_field.values())


# Hunyuan: q/k norms are "query_layernorm" / "key_layernorm" (per head, always present)
HUNYUAN_ATTENTION = tuple((h, c) for h, c in ATTENTION if "_norm." not in h) + (
    (L + "self_attn.query_layernorm.weight", C + "attn.q_norm.weight"),
    (L + "self_attn.key_layernorm.weight", C + "attn.k_norm.weight"),
)
# q/k RMSNorm over the whole projection (OLMo 2, OLMoE): the full-width roles, which Megatron-Bridge's
# OLMoE bridge keeps under the q_layernorm / k_layernorm keys
FULL_QK_NORM = (
    (L + "self_attn.q_norm.weight", C + "attn.q_full_norm.weight"),
    (L + "self_attn.k_norm.weight", C + "attn.k_full_norm.weight"),
)
PROJECTIONS = tuple((h, c) for h, c in ATTENTION if "_proj." in h)


def window_skip_freq(cfg: dict[str, Any]) -> int | list[int] | None:
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


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """The (global) rope settings: transformers 5's rope_parameters, older configs' rope_scaling."""
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def yarn_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """A YaRN rope (rope_type "yarn") as Megatron-Bridge's provider fields, which megatron-core's
    GPTModel reads (``position_embedding_type`` yarn, ``yarn_*``); nothing for other ropes."""
    rope = rope_parameters(cfg)
    if rope.get("rope_type", rope.get("type")) != "yarn":
        return {}
    scales = {f"yarn_{k}": rope[k] for k in ("mscale", "mscale_all_dim") if rope.get(k) is not None}
    return {
        "position_embedding_type": "yarn",
        "yarn_rotary_scaling_factor": rope.get("factor"),
        "yarn_original_max_position_embeddings": rope.get("original_max_position_embeddings"),
        "yarn_beta_fast": rope.get("beta_fast"),
        "yarn_beta_slow": rope.get("beta_slow"),
        **scales,
        "yarn_correction_range_round_to_int": bool(rope.get("truncate", True)),
    }


# Qwen MoE: on disk, transformers writes one tensor per expert (``...experts.N.gate_proj.weight``);
# the canonical names are ``layers.I.mlp.experts.N.{gate,up,down}.weight``, plus ``mlp.router.*``,
# ``mlp.shared.*`` and ``mlp.shared_gate.weight``
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


def qwen_router_args(cfg: dict) -> dict:
    """Qwen MoE without norm_topk_prob: softmax over all experts, then top-k (not renormalised)."""
    return {"moe_router_pre_softmax": not cfg.get("norm_topk_prob", False)}


def first_k_dense_layers(cfg: dict) -> tuple[int, ...]:
    """DeepSeek: the first ``first_k_dense_replace`` layers are dense; then every
    ``moe_layer_freq``-th layer is MoE (MTP layers, numbered after the main ones, are MoE)."""
    k, freq = cfg.get("first_k_dense_replace") or 0, cfg.get("moe_layer_freq") or 1
    return tuple(i for i in range(cfg["num_hidden_layers"]) if i < k or (i - k) % freq)


def mlp_dense_layers(cfg: dict) -> tuple[int, ...]:
    """Dense-MLP layers from transformers 5's ``mlp_layer_types`` ("dense" / "sparse"), else
    DeepSeek's first_k_dense_replace / moe_layer_freq rule."""
    types = cfg.get("mlp_layer_types")
    if types is None:
        return first_k_dense_layers(cfg)
    return tuple(i for i, t in enumerate(types) if t == "dense")


def _shared_ffn(cfg: dict) -> int:
    return (cfg.get("n_shared_experts") or 0) * cfg["moe_intermediate_size"]


def moe_config(
    experts: str = "num_experts", topk: str = "num_experts_per_tok", shared: str = "num_shared_experts"
) -> tuple[ConfigKey, ...]:
    """A MoE block's sizes under the config's own names: the routed experts, the top-k, each
    expert's width (``moe_intermediate_size``) and the shared experts' total width (their count,
    ``shared``, times an expert's width; 0 without shared experts)."""
    return (
        ConfigKey("num_experts", experts),
        ConfigKey("moe_topk", topk),
        ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size"),
        ConfigKey(
            "shared_ffn_hidden_size", None, lambda cfg: (cfg.get(shared) or 0) * cfg["moe_intermediate_size"]
        ),
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
DEEPSEEK_MOE_CONFIG = (
    ConfigKey("num_experts", "n_routed_experts"),
    ConfigKey("moe_topk", "num_experts_per_tok"),
    ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size"),
    ConfigKey("shared_ffn_hidden_size", None, _shared_ffn),
    ConfigKey("dense_layers", None, first_k_dense_layers),
)


def _sarvam_shared_ffn(cfg: dict) -> int:
    return (cfg.get("n_shared_experts", cfg.get("num_shared_experts")) or 0) * cfg["moe_intermediate_size"]


def _sarvam_dense_layers(cfg: dict) -> tuple[int, ...]:
    return first_k_dense_layers({"first_k_dense_replace": 1, **cfg})


# Sarvam's MoE sizes (sarvam_moe, sarvam_mla): DeepSeek-V3's keys, or the release configs' spellings
# num_experts / num_shared_experts (SarvamMoEConfig / SarvamMLAConfig.attribute_map); 1 dense
# layer where first_k_dense_replace is left out (both configs' default)
SARVAM_MOE_CONFIG = (
    ConfigKey("num_experts", "n_routed_experts", aliases=("num_experts",)),
    *DEEPSEEK_MOE_CONFIG[1:3],
    ConfigKey("shared_ffn_hidden_size", None, _sarvam_shared_ffn),
    ConfigKey("dense_layers", None, _sarvam_dense_layers),
)
# Granite MoE's block (granitemoe, granitemoeshared, granitemoehybrid): each layer's experts
# stacked in two tensors stored [out, in] (block_sparse_moe.input_linear [E, 2F, H], per expert
# [gate; up] rows, and output_linear [E, H, F]), the router at block_sparse_moe.router.layer (top-k
# logits, then a softmax over them: megatron-core's default routing)
_EXPERT = C + "mlp.experts.{e}."
GRANITE_MOE = ((L + "block_sparse_moe.router.layer.weight", C + "mlp.router.weight"),)
GRANITE_EXPERTS = (
    ExpertStack(L + "block_sparse_moe.input_linear.weight", (_EXPERT + "gate.weight", _EXPERT + "up.weight")),
    ExpertStack(L + "block_sparse_moe.output_linear.weight", (_EXPERT + "down.weight",)),
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


def deepseek_router_args(cfg: dict) -> dict:
    """DeepSeek-V3 routing: sigmoid scores with a score-correction bias, group-limited top-k, scaled."""
    return {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_pre_softmax": False,
        "moe_router_topk_scaling_factor": cfg.get("routed_scaling_factor"),
        "moe_router_num_groups": cfg.get("n_group"),
        "moe_router_group_topk": cfg.get("topk_group"),
    }
