"""Mixture-of-experts decoder families with grouped- or multi-head attention (mixtral, qwen2_moe,
qwen3_moe, glm4_moe, dots1, ernie4_5_moe, granitemoe, granitemoeshared, llama4_text, exaone_moe,
afmoe, hunyuan_v1_moe, phimoe, minimax_m2, hy_v3, olmoe, gpt_oss).  One table entry each, built
from the fragments in ``blocks.py``; the MoE families with multi-latent attention are in
``mla.py``.

On disk, transformers writes one tensor per expert (``...experts.N.gate_proj.weight``) except for
gpt-oss, Granite MoE and Llama 4, whose experts are stacked per layer (:class:`ExpertStack`); the
canonical names are ``layers.I.mlp.experts.N.{gate,up,down}.weight``, plus ``mlp.router.*``,
``mlp.shared.*`` and ``mlp.shared_gate.weight``.  Each entry's HF names and config keys were
checked against transformers 5's modeling and configuration files; Megatron names follow
MindSpeed-LLM v2's ``configs/checkpoint/model_cfg.json``, or Megatron-Bridge's bridge where
MindSpeed-LLM lacks the family (olmoe, gpt_oss, ernie4_5_moe, exaone_moe, llama4_text), or the
same blocks' keys where neither has it (dots1, granitemoe, granitemoeshared, afmoe).
"""

from __future__ import annotations

from typing import Any

from ckpt_ir.families import ConfigKey, ExpertStack, Family, Packed, Reshaped, Tested, register
from ckpt_ir.families.blocks import (
    ATTENTION,
    DEEPSEEK_MOE,
    DEEPSEEK_MOE_CONFIG,
    EMBED_AND_HEAD,
    FULL_QK_NORM,
    GATED_MLP,
    GRANITE_EXPERTS,
    GRANITE_MOE,
    HUNYUAN_ATTENTION,
    LLAMA_NORMS,
    MTP,
    PROJECTIONS,
    QWEN_EXPERTS,
    QWEN_MOE_CONFIG,
    QWEN_SHARED,
    C,
    L,
    config_with,
    deepseek_router_args,
    mlp_dense_layers,
    moe_config,
    qwen_router_args,
    rope_parameters,
    window_skip_freq,
    yarn_args,
)

EXPERT = C + "mlp.experts.{e}."
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
        tested=Tested(
            round_trip=("random (20 pairs): --tp 1/2 --pp 1/2 --ep 1/2/4 [--etp 1] [--moe-grouped-gemm]",),
            mcore_logits=(
                "--ep 2",
                "--ep 4",
                "--tp 2",
                "--ep 2 --moe-grouped-gemm",
                "--pp 2 --ep 2",
                "--tp 2 --ep 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--pp 2 --ep 2 --vpp-layers 1",
                "--tp 2 --ep 2 --etp 1",
                "--tp 2 --ep 4 --etp 1",
                "--tp 2 --pp 2 --ep 2 --etp 1",
            ),
        ),
    )
)
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
        megatron_args=qwen_router_args,
        tested=Tested(
            round_trip=("random (20 pairs): --tp 1/2 --pp 1/2 --ep 1/2/4 [--etp 1] [--moe-grouped-gemm]",),
            mcore_logits=(
                "--ep 2",
                "--pp 2 --ep 2",
                "--tp 2 --ep 2",
                "--tp 2 --ep 2 --etp 1 --moe-grouped-gemm",
            ),
        ),
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
        megatron_args=qwen_router_args,
        tested=Tested(
            round_trip=("random (20 pairs): --tp 1/2 --pp 1/2 --ep 1/2/4 [--etp 1] [--moe-grouped-gemm]",),
            mcore_logits=(
                "--ep 2",
                "--tp 2 --moe-grouped-gemm",
                "--tp 2 --ep 2",
                "--tp 2 --ep 2 --etp 1 --moe-grouped-gemm",
            ),
        ),
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
        megatron_args=deepseek_router_args,  # sigmoid scores + score bias, group-limited top-k, scaled
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_logits=(
                "--pp 2 --ep 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mindspeed=(
                ("glm45-tp2ep2-grouped", "identical"),
                ("glm45-tp2pp2", "identical"),
            ),
        ),
    )
)

