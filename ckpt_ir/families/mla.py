"""Multi-latent-attention families (deepseek_v3, sarvam_mla, deepseek_v2, glm4_moe_lite, minicpm3, deepseek_v32,
glm_moe_dsa, plm): DeepSeek's MLA (q-LoRA or a plain q_proj, a compressed key/value projection), with
DeepSeek's MoE block or a dense MLP, and DeepSeek sparse attention's lightning indexer.  One table
entry each, built from the fragments in ``blocks.py``.

Each entry's HF names and config keys were checked against transformers 5's modeling and
configuration files (PLM, a remote-code model, against its published checkpoint: see its entry);
Megatron names follow MindSpeed-LLM v2's ``configs/checkpoint/model_cfg.json``.
"""

from __future__ import annotations

from ckpt_ir.families import ConfigKey, ExpertStack, Family, Tested, register
from ckpt_ir.families.blocks import (
    DEEPSEEK_MOE,
    DEEPSEEK_MOE_CONFIG,
    EMBED_AND_HEAD,
    GATED_MLP,
    LLAMA_NORMS,
    MTP,
    SARVAM_MOE_CONFIG,
    C,
    L,
    config_with,
    deepseek_router_args,
    in_sublayer,
    mlp_dense_layers,
)

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
        megatron_args=deepseek_router_args,
        tested=Tested(
            round_trip=(
                "--pp 3",
                "--tp 2",
                "--tp 1 --pp 1",
                "--tp 2 --ep 2",
                "--tp 2 --ep 4 --etp 1",
                "--tp 2 --pp 3 --make-vocab-size-divisible-by 48",
                "--tp 2 --pp 3 --ep 2 --moe-grouped-gemm",
            ),
            mcore_logits=(
                "--ckpt-format torch_dist",
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--tp 2 --pp 2 --num-layer-list 1,3",
                "--tp 2 --pp 2 --mla-keys mcore",
                "--pp 2 --ep 2 --mla-keys mcore",
            ),
        ),
    )
)

# Sarvam-105B (model_type "sarvam_mla"): DeepSeek-V3's names without MTP layers -- Megatron-Bridge's
# models/sarvam/sarvam_mla_bridge.py:55-103 maps model.embed_tokens, self_attn.q_proj (no q-LoRA),
# kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj, mlp.gate.e_score_correction_bias and
# the experts / shared_experts onto GPTModel's MLA keys.  transformers 5 runs it as
# DeepseekV3ForCausalLM (models/sarvam_mla: SarvamMLAConfig(DeepseekV3Config)); its load-time
# conversion (conversion_mapping.py: qwen2_moe's, experts stacked) is undone by save_pretrained,
# which writes the experts one by one: one naming.  The release config spells the expert counts
# num_experts / num_shared_experts (SarvamMLAConfig.attribute_map); the released checkpoints have
# no MTP weights (its num_mtp_layers docstring).
register(
    Family(
        name="sarvam_mla",
        model_types=("sarvam_mla",),
        architecture="SarvamMLAForCausalLM",
        tensors=DEEPSEEK_TENSORS,
        config=config_with(*SARVAM_MOE_CONFIG, *MLA_CONFIG),
        constants=(("router_bias", True),),
        megatron_args=deepseek_router_args,
        tested=Tested(
            round_trip=(
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--pp 2 --ep 2 --num-layer-list 1,2",
            ),
            mcore_missing="not run: DeepSeek-V3's GPTModel (deepseek_v3), which its cases check",
        ),
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
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_logits=(
                "--pp 2 --ep 2",
                "--tp 2 --ep 2",
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--tp 2 --ep 2 --mla-keys mcore",
            ),
            mindspeed=(
                ("deepseek2-lite-tp2ep2-grouped", "identical"),
                ("deepseek2-lite-tp2pp2", "identical"),
            ),
        ),
    )
)
# GLM-4.7-Flash (transformers models/glm4_moe_lite/modular_glm4_moe_lite.py: DeepSeek-V3's
# attention in GLM-4.5's MoE layer): DeepSeek-V3's tensors, dense layers from mlp_layer_types,
# GLM-4.5's MTP layers (model.layers.{num_hidden_layers + k}); Megatron keys and router settings
# as Megatron-Bridge's glm/glm47_flash_bridge.py (DeepSeek's common mapping, sigmoid router with
# the score bias); MindSpeed-LLM has no entry for it
register(
    Family(
        name="glm4_moe_lite",
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --ep 2 --num-layer-list 3,1 --moe-grouped-gemm",),
            mcore_logits=("--tp 2 --pp 2 --ep 2 --etp 1 --num-layer-list 1,3",),
        ),
        model_types=("glm4_moe_lite",),
        architecture="Glm4MoeLiteForCausalLM",
        tensors=DEEPSEEK_TENSORS + MTP,
        config=config_with(
            *DEEPSEEK_MOE_CONFIG,
            *MLA_CONFIG,
            ConfigKey("dense_layers", None, mlp_dense_layers),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            # read-only: transformers saves no MTP weights, so the frontend counts the layers present
            ConfigKey("mtp_layers", None, lambda cfg: cfg.get("num_nextn_predict_layers") or 0),
        ),
        constants=(("router_bias", True),),
        megatron_args=deepseek_router_args,
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
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --pp 2 --noop-layers 2,5",
            ),
            mcore_missing="no: MLA's interleaved rotary order, muP scales, per-norm epsilons",
        ),
    )
)


