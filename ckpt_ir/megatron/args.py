"""Megatron args, both ways: the ``args`` namespace a rank file carries, built from a ModelSpec and
Layout (:func:`build_args`), and read back (:func:`hf_config_from_args`, :func:`args_dict`).
Which HF family plain Megatron-LM args describe is :mod:`ckpt_ir.megatron.infer`."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from typing import Any

import attrs

from ckpt_ir.errors import FormatError
from ckpt_ir.ir.blocks import from_pattern, is_hybrid, to_pattern
from ckpt_ir.ir.layout import Layout, has_gdn_modules, mcore_num_layers, num_chunks, padded_size
from ckpt_ir.ir.spec import ModelSpec

# Attributes that describe the conversion or Megatron itself, never an HF config key.
_NOT_HF = frozenset(
    {
        "num_layers",
        "ffn_hidden_size",
        "num_query_groups",
        "group_query_attention",
        "kv_channels",
        "padded_vocab_size",
        "norm_epsilon",
        "normalization",
        "swiglu",
        "bias_gelu_fusion",
        "openai_gelu",
        "add_qkv_bias",
        "add_bias_linear",
        "qk_layernorm",
        "untie_embeddings_and_output_weights",
        "position_embedding_type",
        "use_rotary_position_embeddings",
        "rotary_base",
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "expert_tensor_parallel_size",
        "num_layer_list",
        "noop_layers",
        "num_layers_per_virtual_pipeline_stage",
        "virtual_pipeline_model_parallel_size",
        "vpp_size",
        "transformer_impl",
        "model_type_hf",
        "ckpt_ir_family",
        "ckpt_ir_hf_config",
        "ckpt_ir_hf_naming",
        "bf16",
        "fp16",
        "params_dtype",
        "iteration",
        "load_model_type",
        "hf_path",
        "load_dir",
        "save_dir",
        "seq_length",
        "global_batch_size",
        "add_position_embedding",
        "gradient_accumulation_fusion",
        "tokenizer_type",
        "qkv_type",
        "fc_type",
        "post_norm",
        "moe_grouped_gemm",
        "moe_tp_extend_ep",
        "mla_mm_split",
        "mtp_num_layers",
        "save_layer_by_layer",
        "etp_valid_ckpts_list",
        "add_rmsnorm_offset",
        "use_mcore_models",
        "make_vocab_size_divisible_by",
        "lora_r",
        "lora_alpha",
        "lora_target_modules",
        "lora_load",
        "lora_fusion",
        "lora_ckpt_filter",
        "moe_router_topk",
        "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size",
        "multi_latent_attention",
        "qk_head_dim",
        "qk_pos_emb_head_dim",
        "rotary_percent",
        # MLA's rotary (mla_rope_args); an HF config nests these under rope_parameters
        "rope_type",
        "rotary_scaling_factor",
        "mscale",
        "mscale_all_dim",
        "beta_fast",
        "beta_slow",
        # megatron-core's gated-delta-net settings (GDN_FIELDS); the HF config has its own keys
        "experimental_attention_variant",
        "linear_attention_freq",
        "attention_output_gate",
        "apply_layernorm_1p",
        # Nemotron-H's MTP pattern: Megatron-LM would build MTP layers ckpt-ir does not convert
        "mtp_hybrid_override_pattern",
    }
)


# layout fields a source may set and the target may not: reset to Megatron's default (None)
_LAYOUT_ARGS = (
    "num_layer_list",
    "noop_layers",
    "num_layers_per_virtual_pipeline_stage",
    "virtual_pipeline_model_parallel_size",
    "expert_tensor_parallel_size",
    # Megatron-LM's uneven first / last pipeline stages (the target's stages are num_layer_list's)
    "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers",
)
_PLAIN = (int, float, str, bool, list)


class Args:
    """Megatron args with Megatron-LM's defaults for the keys a checkpoint may lack."""

    # Megatron-LM's argparse defaults for the settings that change what the model computes
    DEFAULTS: dict[str, Any] = {
        "swiglu": False,
        "normalization": "LayerNorm",
        "add_bias_linear": True,
        "add_qkv_bias": False,
        "apply_layernorm_1p": False,
        "rotary_interleaved": False,
        "rotary_percent": 1.0,
        "squared_relu": False,
        "bias_gelu_fusion": True,
        "openai_gelu": False,
        "apply_residual_connection_post_layernorm": False,
        "qk_layernorm": False,
        "untie_embeddings_and_output_weights": False,
        "norm_epsilon": 1e-5,
        "rotary_base": 10000,
        "moe_router_pre_softmax": False,
        "moe_router_score_function": "softmax",
        "moe_router_enable_expert_bias": False,
        "moe_shared_expert_gate": False,
        "moe_layer_freq": 1,
        "multi_latent_attention": False,
        "mtp_num_layers": None,
        "use_rope_scaling": False,
        "q_lora_rank": None,
        "group_query_attention": False,
        # megatron-core's TransformerConfig defaults for a hybrid (Mamba) model
        "mamba_state_dim": 128,
        "mamba_head_dim": 64,
        "mamba_num_groups": 8,
        "hybrid_attention_ratio": 0.0,
        "hybrid_mlp_ratio": 0.0,
    }

    def __init__(self, args: dict[str, Any], where: str = "args") -> None:
        self.args, self.where = args, where

    def __getitem__(self, key: str) -> Any:
        v = self.args.get(key)
        return self.DEFAULTS.get(key) if v is None else v

    def position_embedding(self) -> str:
        v = self.args.get("position_embedding_type")
        return v if v else ("rope" if self.args.get("use_rotary_position_embeddings") else "learned_absolute")

    def dense_layers(self) -> tuple[int, ...]:
        """Megatron's moe_layer_freq: an int N (layer i is MoE iff i % N == 0) or a 0/1 list."""
        n = self.num_layers()
        freq = self["moe_layer_freq"]
        if isinstance(freq, int):
            return tuple(i for i in range(n) if i % freq)
        pattern = int_list(freq) or ()
        return tuple(i for i, moe in enumerate(pattern) if not moe)

    def num_layers(self) -> int:
        if self.args.get("num_layers") is None and self.hybrid:  # Megatron-LM derives it from the pattern
            return len(self.hybrid_pattern())
        return int(self.args["num_layers"]) - len(int_list(self.args.get("noop_layers")) or ())

    @property
    def mla(self) -> bool:
        return bool(self["multi_latent_attention"])

    @property
    def hybrid(self) -> bool:
        """A Megatron hybrid (Mamba) model: megatron-core's MambaModel, Megatron-LM's HybridModel.
        Megatron-LM 0.16 runs need not set is_hybrid_model; their layer pattern, hybrid ratios or
        --spec (a mamba / hybrid stack spec) say it."""
        spec = self.args.get("spec")
        named = isinstance(spec, (list, tuple)) and any(
            isinstance(s, str) and ("mamba" in s or "hybrid" in s) for s in spec
        )
        return bool(
            self["is_hybrid_model"]
            or self["hybrid_layer_pattern"]
            or self["hybrid_override_pattern"]
            or self["hybrid_attention_ratio"]
            or self["hybrid_mlp_ratio"]
            or named
        )

    def hybrid_segments(self) -> list[str]:
        """The hybrid model's layer symbols per pipeline segment: Megatron-LM's hybrid_layer_pattern
        (``|`` between segments), else megatron-core 0.16's hybrid_override_pattern, else the
        pattern megatron-core allocates from hybrid_attention_ratio / hybrid_mlp_ratio (one segment)."""
        pattern = self["hybrid_layer_pattern"] or self["hybrid_override_pattern"]
        if pattern is not None and not isinstance(pattern, str):
            raise FormatError(f"{self.where}: args.hybrid_layer_pattern must be a string, got {pattern!r}")
        if pattern is None:
            n = self.args.get("num_layers")
            if not isinstance(n, int) or n <= 0:
                raise FormatError(
                    f"{self.where}: a hybrid model's args need hybrid_layer_pattern or num_layers"
                )
            return [
                allocate_hybrid(n, float(self["hybrid_attention_ratio"]), float(self["hybrid_mlp_ratio"]))
            ]
        if "/" in pattern:
            raise FormatError(
                f"{self.where}: args.hybrid_layer_pattern {pattern!r} has multi-token-prediction layers "
                "(after '/'); ckpt-ir does not convert a hybrid model's MTP layers yet"
            )
        return pattern.split("|")

    def hybrid_pattern(self) -> str:
        return "".join(self.hybrid_segments())

    def hybrid_stages(self, pp: int) -> tuple[int, ...] | None:
        """A hybrid model's layers per pipeline stage when not even (None: even): the pattern's
        ``|`` segments (Megatron-LM's HybridModel), else the first / last stage sizes
        (decoder_first_pipeline_num_layers / decoder_last_pipeline_num_layers; megatron-core's
        MambaStack splits the layers between them evenly)."""
        segments = self.hybrid_segments()
        if len(segments) > 1:
            if len(segments) != pp:
                raise FormatError(
                    f"{self.where}: args.hybrid_layer_pattern has {len(segments)} pipeline segments for "
                    f"PP={pp}; virtual pipeline stages of a hybrid model are not supported"
                )
            return tuple(len(s) for s in segments)
        first, last = (
            self.args.get("decoder_first_pipeline_num_layers"),
            self.args.get("decoder_last_pipeline_num_layers"),
        )
        if pp == 1 or (first is None and last is None):
            return None
        n = len(segments[0])
        middle = pp - (first is not None) - (last is not None)
        rest = n - (first or 0) - (last or 0)
        if middle < 0 or (middle and rest % middle) or (not middle and rest):
            raise FormatError(
                f"{self.where}: args.decoder_first/last_pipeline_num_layers ({first}, {last}) do not split "
                f"{n} layers over PP={pp}"
            )
        even = (rest // middle,) * middle if middle else ()
        return (*(() if first is None else (first,)), *even, *(() if last is None else (last,)))

    @property
    def moe(self) -> bool:
        return bool(self["num_experts"])


Writer = Callable[[ModelSpec, Layout], Any]
Reader = Callable[[Args], dict[str, Any]]


def _all(spec: ModelSpec) -> bool:
    return True


def _moe(spec: ModelSpec) -> bool:
    return spec.num_experts > 0


def _mla(spec: ModelSpec) -> bool:
    return spec.mla


@attrs.frozen
class Field:
    """One Megatron-LM arg that says something about the model, both ways: ``write`` is its value
    for a ModelSpec and Layout (written when ``when`` holds for the spec), ``read`` the ModelSpec
    values the arg gives back (``Args`` fills Megatron-LM's defaults in)."""

    arg: str
    write: Writer | None
    read: Reader | None = None
    when: Callable[[ModelSpec], bool] = _all


def _spec(field: str, arg: str) -> Field:
    """An arg that is one ModelSpec field, unchanged."""
    return Field(arg, lambda s, lay: getattr(s, field), lambda a: {field: a[arg]})


def _bias_linear(s: ModelSpec, lay: Layout) -> bool:
    # megatron-core's add_bias_linear puts biases on every linear layer but the QKV's own switch
    return s.o_bias or s.mlp_bias


# HF's names of GELU's tanh approximation (gelu_new, gelu_fast and gelu_pytorch_tanh compute
# 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) in different orders); "gelu" is the exact erf form
TANH_GELU = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")


def _activation(a: Args) -> str:
    """The MLP's activation Megatron-LM builds from its args.  Without ``swiglu`` or
    ``squared_relu`` it is torch's exact GELU, except that with biases on the linear layers
    (``add_bias_linear``, the default) Megatron-LM fuses bias and GELU (``bias_gelu_fusion``, the
    default), and the fused kernel (megatron/core/fusions/fused_bias_gelu.py) computes the tanh
    approximation; so does ``openai_gelu`` (Megatron-LM's legacy models; transformers' Megatron
    GPT-2 converter reads both args the same way and names the fused form gelu_fast)."""
    if a["swiglu"]:
        return "silu"
    if a["squared_relu"]:
        return "relu2"
    fused = a["bias_gelu_fusion"] and a["add_bias_linear"]
    return "gelu_fast" if fused or a["openai_gelu"] else "gelu"


# The model's args in the order rank files list them.  Both directions come from this one table:
# build_args writes every row, spec_values reads them back (and so does family inference).
MODEL_FIELDS: tuple[Field, ...] = (
    Field("num_layers", mcore_num_layers, lambda a: {"num_layers": a.num_layers()}),
    _spec("hidden_size", "hidden_size"),
    _spec("ffn_hidden_size", "ffn_hidden_size"),
    _spec("num_heads", "num_attention_heads"),
    Field(
        "num_query_groups",
        lambda s, lay: s.num_kv_heads,
        lambda a: {
            "num_kv_heads": a["num_query_groups"] if a["group_query_attention"] else a["num_attention_heads"]
        },
    ),
    Field("num_key_value_heads", lambda s, lay: s.num_kv_heads),
    Field("group_query_attention", lambda s, lay: s.num_kv_heads != s.num_heads),
    Field(
        "kv_channels",
        lambda s, lay: s.head_dim,
        lambda a: {
            "head_dim": a["qk_pos_emb_head_dim"]
            if a.mla
            else a["kv_channels"] or a["hidden_size"] // a["num_attention_heads"]
        },
    ),
    Field(
        "vocab_size",
        lambda s, lay: s.vocab_size,
        lambda a: {"vocab_size": a["vocab_size"] or a["padded_vocab_size"]},
    ),
    Field("padded_vocab_size", lambda s, lay: lay.padded_vocab or s.vocab_size),
    _spec("norm_eps", "norm_epsilon"),
    Field(
        "normalization",
        lambda s, lay: "LayerNorm" if s.norm_bias else "RMSNorm",
        lambda a: {"norm_bias": a["normalization"] == "LayerNorm"},
    ),
    Field(
        "swiglu",
        lambda s, lay: s.gated_mlp and s.activation == "silu",
        lambda a: {"gated_mlp": bool(a["swiglu"]), "activation": _activation(a)},
    ),
    # a plain GELU MLP with exact GELU: Megatron-LM must not fuse it into the tanh form
    Field(
        "bias_gelu_fusion",
        lambda s, lay: False,
        when=lambda s: not s.gated_mlp and s.activation == "gelu" and (s.mlp_bias or s.o_bias),
    ),
    Field(
        "add_qkv_bias",
        lambda s, lay: s.qkv_bias,
        lambda a: {"qkv_bias": bool(a["add_qkv_bias"] or a["add_bias_linear"])},
    ),
    Field(
        "add_bias_linear",
        _bias_linear,
        lambda a: {"o_bias": bool(a["add_bias_linear"]), "mlp_bias": bool(a["add_bias_linear"])},
    ),
    Field(
        "qk_layernorm", lambda s, lay: s.qk_norm, lambda a: {"qk_norm": bool(a["qk_layernorm"]) and not a.mla}
    ),
    Field("post_norm", lambda s, lay: s.post_norms),
    Field(
        "untie_embeddings_and_output_weights",
        lambda s, lay: not s.tied_embeddings,
        lambda a: {"tied_embeddings": not a["untie_embeddings_and_output_weights"]},
    ),
    Field(
        "position_embedding_type",
        lambda s, lay: "learned_absolute" if s.position_embeddings else "rope",
        lambda a: {
            "position_embeddings": (a["max_position_embeddings"] or a["seq_length"] or 0)
            if a.position_embedding() == "learned_absolute"
            else 0
        },
    ),
    Field("use_rotary_position_embeddings", lambda s, lay: not s.position_embeddings),
    Field(
        "max_position_embeddings",
        lambda s, lay: s.position_embeddings,
        when=lambda s: s.position_embeddings > 0,
    ),
    Field("squared_relu", lambda s, lay: True, when=lambda s: s.activation == "relu2"),
    # zero-centred norms of a model without gated-delta-net modules (Nemotron's LayerNorm1P:
    # x_hat * (1 + w) + b, megatron-core's layernorm_zero_centered_gamma); GDN_FIELDS says it for
    # those.  Written only: the stored w is the same either way, and other families' Megatron runs
    # (Megatron-Bridge's Gemma) set it for norms ckpt-ir describes otherwise
    Field(
        "apply_layernorm_1p",
        lambda s, lay: True,
        when=lambda s: s.zero_centred_norms and not has_gdn_modules(s),
    ),
)

# mixture of experts: written for MoE models, read when args.num_experts is set
MOE_FIELDS: tuple[Field, ...] = (
    _spec("num_experts", "num_experts"),
    _spec("moe_topk", "moe_router_topk"),
    Field(
        "moe_ffn_hidden_size",
        lambda s, lay: s.moe_ffn_hidden_size,
        lambda a: {"moe_ffn_hidden_size": a["moe_ffn_hidden_size"] or a["ffn_hidden_size"]},
    ),
    Field("moe_grouped_gemm", lambda s, lay: lay.grouped_gemm),
    Field("expert_model_parallel_size", lambda s, lay: lay.ep),
    Field("expert_tensor_parallel_size", lambda s, lay: lay.expert_tp),
    Field(
        "moe_shared_expert_intermediate_size",
        lambda s, lay: s.shared_ffn_hidden_size,
        lambda a: {"shared_ffn_hidden_size": a["moe_shared_expert_intermediate_size"] or 0},
        when=lambda s: s.shared_ffn_hidden_size > 0,
    ),
    # Megatron's per-layer pattern: 1 = MoE, 0 = dense MLP
    Field(
        "moe_layer_freq",
        lambda s, lay: (
            [0 if i in s.dense_layers else 1 for i in range(s.num_layers)] if s.dense_layers else 1
        ),
        lambda a: {"dense_layers": a.dense_layers()},
    ),
    Field(
        "moe_shared_expert_gate",
        lambda s, lay: s.shared_expert_gate,
        lambda a: {"shared_expert_gate": bool(a["moe_shared_expert_gate"])},
    ),
    Field("shared_expert_gate", lambda s, lay: s.shared_expert_gate),
    # read only: the families whose routers have the bias write it with their router settings
    Field(
        "moe_router_enable_expert_bias",
        None,
        lambda a: {"router_bias": bool(a["moe_router_enable_expert_bias"])},
    ),
)

# multi-latent attention: written for MLA models, read when args.multi_latent_attention is set
MLA_FIELDS: tuple[Field, ...] = (
    Field("multi_latent_attention", lambda s, lay: True),
    Field(
        "q_lora_rank",
        lambda s, lay: s.q_lora_rank or None,
        lambda a: {"q_lora_rank": a["q_lora_rank"] or 0},
    ),
    _spec("kv_lora_rank", "kv_lora_rank"),
    _spec("qk_nope_dim", "qk_head_dim"),
    _spec("qk_rope_dim", "qk_pos_emb_head_dim"),
    _spec("v_head_dim", "v_head_dim"),
)


def _linear_attention_freq(s: ModelSpec, lay: Layout) -> int | list[int]:
    """megatron-core's linear_attention_freq: N when every N-th layer is softmax attention and the
    others gated-delta-net, else the 0/1 list (1 = gated-delta-net)."""
    pattern = [int(s.has_block(i, "gdn")) for i in range(s.num_layers)]
    for n in range(2, s.num_layers + 1):
        if pattern == [int((i + 1) % n != 0) for i in range(s.num_layers)]:
            return n
    return pattern


def _linear_layers(a: Args) -> tuple[int, ...]:
    freq, n = a["linear_attention_freq"], a.num_layers()
    if isinstance(freq, int):
        return tuple(i for i in range(n) if (i + 1) % freq)
    return tuple(i for i, linear in enumerate(int_list(freq) or ()) if linear)


# megatron-core's gated-delta-net models (GPTModel with experimental_attention_variant
# "gated_delta_net": Megatron-LM's args, Megatron-Bridge's qwen3_next / qwen35 providers); written
# with its modules (Layout.gdn_keys "mcore"), read when the variant is set.  Every norm is
# zero-centred (apply_layernorm_1p: 1 + w) as Qwen3-Next's and Qwen3.5's HF norms are, or plain
# (OLMo-Hybrid)
GDN_FIELDS: tuple[Field, ...] = (
    Field("experimental_attention_variant", lambda s, lay: "gated_delta_net"),
    Field("linear_attention_freq", _linear_attention_freq, lambda a: {"linear_layers": _linear_layers(a)}),
    _spec("linear_conv_kernel", "linear_conv_kernel_dim"),
    _spec("linear_k_dim", "linear_key_head_dim"),
    _spec("linear_v_dim", "linear_value_head_dim"),
    _spec("linear_k_heads", "linear_num_key_heads"),
    _spec("linear_v_heads", "linear_num_value_heads"),
    Field(
        "attention_output_gate",
        lambda s, lay: s.attn_gate,
        lambda a: {"attn_gate": bool(a["attention_output_gate"])},
    ),
    Field(
        "apply_layernorm_1p",
        lambda s, lay: s.zero_centred_norms,
        lambda a: {"zero_centred_norms": bool(a["apply_layernorm_1p"])},
    ),
)


def allocate_hybrid(layers: int, attention: float, mlp: float) -> str:
    """The layer pattern megatron-core 0.16 builds from hybrid ratios alone
    (``ssm/mamba_hybrid_layer_allocation.py``): round(layers x ratio) attention layers spread
    evenly between Mamba runs that start and end the stack, then round(layers x ratio) MLP layers
    spread over the remaining Mamba layers, right-justified."""
    kinds = ["M"] * layers
    n_attn = round(layers * attention)
    run = (layers - n_attn) / (n_attn + 1)  # Mamba layers before each attention layer, and after
    budget = run
    for i in range(layers):
        if budget < 0.5:
            kinds[i], budget = "*", budget + run
        else:
            budget -= 1
    n_mlp = round(layers * mlp)
    if n_mlp:
        run = (layers - n_attn - n_mlp) / n_mlp
        budget = run
        for i in (i for i in range(layers) if kinds[i] == "M"):
            if budget < 0.5:
                kinds[i], budget = "-", budget + run
            else:
                budget -= 1
    return "".join(kinds)


def _no_attention(s: ModelSpec) -> bool:
    return not any(s.has_attention(i) for i in range(s.num_layers))


# the stock layer spec of megatron-core's MambaModel (Transformer Engine modules; Megatron-LM's
# HybridModel keeps the name as an alias of its hybrid_stack_spec)
MAMBA_STACK_SPEC = ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]