# dots.llm1 (transformers models/dots1/modeling_dots1.py, configuration_dots1.py): Qwen3's per-head
# q/k norms with DeepSeek-V3's MoE block (first_k_dense_replace dense layers, shared experts, a
# sigmoid router with a score bias under mlp.gate); no MTP layers.  Neither MindSpeed-LLM nor
# Megatron-Bridge has it: Megatron keys as glm4_moe's (the same blocks)
register(
    Family(
        name="dots1",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --ep 2 --num-layer-list 1,3 --moe-grouped-gemm",),
            mcore_logits=("--tp 2 --ep 2 --moe-grouped-gemm",),
        ),
        model_types=("dots1",),
        architecture="Dots1ForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP + DEEPSEEK_MOE,
        config=config_with(*DEEPSEEK_MOE_CONFIG),
        constants=(("qk_norm", True), ("router_bias", True)),
        megatron_args=deepseek_router_args,
    )
)


def _ernie_dense_layers(cfg: dict) -> tuple[int, ...]:
    """ERNIE 4.5: layer i is MoE iff (i + 1) % moe_layer_interval == 0 and moe_layer_start_index
    <= i <= moe_layer_end_index (-1: the last layer), transformers' rule."""
    n = cfg["num_hidden_layers"]
    step, start = cfg.get("moe_layer_interval") or 1, cfg.get("moe_layer_start_index", 1)
    end = cfg.get("moe_layer_end_index", -1)
    end = n - 1 if end == -1 else end
    return tuple(i for i in range(n) if (i + 1) % step or not start <= i <= end)


# ERNIE 4.5 MoE (transformers models/ernie4_5_moe/modeling_ernie4_5_moe.py): llama attention with
# GLM-style interleaved rotary pairs, DeepSeek's expert / shared-expert names, the router at
# mlp.gate and its score bias as mlp.moe_statics.e_score_correction_bias [1, E] (one expert
# group; canonical [E], a Reshaped entry), dense layers outside moe_layer_start_index ..
# moe_layer_end_index / moe_layer_interval.  Routing: the top-k of softmax + score bias, weighted
# by the renormalised softmax.  Megatron keys as Megatron-Bridge's ernie/ernie_45_bridge.py
# (router.expert_bias for the bias); MindSpeed-LLM has no entry for it.  use_bias (biases on every
# linear but the experts) is not read: such a checkpoint's bias tensors are reported as not
# understood (the released MoE models have none)
register(
    Family(
        name="ernie4_5_moe",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --ep 2 --num-layer-list 3,1",),
            mcore_missing="no: top-k over softmax scores plus a score bias (megatron-core takes an expert bias with sigmoid scores only)",
        ),
        model_types=("ernie4_5_moe",),
        architecture="Ernie4_5_MoeForCausalLM",
        tensors=EMBED_AND_HEAD
        + ATTENTION
        + LLAMA_NORMS
        + GATED_MLP
        + tuple((h, c) for h, c in DEEPSEEK_MOE if c != C + "mlp.router.bias"),
        reshaped=(
            Reshaped(
                L + "mlp.moe_statics.e_score_correction_bias",
                C + "mlp.router.bias",
                lambda spec: (1, spec.num_experts),
            ),
        ),
        config=config_with(
            *moe_config("moe_num_experts", "moe_k", "moe_num_shared_experts"),
            ConfigKey("dense_layers", None, _ernie_dense_layers),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("tied_embeddings", "tie_word_embeddings", True),
            ConfigKey("qkv_bias", None, False),
        ),
        constants=(("router_bias", True),),
        # top-k over softmax + score bias, weights renormalised: megatron-core 0.16 applies a
        # score bias only with sigmoid scores, so the closest form is the plain softmax top-k
        megatron_args=lambda cfg: {
            "rotary_interleaved": True,
            "moe_router_score_function": "softmax",
            "moe_router_pre_softmax": False,
        },
    )
)