def _shared_index_layers(cfg: dict) -> tuple[int, ...]:
    """Layers whose DSA attention reuses the previous layer's top-k and so has no indexer: the
    ``"shared"`` entries of GLM-5's ``indexer_types``, else its ``index_topk_pattern`` ("F" / "S")
    or ``index_topk_freq`` / ``index_skip_topk_offset`` schedule (transformers' rule); none when
    the config names no schedule (DeepSeek-V3.2: an indexer in every layer)."""
    types = cfg.get("indexer_types")
    if types is None and isinstance(cfg.get("index_topk_pattern"), str):
        types = [{"F": "full", "S": "shared"}[c] for c in cfg["index_topk_pattern"]]
    if types is not None:
        return tuple(i for i, t in enumerate(types) if t == "shared")
    freq, offset = cfg.get("index_topk_freq"), cfg.get("index_skip_topk_offset")
    if not freq or offset is None:
        return ()
    return tuple(i for i in range(cfg["num_hidden_layers"]) if max(i - offset + 1, 0) % max(freq, 1))


# DeepSeek sparse attention: the lightning indexer beside MLA (LayerNorm k_norm with a bias)
INDEXER = tuple(
    (L + f"self_attn.indexer.{t}", C + f"attn.indexer.{t}")
    for t in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
)
DSA_CONFIG = (
    *DEEPSEEK_MOE_CONFIG,
    *MLA_CONFIG,
    ConfigKey("dense_layers", None, mlp_dense_layers),
    # read-only: transformers saves no MTP weights, so the frontend counts the layers present
    ConfigKey("mtp_layers", None, lambda cfg: cfg.get("num_nextn_predict_layers") or 0),
    ConfigKey("shared_index_layers", None, _shared_index_layers),
)

# DeepSeek-V3.2: DeepSeek-V3 (MLA with q-LoRA, shared experts, score bias, MTP) plus the indexer
register(
    Family(
        name="deepseek_v32",
        model_types=("deepseek_v32",),
        architecture="DeepseekV32ForCausalLM",
        tensors=DEEPSEEK_TENSORS + INDEXER + MTP,
        config=config_with(
            *DSA_CONFIG,
            ConfigKey("index_heads", "index_n_heads", 64),
            ConfigKey("index_head_dim", "index_head_dim", 128),
        ),
        constants=(("router_bias", True),),
        mindspeed_names=("deepseek32",),
        megatron_args=deepseek_router_args,
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2",
                "--tp 2 --ep 2 --moe-grouped-gemm",
            ),
            mcore_missing="no: DSAttention needs fast_hadamard_transform (CUDA) and bf16",
            mindspeed=(
                ("deepseek32-mtp-tp2pp2ep2", "identical"),
                ("deepseek32-tp2ep2-grouped", "identical"),
                ("deepseek32-tp2pp2", "identical"),
            ),
        ),
    )
)
# GLM-5: the same MLA + DSA + DeepSeek MoE tensors; "shared" indexer layers carry no indexer
register(
    Family(
        name="glm_moe_dsa",
        model_types=("glm_moe_dsa",),
        architecture="GlmMoeDsaForCausalLM",
        tensors=DEEPSEEK_TENSORS + INDEXER + MTP,
        config=config_with(
            *DSA_CONFIG,
            ConfigKey("index_heads", "index_n_heads", 32),
            ConfigKey("index_head_dim", "index_head_dim", 128),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
        ),
        constants=(("router_bias", True),),
        mindspeed_names=("glm5",),
        megatron_args=deepseek_router_args,
        tested=Tested(
            round_trip=(
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--tp 2 --pp 2 --num-layer-list 1,3",
            ),
            mcore_missing="no: DSAttention needs fast_hadamard_transform (CUDA) and bf16",
            mindspeed=(
                ("glm5-tp2ep2-grouped", "identical"),
                ("glm5-tp2pp2-grouped", "identical"),
            ),
        ),
    )
)

