"""Hybrid families whose recurrent mixers no Megatron implementation has: LFM2 (short
convolutions between attention layers), Kimi Linear (Kimi delta attention between MLA layers,
DeepSeek-style MoE) and Jamba (Mamba-1 mixers between attention layers, MoE on a period).  One
table entry each; each layer's blocks come from the config (``layer_blocks``).

HF names and config keys: transformers 5's ``lfm2``, ``kimi_linear`` and ``jamba`` modeling and
configuration files, as transformers saves them (docs/reference/composed-blocks.md §1).  Megatron
names: none exists (Megatron-LM, Megatron-Bridge and MindSpeed-LLM have no such mixer), so the
Megatron output is ckpt-ir's own layout (``megatron/keys.py`` OWN_MIXER_KEYS, docs/formats.md),
which converts back to HF but which no Megatron trainer loads.
"""

from __future__ import annotations

import math
from typing import Any

from ckpt_ir.errors import FormatError
from ckpt_ir.families import ConfigKey, Family, Reshaped, Tested, register
from ckpt_ir.families.blocks import (
    EMBED_AND_HEAD,
    GATED_MLP,
    LLAMA_NORMS,
    C,
    L,
    deepseek_router_args,
    default_head_dim,
    default_kv_heads,
)
from ckpt_ir.families.mla import MLA_ATTENTION, MLA_CONFIG

# why megatron-core cannot compute logits from the rank files
OWN_LAYOUT = "no: no Megatron implementation has {} (ckpt-ir's own Megatron layout, docs/formats.md)"


def _types(cfg: dict[str, Any], key: str, kinds: dict[str, str]) -> list[str] | None:
    """The blocks a per-layer list of the config (``layer_types``, ``mlp_layer_types``) names,
    refusing a type it does not know; None when the config has no such list."""
    types = cfg.get(key)
    if types is None:
        return None
    unknown = sorted({t for t in types if t not in kinds})
    if unknown or len(types) != cfg["num_hidden_layers"]:
        raise FormatError(
            f"config.json: {key} must list one of {sorted(kinds)} for each of the "
            f"{cfg['num_hidden_layers']} layers, got {types}"
        )
    return [kinds[t] for t in types]


# ---------------------------------------------------------------------------------------------
# LFM2: each layer an operator norm, then a short convolution ("conv") or attention (q/k norms),
# then a SwiGLU MLP (w1 gate, w3 up, w2 down); the embedding_norm is the final norm (after the last
# layer); tied by default