# Granite MoE (transformers models/granitemoe/modeling_granitemoe.py; granitemoeshared adds a
# shared MLP): llama attention and norms; Granite's stacked experts and router (GRANITE_MOE and
# GRANITE_EXPERTS in blocks.py).  The muP multipliers (embedding_multiplier, residual_multiplier,
# logits_scaling) are config values carried through; attention_multiplier, the softmax scale, is
# megatron-core's softmax_scale.  Neither MindSpeed-LLM nor Megatron-Bridge has the family:
# Megatron keys as Mixtral's
GRANITE_MOE_CONFIG = config_with(
    ConfigKey("num_experts", "num_local_experts"),
    ConfigKey("moe_topk", "num_experts_per_tok"),
    ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
)
register(
    Family(
        name="granitemoe",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --ep 2 --num-layer-list 3,1 --norm-names te",),
            mcore_logits=("--tp 2 --ep 2",),
        ),
        model_types=("granitemoe",),
        architecture="GraniteMoeForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GRANITE_MOE,
        stacked=GRANITE_EXPERTS,
        config=GRANITE_MOE_CONFIG,
        megatron_args=lambda cfg: {"softmax_scale": cfg.get("attention_multiplier")},
    )
)
# Granite MoE with a shared MLP beside the experts: shared_mlp.input_linear [2S, H] = [gate; up]
# and shared_mlp.output_linear [H, S] (S = shared_intermediate_size; 0: none)
register(
    Family(
        name="granitemoeshared",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --ep 2 --num-layer-list 1,3 --moe-grouped-gemm",),
            mcore_logits=("--pp 2 --ep 2",),
        ),
        model_types=("granitemoeshared",),
        architecture="GraniteMoeSharedForCausalLM",
        tensors=EMBED_AND_HEAD
        + ATTENTION
        + LLAMA_NORMS
        + GRANITE_MOE
        + ((L + "shared_mlp.output_linear.weight", C + "mlp.shared.down.weight"),),
        packed=(
            Packed(
                L + "shared_mlp.input_linear.weight",
                (C + "mlp.shared.gate.weight", C + "mlp.shared.up.weight"),
                ("shared_ffn_hidden_size", "shared_ffn_hidden_size"),
            ),
        ),
        stacked=GRANITE_EXPERTS,
        config=GRANITE_MOE_CONFIG + (ConfigKey("shared_ffn_hidden_size", "shared_intermediate_size", 0),),
        megatron_args=lambda cfg: {"softmax_scale": cfg.get("attention_multiplier")},
    )
)


def _llama4_dense_layers(cfg: dict) -> tuple[int, ...]:
    """Llama 4: the layers not in moe_layers (default every interleave_moe_layer_step-th)."""
    n, step = cfg["num_hidden_layers"], cfg.get("interleave_moe_layer_step") or 1
    moe = cfg.get("moe_layers")
    moe = set(range(step - 1, n, step) if moe is None else moe)
    return tuple(i for i in range(n) if i not in moe)


def _llama4_args(cfg: dict) -> dict:
    """Llama 4 as megatron-core TransformerConfig fields (Megatron-Bridge's Llama4ModelProvider):
    rotary on interleaved pairs, no rotary (and no q/k norm) on every no_rope_layer_interval-th
    layer, a weightless L2 q/k norm, top-k logits through a sigmoid (not renormalised) scaling the
    expert's input; chunked attention beyond attention_chunk_size tokens is Bridge's own."""
    n = cfg["num_hidden_layers"]
    interval = cfg.get("no_rope_layer_interval") or 4
    uses_rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return {
        "rotary_interleaved": True,
        "qk_l2_norm": bool(cfg.get("use_qk_norm", True)),
        "no_rope_freq": [int(not r) for r in uses_rope],
        "moe_router_score_function": "sigmoid",
        "moe_router_pre_softmax": False,
        "moe_apply_probs_on_input": True,
        "attention_chunk_size": cfg.get("attention_chunk_size"),
        **(
            {"use_rope_scaling": True, "rope_scaling_factor": rope.get("factor")}
            if rope.get("rope_type", rope.get("type")) == "llama3"
            else {}
        ),
    }