# PLM (PLM-Team/PLM-1.8B, model_type "plm", PLMForCausalLM): a remote-code model (its modeling file
# lives in the model repository; see remote_code.py for what that means here).  DeepSeek-V2-Lite's
# attention (MLA without q-LoRA: q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj) and
# a non-gated squared-ReLU MLP, up_proj -> relu2 -> down_proj.  The MLP names are the released
# checkpoint's: MindSpeed-LLM's "plm" entry (fc_type up_down), the PLM team's vLLM loader and
# llama.cpp's PLM converter all read mlp.up_proj / mlp.down_proj; the unmerged transformers port
# (modular_plm.py, PLMMLP = CLIPMLP) would name them fc1 / fc2, a layout no published checkpoint
# has, so it is not read.  Megatron: squared_relu, no swiglu; the MLA args as DeepSeek-V2's.
register(
    Family(
        name="plm",
        model_types=("plm",),
        architecture="PLMForCausalLM",
        tensors=EMBED_AND_HEAD
        + MLA_ATTENTION
        + LLAMA_NORMS
        + (
            (L + "mlp.up_proj.weight", C + "mlp.fc1.weight"),
            (L + "mlp.down_proj.weight", C + "mlp.down.weight"),
        ),
        config=config_with(*MLA_CONFIG, ConfigKey("activation", "hidden_act", "relu2")),
        constants=(("gated_mlp", False),),
        mindspeed_names=("plm",),
        megatron_args=lambda cfg: {"squared_relu": cfg.get("hidden_act", "relu2") == "relu2"},
        tested=Tested(
            round_trip=(
                "--pp 2 --vpp-layers 1",
                "--tp 2 --pp 2",
                "--tp 2 --pp 2 --num-layer-list 1,3",
            ),
            mcore_missing="not run: expressible (MLA, squared-ReLU MLP) but no transformers model gives reference logits",
            mindspeed=(
                ("plm-tp1pp2-layers", "identical"),
                ("plm-tp2pp2", "identical"),
            ),
        ),
    )
)


# LongCat-Flash (transformers models/longcat_flash, MindSpeed-LLM's "longcat"): every layer is two
# sublayers, each an input norm, MLA with q-LoRA, a post-attention norm and a dense SwiGLU MLP, held
# in ModuleLists (input_layernorm.0, self_attn.1, mlps.0, ...), and a shortcut MoE beside them that
# reads sublayer 0's post-attention norm.  Its router scores zero_expert_num identity experts after
# the routed ones (router rows, no weights).  Layers count in num_layers (transformers' derived
# num_hidden_layers is twice that).  Megatron: MindSpeed-LLM's layer (model_builder.py:
# input_layernorm_<k>, self_attention_<k>, pre_mlp_layernorm_<k>, mlps_<k>; mlp.router / experts).
LONGCAT_LAYER = ("sub0.mla", "moe", "sub0.mlp", "sub1.mla", "sub1.mlp")
_LONGCAT_MODULES = {
    "input_layernorm": "input_layernorm.{k}",
    "post_attention_layernorm": "post_attention_layernorm.{k}",
    "self_attn": "self_attn.{k}",
    "mlp": "mlps.{k}",
}
_LONGCAT_SUBLAYER = MLA_ATTENTION + LLAMA_NORMS + GATED_MLP


def _zero_experts(cfg: dict) -> int:
    """zero_expert_num: transformers' default (256) when absent, none when null."""
    return 0 if "zero_expert_num" in cfg else 256


