"""Mamba families: models whose layers hold Mamba-2 mixers, alone (mamba2) or between attention,
MLP and MoE layers (Nemotron-H).  One table entry each; each layer's blocks come from the
config (``layer_blocks``), and a layer's one ``norm`` is the input norm of whichever block it
holds.

HF names and config keys: transformers 5's ``mamba2`` and ``nemotron_h`` modeling and
configuration files (on disk under ``backbone.``; transformers renames it to ``model.`` only in
memory).  Megatron names: megatron-core's ``MambaModel`` (``ssm/mamba_mixer.py``,
``ssm/mamba_block.py``) and MindSpeed-LLM's Mamba-2 converter
(``mindspeed_llm/tasks/checkpoint/convert_ckpt_mamba2.py``); see docs/reference/composed-blocks.md.
"""

from __future__ import annotations

from typing import Any

from ckpt_ir.errors import FormatError
from ckpt_ir.families import ConfigKey, Family, Packed, SplitLayers, Tested, register
from ckpt_ir.families.blocks import (
    ATTENTION,
    EMBED_AND_HEAD,
    GATED_MLP,
    GATED_MLP_BIASES,
    GRANITE_EXPERTS,
    GRANITE_MOE,
    LLAMA_BIAS_CONFIG,
    LLAMA_NORMS,
    O_BIAS,
    L,
    config_with,
    deepseek_router_args,
)
from ckpt_ir.ir.blocks import from_pattern

B = "backbone.layers.{i}."
C = "layers.{i}."