# Llama 4's text model (transformers models/llama4/modeling_llama4.py, model_type llama4_text):
# llama attention (biases with attention_bias), the MLP under feed_forward.*: a dense MLP of
# intermediate_size_mlp in the layers outside moe_layers, else a router, one shared expert and
# the routed experts stacked per layer as [in, out] matrices (experts.gate_up_proj [E, H, 2F] with
# gate then up along the last dim, experts.down_proj [E, F, H]).  Megatron keys as Mixtral's
# per-expert ones (Megatron-Bridge's Llama4 mapping); MindSpeed-LLM has no entry for it.  The
# multimodal release (Llama4ForConditionalGeneration, language_model.* keys) is not read
LLAMA4_MLP = (
    (L + "feed_forward.gate_proj.weight", C + "mlp.gate.weight"),
    (L + "feed_forward.up_proj.weight", C + "mlp.up.weight"),
    (L + "feed_forward.down_proj.weight", C + "mlp.down.weight"),
    (L + "feed_forward.router.weight", C + "mlp.router.weight"),
    (L + "feed_forward.shared_expert.gate_proj.weight", C + "mlp.shared.gate.weight"),
    (L + "feed_forward.shared_expert.up_proj.weight", C + "mlp.shared.up.weight"),
    (L + "feed_forward.shared_expert.down_proj.weight", C + "mlp.shared.down.weight"),
)
register(
    Family(
        name="llama4_text",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --ep 2 --num-layer-list 3,1",), mcore_logits=("--tp 2 --ep 2 --etp 1",)
        ),
        model_types=("llama4_text",),
        architecture="Llama4ForCausalLM",
        tensors=EMBED_AND_HEAD
        + PROJECTIONS
        + ((L + "self_attn.o_proj.bias", C + "attn.o.bias"),)
        + ((L + "input_layernorm.weight", C + "attn_norm.weight"),)
        + LLAMA_NORMS
        + LLAMA4_MLP,
        stacked=(
            ExpertStack(
                L + "feed_forward.experts.gate_up_proj",
                (EXPERT + "gate.weight", EXPERT + "up.weight"),
                transposed=True,
            ),
            ExpertStack(L + "feed_forward.experts.down_proj", (EXPERT + "down.weight",), transposed=True),
        ),
        config=config_with(
            ConfigKey("ffn_hidden_size", "intermediate_size_mlp"),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("o_bias", "attention_bias", False),
            ConfigKey("num_experts", "num_local_experts"),
            ConfigKey("moe_topk", "num_experts_per_tok"),
            ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
            ConfigKey("shared_ffn_hidden_size", "intermediate_size"),
            ConfigKey("dense_layers", None, _llama4_dense_layers),
        ),
        megatron_args=_llama4_args,
    )
)


def _exaone_moe_args(cfg: dict) -> dict:
    """EXAONE MoE as megatron-core TransformerConfig fields (Megatron-Bridge's exaone_moe
    provider): DeepSeek-V3's router; with a sliding_window, the sliding layers (layer_types, else
    all but every sliding_window_pattern-th) attend within it and only they have rotary."""
    window, n = cfg.get("sliding_window"), cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    pattern = cfg.get("sliding_window_pattern")
    if types is None and isinstance(pattern, int) and pattern > 0:
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    sliding = [int(t == "sliding_attention") for t in types or ()]
    left = window - 1 if isinstance(window, int) and window > 0 and any(sliding) else None
    return {
        **deepseek_router_args(cfg),
        "window_size": None if left is None else [left, 0],
        "window_attn_skip_freq": None if left is None else sliding,
        "no_rope_freq": None if left is None else [1 - s for s in sliding],
    }