def _longcat_router(cfg: dict) -> dict:
    """LongCat-Flash routing (modeling_longcat_flash.py LongcatFlashTopkRouter): a softmax over the
    routed and zero experts in fp32, top-k of the scores plus the score-correction bias, weights
    the scores times routed_scaling_factor; MLA scales q and the kv latent by sqrt(hidden / rank).
    The args are MindSpeed-LLM's (its LongCat pretraining script)."""
    zero = cfg.get("zero_expert_num", _zero_experts(cfg))
    return {
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": True,
        "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": cfg.get("routed_scaling_factor"),
        "moe_router_dtype": "fp32",
        "num_zero_experts": zero or None,
        "enable_mla_scale_q_lora": True,
        "enable_mla_scale_kv_lora": True,
    }


register(
    Family(
        name="longcat_flash",
        model_types=("longcat_flash",),
        architecture="LongcatFlashForCausalLM",
        tensors=EMBED_AND_HEAD
        + in_sublayer(_LONGCAT_SUBLAYER, 0, _LONGCAT_MODULES)
        + in_sublayer(_LONGCAT_SUBLAYER, 1, _LONGCAT_MODULES)
        + (
            (L + "mlp.router.classifier.weight", C + "mlp.router.weight"),
            (L + "mlp.router.e_score_correction_bias", C + "mlp.router.bias"),
            *((h, c) for h, c in DEEPSEEK_MOE if ".experts.{e}." in h),
        ),
        config=config_with(
            *MLA_CONFIG,
            ConfigKey("num_layers", "num_layers"),
            ConfigKey("ffn_hidden_size", "ffn_hidden_size"),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey("num_experts", "n_routed_experts"),
            ConfigKey("moe_topk", "moe_topk"),
            ConfigKey("moe_ffn_hidden_size", "expert_ffn_hidden_size"),
            ConfigKey("zero_experts", "zero_expert_num", _zero_experts),
            ConfigKey("layer_blocks", None, lambda cfg: (LONGCAT_LAYER,) * cfg["num_layers"]),
        ),
        constants=(("router_bias", True),),
        mindspeed_names=("longcat",),
        megatron_args=_longcat_router,
        tested=Tested(
            round_trip=(
                "--tp 2 --ep 2",
                "--tp 2 --pp 2 --ep 2 --etp 1 --num-layer-list 2,1 --moe-grouped-gemm",
                "--pp 2 --vpp-layers 1 --noop-layers 3",
            ),
            mcore_missing="no: megatron-core has no LongCat layer (MindSpeed-LLM's own layer spec; zero experts)",
            mindspeed=(
                ("longcat-tp2ep2", "identical; both read back to HF"),
                ("longcat-tp2ep2-etp1-grouped", "identical; both read back to HF"),
                ("longcat-tp2pp2-layers", "identical; both read back to HF"),
            ),
        ),
    )
)


# HY-V4's text model (transformers models/hy_v4, model_type hy_v4; HY4-VL's language model): MLA
# with q-LoRA and DeepSeek sparse attention's indexer ("shared" indexer_types layers reuse the
# previous top-k: no indexer), an output gate (block out_gate: self_attn.linear_gate [heads x
# v_head_dim, hidden]) and a softmax sink per head (learnable_sink_param); hyper-connections in
# every layer (block hc, hc_mult streams) in HY-V4's independent form: pre and post mappings, no
# comb (fn [2 x hc_mult, hc_mult x hidden], base [2 x hc_mult], scale [2]), and the model's head
# mixer DeepSeek-V4's (hc_head); mlp_layer_types dense MLPs (gate under mlp.linear_gate) or a MoE
# of stacked experts ([E, 2F, H] gate_up_proj, [E, H, F] down_proj), one shared expert and a
# sigmoid router in fp32 with a score bias.  Saved as the hub names transformers' conversion
# mapping renames on load (hc_pre.hc_attn_layer.hc_fn, ...).  Neither MindSpeed-LLM nor
# Megatron-Bridge has it: Megatron keys are MindSpeed-LLM's MLA and DSA modules, the hc mixers
# DeepSeek-V4's (attn_mhc / mlp_mhc, hc_head), the sinks and gate as GQA attention's
# (core_attention.softmax_offset, linear_gate).
def _hy_v4_dense(cfg: dict) -> list[bool]:
    n = cfg["num_hidden_layers"]
    types = cfg.get("mlp_layer_types") or ["dense"] * min(1, n) + ["sparse"] * max(n - 1, 0)
    return [t == "dense" for t in types]