def _lfm2_layers(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    """layer_types ("conv" / "full_attention"), else the older full_attn_idxs (None: every layer
    attention, as transformers reads it)."""
    mixers = _types(cfg, "layer_types", {"conv": "short_conv", "full_attention": "attention"})
    if mixers is None:
        n = cfg["num_hidden_layers"]
        idxs = cfg.get("full_attn_idxs")
        full = set(range(n) if idxs is None else idxs)
        mixers = ["attention" if i in full else "short_conv" for i in range(n)]
    return tuple((m, "mlp") for m in mixers)


def _lfm2_ffn(cfg: dict[str, Any]) -> int:
    """The MLP width transformers builds (Lfm2MLP): intermediate_size, or with
    block_auto_adjust_ff_dim (the default) two thirds of it, times block_ffn_dim_multiplier and
    rounded up to a multiple of block_multiple_of when the multiplier is set."""
    width = cfg.get("intermediate_size", cfg.get("block_ff_dim", 12288))
    if cfg.get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        mult = cfg.get("block_ffn_dim_multiplier", 1.0)
        if mult is not None:
            of = cfg.get("block_multiple_of", 256)
            width = of * ((int(mult * width) + of - 1) // of)
    return width


register(
    Family(
        name="lfm2",
        model_types=("lfm2",),
        architecture="Lfm2ForCausalLM",
        tensors=(
            ("model.embed_tokens.weight", "embed.weight"),
            ("model.embedding_norm.weight", "final_norm.weight"),
            ("lm_head.weight", "lm_head.weight"),
            (L + "operator_norm.weight", C + "attn_norm.weight"),
            (L + "self_attn.q_proj.weight", C + "attn.q.weight"),
            (L + "self_attn.k_proj.weight", C + "attn.k.weight"),
            (L + "self_attn.v_proj.weight", C + "attn.v.weight"),
            (L + "self_attn.out_proj.weight", C + "attn.o.weight"),
            (L + "self_attn.q_layernorm.weight", C + "attn.q_norm.weight"),
            (L + "self_attn.k_layernorm.weight", C + "attn.k_norm.weight"),
            *(
                (L + f"conv.{hf}.{leaf}", C + f"short_conv.{c}.{leaf}")
                for hf, c in (("in_proj", "in_proj"), ("conv", "conv"), ("out_proj", "out_proj"))
                for leaf in ("weight", "bias")
            ),
            (L + "ffn_norm.weight", C + "mlp_norm.weight"),
            (L + "feed_forward.w1.weight", C + "mlp.gate.weight"),
            (L + "feed_forward.w3.weight", C + "mlp.up.weight"),
            (L + "feed_forward.w2.weight", C + "mlp.down.weight"),
        ),
        config=(
            ConfigKey("num_layers", "num_hidden_layers"),
            ConfigKey("hidden_size", "hidden_size"),
            ConfigKey("vocab_size", "vocab_size"),
            ConfigKey("num_heads", "num_attention_heads"),
            ConfigKey("num_kv_heads", "num_key_value_heads", default_kv_heads),
            ConfigKey("head_dim", "head_dim", default_head_dim),
            ConfigKey("ffn_hidden_size", None, _lfm2_ffn),
            ConfigKey("norm_eps", "norm_eps", 1e-5),
            ConfigKey("tied_embeddings", "tie_word_embeddings", True, aliases=("tie_embedding",)),
            ConfigKey("layer_blocks", None, _lfm2_layers),
            ConfigKey("short_conv_kernel", "conv_L_cache", 3),
            ConfigKey("short_conv_bias", "conv_bias", False),
        ),
        constants=(("qk_norm", True),),
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 3,1", "--tp 2 --pp 2 --vpp-layers 1"),
            mcore_missing=OWN_LAYOUT.format("a short-convolution mixer"),
        ),
    )
)


# ---------------------------------------------------------------------------------------------
# Kimi Linear: each layer an input norm, then Kimi delta attention (layer_types
# "linear_attention") or MLA without q-LoRA ("full_attention"), a post-attention norm, then a dense
# SwiGLU MLP or DeepSeek-V3's MoE block (sigmoid router with a score-correction bias, shared
# experts) by mlp_layer_types.  transformers saves the dense MLP under block_sparse_moe.* too (the
# reverse of its load rename block_sparse_moe -> mlp); a source naming it mlp.* is read as well.
# Release configs give the KDA sizes and layer kinds in linear_attn_config (layers 1-indexed).


def _kimi_attn_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("linear_attn_config") or {}


def _kimi_kda(key: str, top: tuple[str, str], default: int) -> ConfigKey:
    """A KDA size: linear_attn_config's (which transformers lets win), else the top-level key."""
    return ConfigKey(key, None, lambda cfg: _kimi_attn_config(cfg).get(top[0], cfg.get(top[1], default)))


def _kimi_layers(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    n = cfg["num_hidden_layers"]
    mixers = _types(cfg, "layer_types", {"linear_attention": "kda", "full_attention": "mla"})
    if mixers is None:
        lin = _kimi_attn_config(cfg)
        if "full_attn_layers" in lin and "kda_layers" in lin:
            full = {i - 1 for i in lin["full_attn_layers"]}
            mixers = ["mla" if i in full else "kda" for i in range(n)]
        else:  # transformers' default: every 4th layer from layer 4 full attention
            mixers = ["mla" if i and i % 4 == 0 else "kda" for i in range(n)]
    mlps = _types(cfg, "mlp_layer_types", {"dense": "mlp", "sparse": "moe"})
    if mlps is None:
        k = cfg.get("first_k_dense_replace", 1)
        mlps = ["mlp" if i < k else "moe" for i in range(n)]
    return tuple(zip(mixers, mlps))


def _dense_layers(layers) -> Any:
    """The layers of a hybrid family with a dense MLP (Megatron's moe_layer_freq)."""
    return lambda cfg: tuple(i for i, blocks in enumerate(layers(cfg)) if "mlp" in blocks)


def _experts(layers, *keys: str) -> Any:
    """The routed experts (0 in a model without MoE layers: the config's count has a default)."""

    def get(cfg: dict[str, Any]) -> int:
        if not any("moe" in blocks for blocks in layers(cfg)):
            return 0
        return next(cfg[k] for k in keys if cfg.get(k) is not None)

    return get


def _kimi_router_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3's routing (KimiLinearTopkRouter: sigmoid scores, score-correction bias, group
    limited top-k, renormalised, scaled); the group count under Kimi's own name."""
    return deepseek_router_args({**cfg, "n_group": cfg.get("num_expert_group", cfg.get("n_group"))})


_KDA = "self_attn."
register(
    Family(
        name="kimi_linear",
        model_types=("kimi_linear",),
        architecture="KimiLinearForCausalLM",
        tensors=EMBED_AND_HEAD
        + MLA_ATTENTION
        + LLAMA_NORMS
        + (
            # a KDA layer's q_proj / o_proj share MLA's HF names: whichever block the layer holds
            *(
                (L + _KDA + f"{p}_proj.weight", C + f"kda.{p}.weight")
                for p in ("q", "k", "v", "b", "f_a", "f_b", "g_a", "g_b", "o")
            ),
            *((L + _KDA + f"{p}_conv1d.weight", C + f"kda.{p}_conv.weight") for p in ("q", "k", "v")),
            (L + _KDA + "dt_bias", C + "kda.dt_bias"),
            (L + _KDA + "o_norm.weight", C + "kda.o_norm.weight"),
            *(
                (L + f"block_sparse_moe.{p}_proj.weight", C + f"mlp.{p}.weight")
                for p in ("gate", "up", "down")
            ),
            *GATED_MLP,
            (L + "block_sparse_moe.gate.weight", C + "mlp.router.weight"),
            (L + "block_sparse_moe.gate.e_score_correction_bias", C + "mlp.router.bias"),
            *(
                (L + f"block_sparse_moe.experts.{{e}}.{hf}.weight", C + f"mlp.experts.{{e}}.{c}.weight")
                for hf, c in (("w1", "gate"), ("w3", "up"), ("w2", "down"))
            ),
            *(
                (L + f"block_sparse_moe.shared_experts.{p}_proj.weight", C + f"mlp.shared.{p}.weight")
                for p in ("gate", "up", "down")
            ),
        ),
        # KimiLinearForgetGate's A_log is [1, 1, heads, 1]: one value per head
        reshaped=(Reshaped(L + _KDA + "A_log", C + "kda.A_log", lambda s: (1, 1, s.kda_heads, 1)),),
        config=(
            ConfigKey("num_layers", "num_hidden_layers"),
            ConfigKey("hidden_size", "hidden_size"),
            ConfigKey("vocab_size", "vocab_size"),
            ConfigKey("ffn_hidden_size", "intermediate_size"),
            ConfigKey("num_heads", "num_attention_heads"),
            ConfigKey("num_kv_heads", "num_key_value_heads", default_kv_heads),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("tied_embeddings", "tie_word_embeddings", False),
            ConfigKey("activation", "hidden_act", "silu"),
            *MLA_CONFIG,
            ConfigKey("layer_blocks", None, _kimi_layers),
            ConfigKey("dense_layers", None, _dense_layers(_kimi_layers)),
            ConfigKey(
                "num_experts",
                None,
                _experts(_kimi_layers, "num_experts", "num_local_experts", "n_routed_experts"),
            ),
            ConfigKey("moe_topk", "num_experts_per_token", aliases=("num_experts_per_tok",)),
            ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size"),
            ConfigKey(
                "shared_ffn_hidden_size",
                None,
                lambda cfg: (
                    cfg.get("num_shared_experts", cfg.get("n_shared_experts", 1))
                    * cfg["moe_intermediate_size"]
                ),
            ),
            _kimi_kda("kda_heads", ("num_heads", "linear_num_heads"), 32),
            _kimi_kda("kda_head_dim", ("head_dim", "linear_head_dim"), 128),
            _kimi_kda("kda_conv_kernel", ("short_conv_kernel_size", "linear_conv_kernel_dim"), 4),
        ),
        constants=(("router_bias", True),),
        megatron_args=_kimi_router_args,
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --ep 2 --num-layer-list 1,3", "--pp 2 --ep 2 --vpp-layers 1"),
            mcore_missing=OWN_LAYOUT.format("Kimi delta attention"),
        ),
    )
)