# EXAONE MoE (K-EXAONE; transformers models/exaone_moe/modular_exaone_moe.py): OLMoE's pre-norm
# layer with EXAONE 4's attention (per-head q/k norms before the rotary; with a sliding_window only
# the sliding layers are windowed and rotated) and DeepSeek-V3's MoE block, its score bias at
# mlp.e_score_correction_bias, dense layers from mlp_layer_types (first_k_dense_replace).
# Megatron keys as Megatron-Bridge's exaone/exaone_moe/exaone_moe_bridge.py; MindSpeed-LLM has no
# entry for it.  The release's MTP layer (mtp.*, a dense layer transformers ignores) is not read
EXAONE_MOE = tuple(
    (h.replace("mlp.gate.e_score_correction_bias", "mlp.e_score_correction_bias"), c) for h, c in DEEPSEEK_MOE
)
register(
    Family(
        name="exaone_moe",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --ep 2 --num-layer-list 1,3",), mcore_logits=("--pp 2 --ep 2",)
        ),
        model_types=("exaone_moe",),
        architecture="ExaoneMoeForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP + EXAONE_MOE,
        config=config_with(
            *moe_config(),
            ConfigKey("dense_layers", None, mlp_dense_layers),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("qkv_bias", None, False),
        ),
        constants=(("qk_norm", True), ("router_bias", True)),
        megatron_args=_exaone_moe_args,
    )
)


def _afmoe_args(cfg: dict) -> dict:
    """AFMoE as megatron-core TransformerConfig fields where they exist: sigmoid router scores
    with the score bias, top-k renormalised and scaled by route_scale; the sliding layers
    (layer_types, else all but every global_attn_every_n_layers-th) windowed and the only ones
    with rotary; with mup_enabled embeddings times sqrt(hidden_size) (ckpt-ir's marker, as
    gemma3_text's)."""
    sliding = [int(t == "sliding_attention") for t in cfg.get("layer_types") or ()]
    window = cfg.get("sliding_window")
    left = window - 1 if isinstance(window, int) and window > 0 and any(sliding) else None
    return {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_pre_softmax": False,
        "moe_router_topk_scaling_factor": cfg.get("route_scale"),
        "window_size": None if left is None else [left, 0],
        "window_attn_skip_freq": None if left is None else sliding,
        "no_rope_freq": [1 - s for s in sliding] or None,
        "apply_embedding_scaling": bool(cfg.get("mup_enabled")),
    }