def _stage_pattern(s: ModelSpec, lay: Layout) -> str:
    """Megatron-LM's hybrid_layer_pattern: the pattern with ``|`` between pipeline stages (their
    layers as the rank files place them; VPP and no-op layers have no such form)."""
    pattern = to_pattern(s)
    if lay.pp == 1 or lay.vpp_layers or lay.noop_layers:
        return pattern
    counts = lay.num_layer_list or (s.num_layers // lay.pp,) * lay.pp
    starts = [sum(counts[:k]) for k in range(len(counts) + 1)]
    return "|".join(pattern[a:b] for a, b in zip(starts, starts[1:]))


# hybrid (Mamba) models: written for models with Mamba layers, read when args say hybrid.  One
# Megatron layer per block (pattern symbol); megatron-core reads hybrid_override_pattern (0.16),
# Megatron-LM's HybridModel hybrid_layer_pattern (and the older name when only it is there).
# Nemotron-H's and Mamba-2's attention has no rotary embedding: position_embedding_type none.
def _mamba_model(spec: ModelSpec) -> bool:
    """Whether the model is megatron-core's MambaModel: one block per layer (its pattern symbol).
    Falcon-H1's layers (attention and Mamba side by side, then an MLP) are Megatron-Bridge's own
    model, which carries the Mamba sizes but no pattern."""
    return all(len(spec.blocks(i)) == 1 for i in range(spec.num_layers))


MAMBA_FIELDS: tuple[Field, ...] = (
    Field("is_hybrid_model", lambda s, lay: True, when=_mamba_model),
    Field(
        "hybrid_override_pattern",
        lambda s, lay: to_pattern(s),
        lambda a: {
            "layer_blocks": from_pattern(a.hybrid_pattern(), a.where),
            "num_layers": len(a.hybrid_pattern()),
        },
        when=_mamba_model,
    ),
    Field("hybrid_layer_pattern", _stage_pattern, when=_mamba_model),
    _spec("mamba_state", "mamba_state_dim"),
    _spec("mamba_head_dim", "mamba_head_dim"),
    _spec("mamba_groups", "mamba_num_groups"),
    Field(
        "mamba_num_heads",
        lambda s, lay: s.mamba_heads,
        # megatron-core's default: d_inner = 2 x hidden (expand 2), heads = d_inner / head_dim
        lambda a: {"mamba_heads": a["mamba_num_heads"] or 2 * a["hidden_size"] // a["mamba_head_dim"]},
    ),
    # megatron-core's mixer has a fixed causal-conv kernel width (MambaMixer d_conv=4): no arg
    Field("mamba_d_conv", None, lambda a: {"mamba_conv_kernel": 4}),
    Field("position_embedding_type", lambda s, lay: "none", when=_mamba_model),
    Field("use_rotary_position_embeddings", lambda s, lay: False, when=_mamba_model),
    # no attention layer (Mamba-2): megatron-core's TransformerConfig still divides by
    # num_attention_heads (kv_channels = hidden / heads) and wants a multiple of TP; the Mamba
    # heads are one for every TP the mixer allows (it needs heads % TP == 0)
    Field("num_attention_heads", lambda s, lay: s.mamba_heads, when=_no_attention),
    Field("num_query_groups", lambda s, lay: s.mamba_heads, when=_no_attention),
    Field("kv_channels", lambda s, lay: s.mamba_head_dim, when=_no_attention),
)
# what a hybrid model's args say for blocks its pattern may lack (ModelSpec fields, and the blocks
# that use them): without such a block they describe nothing
_USED_BY = (
    (
        ("attention", "global_attention", "window_attention"),
        ("num_heads", "num_kv_heads", "head_dim", "qkv_bias", "o_bias", "qk_norm"),
    ),
    (("mlp",), ("ffn_hidden_size",)),
    (("mlp", "moe"), ("gated_mlp", "activation", "mlp_bias")),
)


def _written(fields: tuple[Field, ...], spec: ModelSpec, layout: Layout) -> dict[str, Any]:
    return {f.arg: f.write(spec, layout) for f in fields if f.write is not None and f.when(spec)}


def spec_values(a: Args) -> dict[str, Any]:
    """The ModelSpec fields Megatron ``args`` give (with Megatron-LM's defaults), read through the
    same table :func:`build_args` writes."""
    v: dict[str, Any] = {}
    hybrid = a.hybrid
    blocks = {b for layer in from_pattern(a.hybrid_pattern(), a.where) for b in layer} if hybrid else set()
    moe = a.moe and (not hybrid or "moe" in blocks)
    groups = (
        MODEL_FIELDS,
        MOE_FIELDS if moe else (),
        MLA_FIELDS if a.mla else (),
        MAMBA_FIELDS if hybrid else (),
        GDN_FIELDS if a["experimental_attention_variant"] == "gated_delta_net" else (),
    )
    for fields in groups:
        for f in fields:
            if f.read is not None:
                v.update(f.read(a))
    if hybrid:  # the pattern places MLP and MoE layers (not moe_layer_freq)
        v.pop("dense_layers", None)
        for users, unused in _USED_BY:
            if not blocks.intersection(users):
                for k in unused:
                    v.pop(k, None)
    return v


def build_args(
    spec: ModelSpec,
    layout: Layout,
    hf_config: dict[str, Any] | None,
    family_ms_name: str,
    source: dict[str, Any] | None = None,
    hf_naming: str | None = None,
) -> argparse.Namespace:
    """``args`` for a rank file: the HF config's plain values (as MindSpeed-LLM stores them) plus
    the Megatron fields that Megatron-LM and MindSpeed-LLM read back.

    ``source`` (a Megatron source's args) is carried whole, so a resumed run keeps its training
    settings and counters (``consumed_train_samples``, ``lr``, ``train_iters``, tokenizer,
    ``make_vocab_size_divisible_by``, Megatron's enums...): only the fields this conversion
    decides (model shape, parallel layout, dtype, ckpt-ir's own) and the HF values it copies over
    plain source values are replaced; layout fields the target does not use become None.
    ``hf_naming``: the HF naming the model was read in when not its family table's (recorded as
    ``ckpt_ir_hf_naming``, so that an HF export writes that naming again)."""
    src = dict(source or {})
    ns = argparse.Namespace(**src)
    cfg = dict(hf_config or spec.extra)
    for k, v in cfg.items():
        if isinstance(v, _PLAIN) and k not in _NOT_HF and (k not in src or isinstance(src[k], _PLAIN)):
            setattr(ns, k, v)
    fields = _written(MODEL_FIELDS, spec, layout)
    fields.update(
        {
            "tensor_model_parallel_size": layout.tp,
            "pipeline_model_parallel_size": layout.pp,
            "expert_model_parallel_size": 1,
            "transformer_impl": "local" if layout.norm_names == "local" else "transformer_engine",
            "bf16": spec.dtype == "BF16",
            "fp16": spec.dtype == "F16",
            "model_type_hf": family_ms_name,
            "ckpt_ir_family": spec.family,
            "ckpt_ir_hf_config": json.dumps(cfg, sort_keys=True),
        }
    )
    if hf_naming is not None:
        fields["ckpt_ir_hf_naming"] = hf_naming
    # transformers 5 nests rope settings under rope_parameters; older configs keep rope_theta on top
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    if theta is not None:
        fields["rotary_base"] = theta
    partial = cfg.get(
        "partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor")
    )
    if partial is not None:  # GLM: rotary on a fraction of each head
        fields["rotary_percent"] = partial
    if layout.num_layer_list:
        fields["num_layer_list"] = ",".join(map(str, layout.num_layer_list))
    if layout.noop_layers:
        fields["noop_layers"] = ",".join(map(str, layout.noop_layers))
    if layout.vpp_layers:
        fields["num_layers_per_virtual_pipeline_stage"] = layout.vpp_layers
        fields["virtual_pipeline_model_parallel_size"] = num_chunks(spec, layout)
    if spec.num_experts:
        fields.update(_written(MOE_FIELDS, spec, layout))
    if spec.mla:
        fields.update(_written(MLA_FIELDS, spec, layout))
        fields.update(mla_rope_args(cfg))
    if has_gdn_modules(spec) and layout.gdn_keys == "mcore":
        fields.update(_written(GDN_FIELDS, spec, layout))
    if is_hybrid(spec):
        fields.update(_written(MAMBA_FIELDS, spec, layout))
        if layout.norm_names == "te":  # megatron-core's own layer spec (Megatron-LM loads it as --spec)
            fields["spec"] = MAMBA_STACK_SPEC
    from ckpt_ir.families import by_name

    family = by_name(spec.family)
    if family.megatron_args:  # the family's own settings (router, windows, rope bases, ...)
        fields.update(family.megatron_args(cfg))
    # DSA (beside MLA): the indexer sizes ride along from the HF config (index_n_heads, ...)
    if spec.index_heads and spec.mla:
        fields["enable_dsa_indexer"] = True
    fields["mtp_num_layers"] = spec.mtp_layers  # as MindSpeed-LLM writes it, 0 included
    if spec.lora_rank is not None:
        fields["lora_r"] = spec.lora_rank
        if spec.lora_alpha is not None:
            fields["lora_alpha"] = spec.lora_alpha
    if src:
        fields.update({k: None for k in _LAYOUT_ARGS if k in src and k not in fields})
        if "params_dtype" in src:  # as Megatron derives it from --bf16 / --fp16
            from ckpt_ir.io.safe_pickle import TorchDtype

            fields["params_dtype"] = TorchDtype(
                "bfloat16" if fields["bf16"] else "float16" if fields["fp16"] else "float32"
            )
        divisor, rows = src.get("make_vocab_size_divisible_by"), fields["padded_vocab_size"]
        if isinstance(divisor, int) and divisor > 0:  # Megatron-LM pads to a multiple of it x TP
            if padded_size(spec.vocab_size, divisor, layout.tp) != rows:  # one that gives these rows
                fields["make_vocab_size_divisible_by"] = rows // layout.tp
        if "ckpt_format" in src:  # ckpt-ir writes the torch format, whatever the source was
            fields["ckpt_format"] = "torch"
        dp, cp = src.get("data_parallel_size"), src.get("context_parallel_size") or 1
        if "world_size" in src and isinstance(dp, int) and isinstance(cp, int):
            fields["world_size"] = layout.tp * layout.pp * dp * cp
    if spec.family == "megatron":  # described by the source's args: keep what decides the maths
        for k in _ARGS_ONLY_KEEP:
            fields.pop(k, None)
    for k, v in fields.items():
        setattr(ns, k, v)
    return ns


def mla_rope_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """Multi-latent attention's rotary settings under MLATransformerConfig's field names (Megatron-LM
    args of the same names; Megatron-Bridge's MLA mapping): megatron-core's MLA builds its own
    rotary embedding from them, and its defaults (YaRN with factor 40) are DeepSeek-V3's, so a
    plain rotary is written as ``rope_type`` rope.  HF's yarn ``rope_parameters`` (``rope_scaling``
    in older configs) map one to one; other rope types have no MLA form and write nothing."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {"rope_type": "rope", "rotary_scaling_factor": 1.0}
    if kind != "yarn":
        return {}
    return {
        "rope_type": "yarn",
        "rotary_scaling_factor": params["factor"],
        "original_max_position_embeddings": params.get("original_max_position_embeddings"),
        "beta_fast": params.get("beta_fast") or 32,
        "beta_slow": params.get("beta_slow") or 1,
        "mscale": params.get("mscale") or 1.0,
        "mscale_all_dim": params.get("mscale_all_dim") or 0.0,
    }


# what a family-less (args-only) model's own args say and a spec does not fully capture
# (position type, activation, rotary settings), or that would name an HF family it has not
_ARGS_ONLY_KEEP = (
    "normalization",
    "swiglu",
    "bias_gelu_fusion",
    "add_qkv_bias",
    "add_bias_linear",
    "qk_layernorm",
    "post_norm",
    "position_embedding_type",
    "use_rotary_position_embeddings",
    "rotary_base",
    "rotary_percent",
    "model_type_hf",
    "ckpt_ir_hf_config",
    "num_key_value_heads",
)


def int_list(value: Any) -> tuple[int, ...] | None:
    """Megatron/MindSpeed store layer lists as '2,6', '[2, 6]', a list, a set (MindSpeed's
    argument validation turns ``noop_layers`` into one), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) or None
    text = str(value).strip().strip("[]")
    return tuple(int(v) for v in re.split(r"[,\s]+", text) if v) or None