# ---------------------------------------------------------------------------------------------
# Jamba: each layer an input norm, then attention (layer i with i % attn_layer_period ==
# attn_layer_offset; no positional encoding) or a Mamba-1 mixer, a pre-FF norm, then MoE (i %
# expert_layer_period == expert_layer_offset, with more than one expert: softmax top-k, not
# renormalised; experts as wide as the dense MLP) or a dense SwiGLU MLP


def _jamba_layers(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    n = cfg["num_hidden_layers"]
    ap, ao = cfg.get("attn_layer_period", 8), cfg.get("attn_layer_offset", 4)
    ep, eo = cfg.get("expert_layer_period", 2), cfg.get("expert_layer_offset", 1)
    experts = cfg.get("num_experts", cfg.get("num_local_experts", 16))
    return tuple(
        ("attention" if i % ap == ao else "mamba1", "moe" if experts > 1 and i % ep == eo else "mlp")
        for i in range(n)
    )


def _jamba_dt_rank(cfg: dict[str, Any]) -> int:
    rank = cfg.get("mamba_dt_rank", "auto")
    return math.ceil(cfg["hidden_size"] / 16) if rank == "auto" else rank


_M = "mamba."
register(
    Family(
        name="jamba",
        model_types=("jamba",),
        architecture="JambaForCausalLM",
        tensors=(
            ("model.embed_tokens.weight", "embed.weight"),
            ("model.final_layernorm.weight", "final_norm.weight"),
            ("lm_head.weight", "lm_head.weight"),
            (L + "input_layernorm.weight", C + "attn_norm.weight"),
            *((L + f"self_attn.{p}_proj.weight", C + f"attn.{p}.weight") for p in ("q", "k", "v", "o")),
            *(
                (L + _M + f"{hf}.{leaf}", C + f"mamba1.{hf}.{leaf}")
                for hf in ("in_proj", "conv1d", "out_proj")
                for leaf in ("weight", "bias")
            ),
            (L + _M + "x_proj.weight", C + "mamba1.x_proj.weight"),
            (L + _M + "dt_proj.weight", C + "mamba1.dt_proj.weight"),
            (L + _M + "dt_proj.bias", C + "mamba1.dt_proj.bias"),
            (L + _M + "A_log", C + "mamba1.A_log"),
            (L + _M + "D", C + "mamba1.D"),
            *((L + _M + f"{p}_layernorm.weight", C + f"mamba1.{p}_norm.weight") for p in ("dt", "b", "c")),
            (L + "pre_ff_layernorm.weight", C + "mlp_norm.weight"),
            *((L + f"feed_forward.{p}_proj.weight", C + f"mlp.{p}.weight") for p in ("gate", "up", "down")),
            (L + "feed_forward.router.weight", C + "mlp.router.weight"),
            *(
                (L + f"feed_forward.experts.{{e}}.{p}_proj.weight", C + f"mlp.experts.{{e}}.{p}.weight")
                for p in ("gate", "up", "down")
            ),
        ),
        config=(
            ConfigKey("num_layers", "num_hidden_layers"),
            ConfigKey("hidden_size", "hidden_size"),
            ConfigKey("vocab_size", "vocab_size"),
            ConfigKey("ffn_hidden_size", "intermediate_size"),
            ConfigKey("num_heads", "num_attention_heads"),
            ConfigKey("num_kv_heads", "num_key_value_heads", default_kv_heads),
            ConfigKey("head_dim", "head_dim", default_head_dim),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-6),
            ConfigKey("tied_embeddings", "tie_word_embeddings", False),
            ConfigKey("activation", "hidden_act", "silu"),
            ConfigKey("layer_blocks", None, _jamba_layers),
            ConfigKey("dense_layers", None, _dense_layers(_jamba_layers)),
            ConfigKey("num_experts", None, _experts(_jamba_layers, "num_experts", "num_local_experts")),
            ConfigKey("moe_topk", "num_experts_per_tok", 2),
            ConfigKey("moe_ffn_hidden_size", None, lambda cfg: cfg["intermediate_size"]),
            ConfigKey("mamba1_inner", None, lambda cfg: cfg.get("mamba_expand", 2) * cfg["hidden_size"]),
            ConfigKey("mamba1_state", "mamba_d_state", 16),
            ConfigKey("mamba1_dt_rank", None, _jamba_dt_rank),
            ConfigKey("mamba1_conv_kernel", "mamba_d_conv", 4),
            ConfigKey("mamba1_conv_bias", "mamba_conv_bias", True),
            ConfigKey("mamba1_proj_bias", "mamba_proj_bias", False),
        ),
        megatron_args=lambda cfg: {"moe_router_pre_softmax": True},
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2 --ep 2 --num-layer-list 3,1 --moe-grouped-gemm",
                "--tp 2 --pp 2 --vpp-layers 1",
            ),
            mcore_missing=OWN_LAYOUT.format("a Mamba-1 mixer"),
        ),
    )
)