# AFMoE (Arcee Trinity; transformers models/afmoe/modular_afmoe.py): per-head q/k norms, an output
# gate (self_attn.gate_proj [heads * head_dim, hidden]: the attention output times its sigmoid,
# channel by channel, before o_proj; the role attn.gate, split over TP with the heads), rotary and
# a window only on the sliding layers, sandwich norms (post_attention_layernorm after attention,
# pre_mlp_layernorm / post_mlp_layernorm around the MLP: the post_norms roles), the first
# num_dense_layers dense, then a sigmoid router (mlp.router.gate) with its score bias
# (mlp.expert_bias), DeepSeek-named shared experts and Qwen-named experts.  Neither MindSpeed-LLM
# nor Megatron-Bridge has it: keys as glm4's post norms and DeepSeek's MoE block, the gate under
# self_attention.linear_gate (megatron-core's own gated attention packs it into linear_qkv, which
# no consumer of these files reads: megatron-core has no sandwich norms)
AFMOE_LAYER = (
    (L + "input_layernorm.weight", C + "attn_norm.weight"),
    (L + "self_attn.gate_proj.weight", C + "attn.gate.weight"),
    (L + "post_attention_layernorm.weight", C + "post_attn_norm.weight"),
    (L + "pre_mlp_layernorm.weight", C + "mlp_norm.weight"),
    (L + "post_mlp_layernorm.weight", C + "post_mlp_norm.weight"),
    (L + "mlp.router.gate.weight", C + "mlp.router.weight"),
    (L + "mlp.expert_bias", C + "mlp.router.bias"),
    *((h, c) for h, c in DEEPSEEK_MOE if "experts" in h),  # experts, shared_experts
)
register(
    Family(
        name="afmoe",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --ep 2 --num-layer-list 1,3",),
            mcore_missing="no: attention output gate, and no post-attention / post-MLP norms",
        ),
        model_types=("afmoe",),
        architecture="AfmoeForCausalLM",
        tensors=EMBED_AND_HEAD
        + tuple((h, c) for h, c in ATTENTION if "layernorm" not in h)
        + GATED_MLP
        + AFMOE_LAYER,
        config=config_with(
            ConfigKey("head_dim", "head_dim", 128),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            *moe_config(),
            ConfigKey(
                "dense_layers",
                None,
                lambda cfg: tuple(range(min(cfg.get("num_dense_layers", 1), cfg["num_hidden_layers"]))),
            ),
        ),
        constants=(("qk_norm", True), ("post_norms", True), ("router_bias", True)),
        megatron_args=_afmoe_args,
    )
)
# AFMoE's output gate is the role attn.gate.weight of the out_gate block (ir/roles.py)

# Hunyuan V1 MoE: Hunyuan's q/k norms; the MoE layer has one shared MLP as wide as the experts and
# a router named gate.wg
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
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_missing="no: q/k norm after rotary",
        ),
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
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm --norm-names te",
            ),
            mcore_missing="no: sparsemixer routing; o bias without MLP biases",
            mindspeed=(
                (
                    "phi3.5-moe-tp2ep2-grouped",
                    "differs: MindSpeed drops the LayerNorm, o_proj and lm_head biases",
                ),
                ("phi3.5-moe-tp2pp2", "differs: MindSpeed drops the LayerNorm, o_proj and lm_head biases"),
            ),
        ),
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
        megatron_args=deepseek_router_args,  # sigmoid scores with a score-correction bias
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_missing="no: full-width q/k norm (Megatron-Bridge's own module)",
            mindspeed=(
                ("minimax_m2-tp2ep2-grouped", "identical"),
                ("minimax_m2-tp2pp2", "identical"),
            ),
        ),
    )
)


def _hy_v3_router(cfg: dict) -> dict:
    """Hunyuan V3 routing: sigmoid scores with a score-correction bias, top-k without groups,
    weights renormalised and scaled by router_scaling_factor."""
    return {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_pre_softmax": False,
        "moe_router_topk_scaling_factor": cfg.get("router_scaling_factor"),
    }


def _hy_v3_dense_layers(cfg: dict) -> tuple[int, ...]:
    """mlp_layer_types, else the first ``first_k_dense_replace`` layers (transformers: 1)."""
    if cfg.get("mlp_layer_types") is not None:
        return mlp_dense_layers(cfg)
    return tuple(range(min(cfg.get("first_k_dense_replace", 1), cfg["num_hidden_layers"])))


