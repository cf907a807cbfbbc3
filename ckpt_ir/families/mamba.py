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
from ckpt_ir.families import ConfigKey, Family, Tested, register
from ckpt_ir.families.blocks import deepseek_router_args
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
            round_trip=("--tp 2 --pp 2 --num-layer-list 1,3",),
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
