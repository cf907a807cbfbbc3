"""Megatron args, both ways: the ``args`` namespace a rank file carries, built from a ModelSpec and
Layout (:func:`build_args`), and read back (:func:`hf_config_from_args`, :func:`args_dict`).
Which HF family plain Megatron-LM args describe is :mod:`ckpt_ir.megatron.infer`."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from ckpt_ir.errors import FormatError
from ckpt_ir.ir.layout import Layout, mcore_num_layers, num_chunks
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
    total = mcore_num_layers(spec, layout)
    fields: dict[str, Any] = {
        "num_layers": total,
        "hidden_size": spec.hidden_size,
        "ffn_hidden_size": spec.ffn_hidden_size,
        "num_attention_heads": spec.num_heads,
        "num_query_groups": spec.num_kv_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "group_query_attention": spec.num_kv_heads != spec.num_heads,
        "kv_channels": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "padded_vocab_size": layout.padded_vocab or spec.vocab_size,
        "norm_epsilon": spec.norm_eps,
        "normalization": "LayerNorm" if spec.norm_bias else "RMSNorm",
        "swiglu": spec.activation == "silu",
        "add_qkv_bias": spec.qkv_bias,
        "add_bias_linear": False,
        "qk_layernorm": spec.qk_norm,
        "post_norm": spec.post_norms,
        "untie_embeddings_and_output_weights": not spec.tied_embeddings,
        "position_embedding_type": "rope",
        "use_rotary_position_embeddings": True,
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
        fields.update(
            {
                "num_experts": spec.num_experts,
                "moe_router_topk": spec.moe_topk,
                "moe_ffn_hidden_size": spec.moe_ffn_hidden_size,
                "moe_grouped_gemm": layout.grouped_gemm,
                "expert_model_parallel_size": layout.ep,
                "expert_tensor_parallel_size": layout.expert_tp,
            }
        )
        if spec.shared_ffn_hidden_size:
            fields["moe_shared_expert_intermediate_size"] = spec.shared_ffn_hidden_size
        # Megatron's per-layer pattern: 1 = MoE, 0 = dense MLP
        fields["moe_layer_freq"] = (
            [0 if i in spec.dense_layers else 1 for i in range(spec.num_layers)] if spec.dense_layers else 1
        )
        fields["moe_shared_expert_gate"] = fields["shared_expert_gate"] = spec.shared_expert_gate
    if spec.mla:
        fields.update(
            {
                "multi_latent_attention": True,
                "q_lora_rank": spec.q_lora_rank or None,
                "kv_lora_rank": spec.kv_lora_rank,
                "qk_head_dim": spec.qk_nope_dim,
                "qk_pos_emb_head_dim": spec.qk_rope_dim,
                "v_head_dim": spec.v_head_dim,
                **mla_rope_args(cfg),
            }
        )
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
            from ckpt_ir.passes.vocab import padded_size

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