# Hunyuan V3 (HYV3): GQA with per-head q/k norms under the usual q_norm / k_norm names (V1 calls
# them query_layernorm / key_layernorm), a router at mlp.router.gate with its score bias at
# mlp.expert_bias, shared experts at mlp.shared_mlp, dense first layers from mlp_layer_types
HY_V3_MOE = (
    (L + "mlp.router.gate.weight", C + "mlp.router.weight"),
    (L + "mlp.expert_bias", C + "mlp.router.bias"),
    *HUNYUAN_MOE[1:],  # experts and shared_mlp as in Hunyuan V1
)
# its multi-token-prediction layers are model.layers.{num_hidden_layers + k} (transformers ignores
# them): a MoE decoder layer plus DeepSeek-V3's enorm / hnorm / eh_proj, the head norm named
# final_layernorm, and no embedding / head copies (MindSpeed-LLM's HYV3 mtp_layers_* entries)
HY_V3_MTP = tuple(
    (L + hf, C + c)
    for hf, c in (
        ("enorm.weight", "mtp.enorm.weight"),
        ("hnorm.weight", "mtp.hnorm.weight"),
        ("eh_proj.weight", "mtp.eh_proj.weight"),
        ("final_layernorm.weight", "mtp.norm.weight"),
    )
)
register(
    Family(
        name="hy_v3",
        model_types=("hy_v3",),
        architecture="HYV3ForCausalLM",
        tensors=EMBED_AND_HEAD + ATTENTION + LLAMA_NORMS + GATED_MLP + HY_V3_MOE + HY_V3_MTP,
        config=config_with(
            *moe_config(),
            ConfigKey("dense_layers", None, _hy_v3_dense_layers),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            # read-only: the release's config has no MTP count; the frontend counts the MTP layers
            # present (a layer holding enorm / hnorm / eh_proj is one)
            ConfigKey("mtp_layers", None, lambda cfg: cfg.get("num_nextn_predict_layers") or 0),
        ),
        constants=(("qk_norm", True), ("router_bias", True)),
        mindspeed_names=("HYV3",),
        megatron_args=_hy_v3_router,
        tested=Tested(
            round_trip=(
                "--tp 2 --ep 2",
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--tp 2 --pp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_logits=(
                "--pp 2 --ep 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mindspeed=(
                ("HYV3-mtp-tp2ep2", "identical"),
                ("HYV3-mtp-tp2pp2ep2-grouped", "identical"),
            ),
        ),
    )
)

# OLMoE: llama pre-norms, full-width q/k norms (kept under q_layernorm / k_layernorm by
# Megatron-Bridge's OLMoE bridge), Qwen-MoE-named experts and router (mlp.gate), softmax routing
# over all experts without renormalising the top-k (norm_topk_prob false)
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
        megatron_args=qwen_router_args,
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_missing="no: full-width q/k norm (Megatron-Bridge's OLMoESelfAttention)",
        ),
    )
)

# gpt-oss: biases on q/k/v/o, on the router and on every expert; a learned softmax offset per head
# ("sinks"); each layer's experts stacked in one tensor per kind, matrices stored [in, out] and
# gate/up interleaved column by column (gate = [..., 0::2], up = [..., 1::2]).  Megatron-Bridge
# de-interleaves fc1 to [gate; up] per expert, as the canonical roles hold it; the sliding window
# and rope settings are config values, named in the args as megatron-core's TransformerConfig fields.
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
    rope = rope_parameters(cfg)
    window = cfg.get("sliding_window")
    return {
        "add_bias_linear": True,
        "softmax_type": "learnable",
        "window_size": [window - 1, 0] if window else None,
        "window_attn_skip_freq": window_skip_freq(cfg),
        "swiglu": False,
        "quick_geglu": True,  # (up + 1) * gate * sigmoid(1.702 gate), both clamped
        "glu_linear_offset": 1.0,
        "activation_func_clamp_value": cfg.get("swiglu_limit"),
        "moe_router_pre_softmax": False,
        "moe_router_load_balancing_type": "none",
        "rotary_base": rope.get("rope_theta", cfg.get("rope_theta")),
        **yarn_args(cfg),
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
        tested=Tested(
            round_trip=(
                "--ckpt-format torch_dist",
                "--tp 2 --ep 2 --etp 1",
                "--tp 2 --pp 2 --etp 1",
            ),
            mcore_logits=(
                "--pp 2 --ep 2",
                "--tp 2 --ep 2 --etp 1",
                "--tp 2 --pp 2 --etp 1",
            ),
        ),
    )
)


