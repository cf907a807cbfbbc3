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
from ckpt_ir.ir.blocks import has_gdn_modules
from ckpt_ir.ir.layout import Layout, mcore_num_layers, num_chunks, padded_size
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
    }
)


# layout fields a source may set and the target may not: reset to Megatron's default (None)
_LAYOUT_ARGS = (
    "num_layer_list",
    "noop_layers",
    "num_layers_per_virtual_pipeline_stage",
    "virtual_pipeline_model_parallel_size",
    "expert_tensor_parallel_size",
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
    }

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args

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
        return int(self.args["num_layers"]) - len(int_list(self.args.get("noop_layers")) or ())

    @property
    def mla(self) -> bool:
        return bool(self["multi_latent_attention"])

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
    pattern = [int(i in s.linear_layers) for i in range(s.num_layers)]
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
# zero-centred (apply_layernorm_1p: 1 + w, as Qwen3-Next's and Qwen3.5's HF norms)
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
    Field("apply_layernorm_1p", lambda s, lay: True),
)


def _written(fields: tuple[Field, ...], spec: ModelSpec, layout: Layout) -> dict[str, Any]:
    return {f.arg: f.write(spec, layout) for f in fields if f.write is not None and f.when(spec)}


def spec_values(a: Args) -> dict[str, Any]:
    """The ModelSpec fields Megatron ``args`` give (with Megatron-LM's defaults), read through the
    same table :func:`build_args` writes."""
    v: dict[str, Any] = {}
    gdn = a["experimental_attention_variant"] == "gated_delta_net"
    groups = (
        MODEL_FIELDS,
        MOE_FIELDS if a.moe else (),
        MLA_FIELDS if a.mla else (),
        GDN_FIELDS if gdn else (),
    )
    for fields in groups:
        for f in fields:
            if f.read is not None:
                v.update(f.read(a))
    return v


def build_args(
    spec: ModelSpec,
    layout: Layout,
    hf_config: dict[str, Any] | None,
    family_ms_name: str,
    source: dict[str, Any] | None = None,
) -> argparse.Namespace:
    """``args`` for a rank file: the HF config's plain values (as MindSpeed-LLM stores them) plus
    the Megatron fields that Megatron-LM and MindSpeed-LLM read back.

    ``source`` (a Megatron source's args) is carried whole, so a resumed run keeps its training
    settings and counters (``consumed_train_samples``, ``lr``, ``train_iters``, tokenizer,
    ``make_vocab_size_divisible_by``, Megatron's enums...): only the fields this conversion
    decides (model shape, parallel layout, dtype, ckpt-ir's own) and the HF values it copies over
    plain source values are replaced; layout fields the target does not use become None."""
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
    from ckpt_ir.families import by_name

    family = by_name(spec.family)
    if family.megatron_args:  # the family's own settings (router, windows, rope bases, ...)
        fields.update(family.megatron_args(cfg))
    if spec.index_heads:  # DSA: the indexer sizes ride along from the HF config (index_n_heads, ...)
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