def _hy_v4_shared_index_layers(cfg: dict) -> tuple[int, ...]:
    """indexer_types' "shared" layers; by default every layer but 0, 1, 5, 9, ... (transformers)."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("indexer_types") or ["full" if i == 0 or (i - 1) % 4 == 0 else "shared" for i in range(n)]
    return tuple(i for i, t in enumerate(types) if t == "shared")


def _hy_v4_args(cfg: dict) -> dict:
    return {
        **deepseek_router_args(cfg),
        "hc_mult": cfg.get("hc_mult", 4),
        "hc_magnitude": cfg.get("hc_magnitude", 2.0),
        "hc_eps": cfg.get("hc_eps", 1e-6),
        "hc_no_comb": True,
        "attention_output_gate": True,
        "softmax_type": "learnable",
        "activation_func_clamp_value": cfg.get("swiglu_limit"),
    }


_HY_V4_EXPERT = C + "mlp.experts.{e}."
register(
    Family(
        name="hy_v4",
        tested=Tested(
            round_trip=(
                "--tp 2 --ep 2 --moe-grouped-gemm",
                "--pp 2 --ep 2 --num-layer-list 1,3",
            ),
            mcore_missing="no: megatron-core 0.16 has no hyper-connections, no sinks or output gate in MLA, and its DSAttention needs CUDA",
        ),
        model_types=("hy_v4",),
        architecture="HYV4ForCausalLM",
        tensors=EMBED_AND_HEAD
        + MLA_ATTENTION
        + INDEXER
        + LLAMA_NORMS
        + (
            (L + "self_attn.linear_gate.weight", C + "attn.gate.weight"),
            (L + "self_attn.learnable_sink_param", C + "attn.sinks"),
            (L + "mlp.linear_gate.weight", C + "mlp.gate.weight"),
            (L + "mlp.up_proj.weight", C + "mlp.up.weight"),
            (L + "mlp.down_proj.weight", C + "mlp.down.weight"),
            (L + "mlp.gate.weight", C + "mlp.router.weight"),
            (L + "mlp.gate.e_score_correction_bias", C + "mlp.router.bias"),
            (L + "mlp.shared_experts.linear_gate.weight", C + "mlp.shared.gate.weight"),
            (L + "mlp.shared_experts.up_proj.weight", C + "mlp.shared.up.weight"),
            (L + "mlp.shared_experts.down_proj.weight", C + "mlp.shared.down.weight"),
            *(
                (L + f"hc_pre.{m}.hc_{t}", C + f"{c}.{t}")
                for m, c in (("hc_attn_layer", "hc_attn"), ("hc_mlp_layer", "hc_ffn"))
                for t in ("fn", "base", "scale")
            ),
            *((f"model.hc_pre.hc_head.hc_head_{t}", f"hc_head.{t}") for t in ("fn", "base", "scale")),
        ),
        stacked=(
            ExpertStack(
                L + "mlp.experts.gate_up_proj", (_HY_V4_EXPERT + "gate.weight", _HY_V4_EXPERT + "up.weight")
            ),
            ExpertStack(L + "mlp.experts.down_proj", (_HY_V4_EXPERT + "down.weight",)),
        ),
        config=config_with(
            *DEEPSEEK_MOE_CONFIG,
            *MLA_CONFIG,
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            ConfigKey(
                "dense_layers", None, lambda cfg: tuple(i for i, d in enumerate(_hy_v4_dense(cfg)) if d)
            ),
            ConfigKey("index_heads", "index_n_heads", 16),
            ConfigKey("index_head_dim", "index_head_dim", 128),
            ConfigKey("shared_index_layers", None, _hy_v4_shared_index_layers),
            ConfigKey("hc_mult", "hc_mult", 4),
            ConfigKey(
                "layer_blocks",
                None,
                lambda cfg: tuple(
                    ("mla", "out_gate", "hc", "mlp" if d else "moe") for d in _hy_v4_dense(cfg)
                ),
            ),
        ),
        constants=(("router_bias", True), ("attn_sinks", True), ("hc_no_comb", True)),
        megatron_args=_hy_v4_args,
    )
)