# MiMo-V2-Flash (modeling_mimo_v2_flash.py): layer_types' sliding-window layers have twice the
# config's key / value heads and a softmax sink per head (the attention block: the checkpoint's
# attention_sink_bias), its full-attention layers the config's heads and no sinks (block
# global_attention); queries and keys of head_dim (192), values of v_head_dim (128); attention_bias
# on q / k / v only; mlp_layer_types dense MLPs or DeepSeek-V3's MoE block without shared experts
# (sigmoid router in fp32 with a score bias, group-limited top-k).  Megatron keys: Megatron-Bridge's
# mimo_v2_flash_bridge.py (the sinks as core_attention.softmax_offset), args its provider's fields.
# The checkpoints' MTP layers (model.mtp.*, which transformers ignores) are not read.
def _mimo_layer_types(cfg: dict[str, Any]) -> list[str]:
    """transformers' default: layer 0 and every 6th layer full attention, the others sliding."""
    n = cfg["num_hidden_layers"]
    return list(
        cfg.get("layer_types")
        or ["full_attention" if i == 0 or not (i + 1) % 6 else "sliding_attention" for i in range(n)]
    )


def _mimo_mlp_types(cfg: dict[str, Any]) -> list[str]:
    return list(cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (cfg["num_hidden_layers"] - 1))


def _mimo_blocks(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    return tuple(
        ("global_attention" if t == "full_attention" else "attention", "moe" if m == "sparse" else "mlp")
        for t, m in zip(_mimo_layer_types(cfg), _mimo_mlp_types(cfg))
    )


def _mimo_args(cfg: dict[str, Any]) -> dict[str, Any]:
    types = _mimo_layer_types(cfg)
    rope = cfg.get("rope_parameters") or {}
    full, swa = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    return {
        **deepseek_router_args(cfg),
        "moe_router_load_balancing_type": "none",
        "hybrid_attention_pattern": [int(t == "sliding_attention") for t in types],
        "window_size": [cfg["sliding_window"] - 1, 0] if cfg.get("sliding_window") else None,
        "rotary_base": [swa.get("rope_theta"), full.get("rope_theta")],
        "rotary_percent": full.get("partial_rotary_factor", 1.0),
        "v_head_dim": cfg.get("v_head_dim"),
        "num_query_groups": cfg["num_key_value_heads"],
        "full_attn_num_query_groups": cfg["num_key_value_heads"],
        "swa_num_query_groups": 2 * cfg["num_key_value_heads"],
        "attention_value_scale": cfg.get("attention_value_scale"),
    }


register(
    Family(
        name="mimo_v2_flash",
        tested=Tested(
            round_trip=(
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--pp 2 --ep 2 --num-layer-list 1,3",
            ),
            mcore_missing="no: megatron-core 0.16 has no layers of two key / value head counts, values narrower than keys, nor sinks in some layers only",
        ),
        model_types=("mimo_v2_flash",),
        architecture="MiMoV2FlashForCausalLM",
        tensors=EMBED_AND_HEAD
        + ATTENTION
        + ((L + "self_attn.attention_sink_bias", C + "attn.sinks"),)
        + LLAMA_NORMS
        + GATED_MLP
        + DEEPSEEK_MOE,
        config=config_with(
            ConfigKey("head_dim", "head_dim", 192),
            ConfigKey("v_head_dim", "v_head_dim", 128),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5, aliases=("layernorm_epsilon",)),
            ConfigKey("num_kv_heads", None, lambda cfg: 2 * cfg["num_key_value_heads"]),
            ConfigKey("global_kv_heads", "num_key_value_heads"),
            ConfigKey("num_experts", "n_routed_experts", aliases=("num_local_experts",)),
            ConfigKey("moe_topk", "num_experts_per_tok"),
            ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size"),
            ConfigKey(
                "dense_layers",
                None,
                lambda cfg: tuple(i for i, m in enumerate(_mimo_mlp_types(cfg)) if m != "sparse"),
            ),
            ConfigKey("layer_blocks", None, _mimo_blocks),
        ),
        constants=(("attn_sinks", True), ("router_bias", True)),
        megatron_args=_mimo_args,
    )
)