def hf_config_from_args(args: dict[str, Any]) -> dict[str, Any]:
    """Recover the HF config: our own JSON copy when present, else the HF-style keys MindSpeed-LLM
    copies into args (with its Megatron-named fields mapped back)."""
    raw = args.get("ckpt_ir_hf_config")
    if raw is not None:
        try:
            cfg = json.loads(raw) if isinstance(raw, str) else None
        except json.JSONDecodeError:
            cfg = None
        if not isinstance(cfg, dict):
            raise ValueError("args.ckpt_ir_hf_config is not a JSON object; the args are corrupt")
        return cfg
    cfg = {k: v for k, v in args.items() if k not in _NOT_HF and isinstance(v, (int, float, str, bool, list))}
    num_layers = args.get("num_layers")
    try:
        real_layers = (
            num_layers - len(int_list(args.get("noop_layers")) or ()) if isinstance(num_layers, int) else None
        )
    except (TypeError, ValueError):
        real_layers = None
    fallbacks = {
        "num_hidden_layers": real_layers,
        "intermediate_size": args.get("ffn_hidden_size"),
        "num_key_value_heads": args.get("num_query_groups") if args.get("group_query_attention") else None,
        "head_dim": args.get("kv_channels"),
        "rms_norm_eps": args.get("norm_epsilon"),
        "tie_word_embeddings": (not args["untie_embeddings_and_output_weights"])
        if "untie_embeddings_and_output_weights" in args
        else None,
        "rope_theta": args.get("rotary_base"),
    }
    for k, v in fallbacks.items():
        if cfg.get(k) is None and v is not None:
            cfg[k] = v
    return cfg


def all_args(args: Any) -> dict[str, Any]:
    """Every field of the source's args, Megatron enums and config objects (stubs) included: an
    mcore target carries them (see :func:`build_args`)."""
    d = args if isinstance(args, dict) else vars(args) if hasattr(args, "__dict__") else {}
    return {k: v for k, v in d.items() if isinstance(k, str)}


def args_dict(args: Any, where: str) -> dict[str, Any]:
    """The plain values of Megatron's ``args`` (inert stand-ins of Megatron classes left out)."""
    from ckpt_ir.io.safe_pickle import Stub

    if args is None:
        raise FormatError(
            f"{where}: checkpoint has no 'args'; ckpt-ir needs them to know the model and layout"
        )
    if isinstance(args, dict):
        d = args
    elif hasattr(args, "__dict__"):
        d = vars(args)
    else:
        raise FormatError(f"{where}: 'args' is a {type(args).__name__}, not Megatron's argument namespace")
    return {k: v for k, v in d.items() if isinstance(k, str) and not isinstance(v, Stub)}