BACKBONE = (
    ("backbone.embeddings.weight", "embed.weight"),
    ("backbone.norm_f.weight", "final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
# one norm per layer, the input norm of the layer's only block
LAYER_NORM = tuple(
    (B + "norm.weight", C + c) for c in ("mamba_norm.weight", "attn_norm.weight", "mlp_norm.weight")
)
MAMBA_MIXER = tuple(
    (B + "mixer." + part, C + "mamba." + part)
    for part in (
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "dt_bias",
        "A_log",
        "D",
        "norm.weight",
        "out_proj.weight",
    )
)
MAMBA_CONFIG = (
    ConfigKey("mamba_heads", "mamba_num_heads"),
    ConfigKey("mamba_head_dim", "mamba_head_dim"),
    ConfigKey("mamba_state", "ssm_state_size"),
    ConfigKey("mamba_groups", "n_groups"),
    ConfigKey("mamba_conv_kernel", "conv_kernel", 4),
)
BASE = (
    ConfigKey("hidden_size", "hidden_size"),
    ConfigKey("vocab_size", "vocab_size"),
    ConfigKey("norm_eps", "layer_norm_epsilon", 1e-5),
    ConfigKey("tied_embeddings", "tie_word_embeddings", False),
)


register(
    Family(
        name="mamba2",
        model_types=("mamba2",),
        architecture="Mamba2ForCausalLM",
        tensors=BACKBONE + LAYER_NORM[:1] + MAMBA_MIXER,
        config=(
            ConfigKey("num_layers", "num_hidden_layers"),
            *BASE,
            ConfigKey("mamba_heads", "num_heads"),
            ConfigKey("mamba_head_dim", "head_dim"),
            ConfigKey("mamba_state", "state_size"),
            ConfigKey("mamba_groups", "n_groups"),
            ConfigKey("mamba_conv_kernel", "conv_kernel", 4),
            ConfigKey("layer_blocks", None, lambda cfg: (("mamba",),) * cfg["num_hidden_layers"]),
        ),
        mindspeed_names=("mamba2",),
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 1,3", "--tp 2 --norm-names te"),
            mcore_missing="no forward: megatron-core's MambaMixer computes only with mamba_ssm's Triton kernels",
            mindspeed=(
                ("mamba2-tp1", "identical"),
                ("mamba2-tp2", "identical"),
                (
                    "mamba2-tp2pp2",
                    "identical (less MindSpeed's PP defect: earlier layers repeated on later stages)",
                ),
            ),
        ),
    )
)


def _nemotron_h_layers(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    """One block per layer: layers_block_type (transformers 5), else the older
    hybrid_override_pattern (M Mamba, * attention, - MLP, E MoE)."""
    types = cfg.get("layers_block_type") or cfg.get("layer_types")
    if types is None:
        pattern = cfg.get("hybrid_override_pattern")
        if not isinstance(pattern, str):
            raise FormatError("config.json: neither layers_block_type nor hybrid_override_pattern")
        return from_pattern(pattern, "config.json")
    kinds = {
        "mamba": "mamba",
        "linear_attention": "mamba",
        "attention": "attention",
        "full_attention": "attention",
    }
    kinds |= {"mlp": "mlp", "moe": "moe"}
    unknown = sorted({t for t in types if t not in kinds})
    if unknown:
        raise FormatError(f"config.json: layers_block_type has unknown type(s) {unknown}")
    return tuple((kinds[t],) for t in types)


def _nemotron_h_experts(cfg: dict[str, Any]) -> int:
    """The routed experts of a model with MoE layers (0 without: n_routed_experts has a default)."""
    return cfg.get("n_routed_experts", 8) if any(b == ("moe",) for b in _nemotron_h_layers(cfg)) else 0


def _nemotron_h_router_args(cfg: dict[str, Any]) -> dict[str, Any]:
    return deepseek_router_args(cfg) if _nemotron_h_experts(cfg) else {}


register(
    Family(
        name="nemotron_h",
        model_types=("nemotron_h",),
        architecture="NemotronHForCausalLM",
        tensors=BACKBONE
        + LAYER_NORM
        + MAMBA_MIXER
        + (
            (B + "mixer.q_proj.weight", C + "attn.q.weight"),
            (B + "mixer.k_proj.weight", C + "attn.k.weight"),
            (B + "mixer.v_proj.weight", C + "attn.v.weight"),
            (B + "mixer.o_proj.weight", C + "attn.o.weight"),
            (B + "mixer.up_proj.weight", C + "mlp.fc1.weight"),
            (B + "mixer.down_proj.weight", C + "mlp.down.weight"),
            (B + "mixer.gate.weight", C + "mlp.router.weight"),
            (B + "mixer.gate.e_score_correction_bias", C + "mlp.router.bias"),
            (B + "mixer.experts.{e}.up_proj.weight", C + "mlp.experts.{e}.fc1.weight"),
            (B + "mixer.experts.{e}.down_proj.weight", C + "mlp.experts.{e}.down.weight"),
            (B + "mixer.shared_experts.up_proj.weight", C + "mlp.shared.fc1.weight"),
            (B + "mixer.shared_experts.down_proj.weight", C + "mlp.shared.down.weight"),
        ),
        config=(
            ConfigKey("num_layers", None, lambda cfg: len(_nemotron_h_layers(cfg))),
            ConfigKey("layer_blocks", None, _nemotron_h_layers),
            *BASE,
            ConfigKey("num_heads", "num_attention_heads"),
            ConfigKey("num_kv_heads", "num_key_value_heads"),
            ConfigKey("head_dim", "head_dim"),
            ConfigKey("ffn_hidden_size", "intermediate_size"),
            ConfigKey("activation", "mlp_hidden_act", "relu2"),
            *MAMBA_CONFIG,
            ConfigKey("num_experts", None, _nemotron_h_experts),
            ConfigKey("moe_topk", "num_experts_per_tok", 2),
            ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size", 0),
            ConfigKey("shared_ffn_hidden_size", "moe_shared_expert_intermediate_size", 0),
        ),
        constants=(("gated_mlp", False), ("router_bias", True)),
        megatron_args=_nemotron_h_router_args,
        tested=Tested(
            round_trip=("--tp 2 --ep 2 --norm-names te", "--pp 2 --num-layer-list 3,1"),
            mcore_missing="no forward: megatron-core's MambaMixer computes only with mamba_ssm's Triton kernels",
        ),
    )
)


# Mamba hybrids whose HF layer holds a mixer (Mamba-2 or attention) AND an MLP (Bamba, Granite-4):
# kept at megatron-core's MambaModel granularity, one block per canonical layer (HF layer i =
# canonical layers 2i, the mixer with its input norm, and 2i + 1, the MLP with its norm; see
# SplitLayers), so Megatron's pattern is M- / *- (Bamba), M- / *- or ME / *E (Granite-4) and PP counts
# Megatron layers.  Both families' config: num_hidden_layers stays the HF count; the mixer's
# sizes are mamba_n_heads, mamba_d_head ("auto": mamba_expand * hidden / heads), mamba_d_state,
# mamba_n_groups, mamba_d_conv.  megatron-core's mixer has no in_proj / out_proj bias and always a
# conv1d bias (ssm/mamba_mixer.py), so a config asking otherwise is refused.
MIXER_PARTS = ("input_layernorm.", "mamba.", "self_attn.")
# the input norm feeds whichever mixer the layer holds
HYBRID_MIXERS = (
    (L + "input_layernorm.weight", C + "mamba_norm.weight"),
    (L + "input_layernorm.weight", C + "attn_norm.weight"),
    *((L + "mamba." + h[len(B + "mixer.") :], c) for h, c in MAMBA_MIXER),
    *ATTENTION[1:],
    *O_BIAS,
)
FINAL_LAYERNORM = tuple(
    ("model.final_layernorm.weight" if c == "final_norm.weight" else h, c) for h, c in EMBED_AND_HEAD
)


def _mamba_head_dim(cfg: dict[str, Any]) -> int:
    head = cfg.get("mamba_d_head", "auto")
    if head != "auto":
        return head
    inner = cfg.get("mamba_d_ssm") or cfg.get("mamba_expand", 2) * cfg["hidden_size"]
    return inner // cfg["mamba_n_heads"]


def _stock_mixer(cfg: dict[str, Any]) -> dict[str, Any]:
    """The checks megatron-core's Mamba mixer puts on the config (nothing to write)."""
    if cfg.get("mamba_proj_bias"):
        raise FormatError(
            "config.json: mamba_proj_bias is true, but megatron-core's Mamba mixer has no in_proj / "
            "out_proj bias (ssm/mamba_mixer.py); such a model has no Megatron form"
        )
    if cfg.get("mamba_conv_bias") is False:
        raise FormatError(
            "config.json: mamba_conv_bias is false, but megatron-core's Mamba mixer always has a conv1d "
            "bias; such a model has no Megatron form"
        )
    return {}


MAMBA_KERNELS = "no forward: megatron-core's MambaMixer computes only with mamba_ssm's Triton kernels"
HYBRID_MAMBA_CONFIG = (
    ConfigKey("mamba_heads", "mamba_n_heads", 128),
    ConfigKey("mamba_head_dim", None, _mamba_head_dim),
    ConfigKey("mamba_state", "mamba_d_state", 256),
    ConfigKey("mamba_groups", "mamba_n_groups", 1),
    ConfigKey("mamba_conv_kernel", "mamba_d_conv", 4),
)


def _sublayer_blocks(mixers: list[str], mlp: str) -> tuple[tuple[str, ...], ...]:
    """Canonical layers of HF layers of (mixer, MLP): (mixer_0,), (mlp,), (mixer_1,), (mlp,), ..."""
    return tuple(b for m in mixers for b in ((m,), (mlp,)))


def _mixer_types(cfg: dict[str, Any], key: str) -> list[str]:
    """Each HF layer's mixer from its layer types (Mamba: ``linear_attention`` or the legacy
    ``mamba``; attention: ``full_attention`` or ``attention``) under ``key``."""
    kinds = {
        "mamba": "mamba",
        "linear_attention": "mamba",
        "attention": "attention",
        "full_attention": "attention",
    }
    types = cfg.get(key)
    if types is None:
        return ["mamba"] * cfg["num_hidden_layers"]
    unknown = sorted({t for t in types if t not in kinds})
    if unknown or len(types) != cfg["num_hidden_layers"]:
        raise FormatError(
            f"config.json: {key} must list mamba / attention for each of the {cfg['num_hidden_layers']} "
            f"layers, got {types}"
        )
    return [kinds[t] for t in types]


def _bamba_layers(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    """Bamba: attention in the layers of attn_layer_indices, Mamba elsewhere; each with an MLP."""
    _stock_mixer(cfg)
    attn = set(cfg.get("attn_layer_indices") or ())
    mixers = ["attention" if i in attn else "mamba" for i in range(cfg["num_hidden_layers"])]
    return _sublayer_blocks(mixers, "mlp")


register(
    Family(
        name="bamba",
        model_types=("bamba",),
        architecture="BambaForCausalLM",
        tensors=FINAL_LAYERNORM
        + HYBRID_MIXERS
        + (
            (L + "pre_ff_layernorm.weight", C + "mlp_norm.weight"),
            *((L + "feed_forward." + h[len(L + "mlp.") :], c) for h, c in GATED_MLP + GATED_MLP_BIASES),
        ),
        split_layers=SplitLayers((MIXER_PARTS, ("pre_ff_layernorm.", "feed_forward."))),
        tested=Tested(
            round_trip=("--tp 2 --pp 2 --num-layer-list 1,3", "--tp 2 --norm-names te"),
            mcore_missing=MAMBA_KERNELS,
        ),
        config=config_with(
            ConfigKey("num_layers", None, lambda cfg: len(_bamba_layers(cfg))),
            ConfigKey("layer_blocks", None, _bamba_layers),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            *LLAMA_BIAS_CONFIG,
            *HYBRID_MAMBA_CONFIG,
        ),
    )
)


def _granite_experts(cfg: dict[str, Any]) -> int:
    return cfg.get("num_local_experts", 8)


def _granite_layers(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    """Granite-4: layer_types picks each layer's mixer; its MLP is MoE (experts + the shared
    MLP) when num_local_experts > 0, else the shared MLP alone (a dense MLP)."""
    _stock_mixer(cfg)
    return _sublayer_blocks(_mixer_types(cfg, "layer_types"), "moe" if _granite_experts(cfg) else "mlp")


# Granite-4 (transformers models/granitemoehybrid): Granite MoE's stacked experts and router
# (block_sparse_moe.*) beside its shared MLP (shared_mlp.input_linear [2S, H] = [gate; up],
# output_linear [H, S]), which is the layer's dense MLP when the model has no experts; the MLP's
# norm is post_attention_layernorm.  muP multipliers ride in the config (see granitemoe).
_SHARED_MLP = L + "shared_mlp."
register(
    Family(
        name="granitemoehybrid",
        model_types=("granitemoehybrid",),
        architecture="GraniteMoeHybridForCausalLM",
        tensors=EMBED_AND_HEAD
        + HYBRID_MIXERS
        + LLAMA_NORMS
        + GRANITE_MOE
        + (
            (_SHARED_MLP + "output_linear.weight", C + "mlp.down.weight"),
            (_SHARED_MLP + "output_linear.weight", C + "mlp.shared.down.weight"),
        ),
        packed=(
            Packed(
                _SHARED_MLP + "input_linear.weight",
                (C + "mlp.gate.weight", C + "mlp.up.weight"),
                ("ffn_hidden_size", "ffn_hidden_size"),
            ),
            Packed(
                _SHARED_MLP + "input_linear.weight",
                (C + "mlp.shared.gate.weight", C + "mlp.shared.up.weight"),
                ("shared_ffn_hidden_size", "shared_ffn_hidden_size"),
            ),
        ),
        stacked=GRANITE_EXPERTS,
        tested=Tested(
            round_trip=(
                "--tp 2 --pp 2 --ep 2 --num-layer-list 3,1 --norm-names te",
                "--tp 2 --pp 2 --num-layer-list 3,1",
            ),
            mcore_missing=MAMBA_KERNELS,
        ),
        split_layers=SplitLayers(
            (MIXER_PARTS, ("post_attention_layernorm.", "block_sparse_moe.", "shared_mlp."))
        ),
        config=config_with(
            ConfigKey("num_layers", None, lambda cfg: len(_granite_layers(cfg))),
            ConfigKey("layer_blocks", None, _granite_layers),
            ConfigKey("ffn_hidden_size", "shared_intermediate_size", 1024),
            ConfigKey("num_experts", None, _granite_experts),
            ConfigKey("moe_topk", "num_experts_per_tok", 2),
            ConfigKey("moe_ffn_hidden_size", "intermediate_size"),
            ConfigKey(
                "shared_ffn_hidden_size",
                None,
                lambda cfg: cfg.get("shared_intermediate_size", 1024) if _granite_experts(cfg) else 0,
            ),
            *LLAMA_BIAS_CONFIG[:2],
            *HYBRID_MAMBA_CONFIG,
        ),
        megatron_args=lambda cfg: {
            "softmax_scale": cfg.get("attention_multiplier"),
            **({} if cfg.get("position_embedding_type") == "rope" else {"position_embedding_type": "none"}),
        },
    )
)


def _falcon_h1_layers(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    """Falcon-H1: every layer runs attention and a Mamba-2 mixer side by side on one input norm
    (their outputs summed), then a gated MLP."""
    _stock_mixer(cfg)
    if cfg.get("projectors_bias"):
        raise FormatError(
            "config.json: projectors_bias is true (a Mamba out_proj bias); ckpt-ir's Mamba mixer has "
            "none, as megatron-core's"
        )
    return (("attention", "mamba", "mlp"),) * cfg["num_hidden_layers"]


# Falcon-H1 (transformers models/falcon_h1): one canonical layer per HF layer, its two mixers
# reading input_layernorm (attn_norm; no Mamba norm of its own), the mixer's gated RMSNorm only
# with mamba_rms_norm.  megatron-core's MambaModel has no layer of two parallel mixers, so the
# Megatron form is Megatron-Bridge's own FalconH1 model (falconh1_bridge.py, falconh1_layer_specs.py):
# decoder.layers.{i}.norm.weight (the shared input norm, a TENorm), mamba_mixer.* (megatron-core's
# per-part TP splits), self_attention.linear_qkv / linear_proj, mlp.linear_fc1 with
# pre_ff_layernorm fused (layer_norm_weight), decoder.final_norm.  The muP multipliers
# (embedding, lm_head, key, attention / ssm in and out, mlp_multipliers, ssm_multipliers) and
# mamba_norm_before_gate are config values carried through untouched (Megatron-Bridge's provider
# reads them under the same names).
register(
    Family(
        name="falcon_h1",
        model_types=("falcon_h1",),
        architecture="FalconH1ForCausalLM",
        tensors=FINAL_LAYERNORM
        + HYBRID_MIXERS[1:]
        + (
            (L + "pre_ff_layernorm.weight", C + "mlp_norm.weight"),
            *((L + "feed_forward." + h[len(L + "mlp.") :], c) for h, c in GATED_MLP + GATED_MLP_BIASES),
        ),
        config=config_with(
            ConfigKey("layer_blocks", None, _falcon_h1_layers),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-5),
            *LLAMA_BIAS_CONFIG,
            *HYBRID_MAMBA_CONFIG,
            ConfigKey("mamba_no_gated_norm", None, lambda cfg: not cfg.get("mamba_rms_norm", False)),
        ),
        tested=Tested(
            round_trip=("--tp 2 --pp 3 --norm-names te", "--tp 2"),
            mcore_missing="no: its Megatron form is Megatron-Bridge's own FalconH1 model, not megatron-core's",
        ),
        megatron_keys=(
            ("decoder.layers.{i}.norm.weight", C + "attn_norm.weight"),
            *(("decoder.layers.{i}.mamba_mixer." + c[len(C + "mamba.") :], c) for _, c in MAMBA_MIXER),
            ("decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight", C + "mlp_norm.weight"),
        ),
    )
)
