"""Megatron-Core ``torch`` checkpoint conventions shared by its frontend and backend: the key
table (local and Transformer-Engine norm names), rank directory names, and ``args``.

Layout on disk (Megatron-LM ``get_checkpoint_name``; MindSpeed-LLM writes the same)::

    latest_checkpointed_iteration.txt            "1"
    iter_0000001/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
        {"args": Namespace, "checkpoint_version": 3.0, "iteration": 1, "model": {...}}
        (with VPP: "model0" ... "model{V-1}")

Layer numbers in keys are local to the stage / VPP chunk; no-op layers leave gaps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

import attrs

from ckpt_ir.errors import FormatError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.layout import Layout, mcore_num_layers, num_chunks
from ckpt_ir.ir.names import NameTable, expert_of, layer_name, split_layer
from ckpt_ir.ir.rules import Stack
from ckpt_ir.ir.spec import ModelSpec

D = "decoder.layers.{i}."
C = "layers.{i}."

# Per-layer order follows MindSpeed-LLM's writer (norms, attention, then MLP), so rank files list
# keys in the same order as that converter's.
_ATTENTION_KEYS = (
    # gated attention (Qwen3-Next, MindSpeed-LLM's qkv_type "mix"): q (with its gate), k, v unfused,
    # first as MindSpeed writes them (a layer has either these or linear_qkv)
    (D + "self_attention.q_proj.weight", C + "attn.q.weight"),
    (D + "self_attention.k_proj.weight", C + "attn.k.weight"),
    (D + "self_attention.v_proj.weight", C + "attn.v.weight"),
    (D + "self_attention.linear_qkv.weight", C + "attn.qkv.weight"),
    (D + "self_attention.linear_proj.weight", C + "attn.o.weight"),
    (D + "self_attention.linear_proj.bias", C + "attn.o.bias"),
    (D + "self_attention.q_layernorm.weight", C + "attn.q_norm.weight"),
    (D + "self_attention.k_layernorm.weight", C + "attn.k_norm.weight"),
    (D + "self_attention.linear_qkv.bias", C + "attn.qkv.bias"),  # after the q/k norms (GLM-4.5)
    (D + "self_attention.core_attention.softmax_offset", C + "attn.sinks"),
    # gated-delta-net linear attention layers (MindSpeed-LLM's qwen3-next names, HF packing)
    (D + "self_attention.A_log", C + "attn.gdn.A_log"),
    (D + "self_attention.conv1d.weight", C + "attn.gdn.conv1d.weight"),
    (D + "self_attention.dt_bias", C + "attn.gdn.dt_bias"),
    (D + "self_attention.in_proj_ba.weight", C + "attn.gdn.in_ba.weight"),
    (D + "self_attention.in_proj_qkvz.weight", C + "attn.gdn.in_qkvz.weight"),
    (D + "self_attention.norm.weight", C + "attn.gdn.norm.weight"),
    (D + "self_attention.out_proj.weight", C + "attn.gdn.out.weight"),
    (D + "self_attention.q_layernorm.bias", C + "attn.q_norm.bias"),
    (D + "self_attention.k_layernorm.bias", C + "attn.k_norm.bias"),
)
# multi-latent attention: linear_qkv stacks the q (or q_a) and kv_a down-projections
_MLA_ATTENTION_KEYS = (
    (D + "self_attention.linear_qkv.weight", C + "attn.qkv_a.weight"),
    (D + "self_attention.linear_proj.weight", C + "attn.o.weight"),
    (D + "self_attention.q_layernorm.weight", C + "attn.q_a_norm.weight"),
    (D + "self_attention.kv_layernorm.weight", C + "attn.kv_a_norm.weight"),
    (D + "self_attention.linear_q_up_proj.weight", C + "attn.q_b.weight"),
    (D + "self_attention.linear_kv_up_proj.weight", C + "attn.kv_b.weight"),
    # DSA indexer, under MindSpeed-LLM's names (megatron-core's own DSAIndexer calls the same
    # tensors core_attention.indexer.linear_wq_b / linear_wk / k_norm / linear_weights_proj), in
    # MindSpeed's key order
    (D + "self_attention.dsa_indexer.k_norm.weight", C + "attn.indexer.k_norm.weight"),
    (D + "self_attention.dsa_indexer.k_norm.bias", C + "attn.indexer.k_norm.bias"),
    (D + "self_attention.dsa_indexer.weights_proj.weight", C + "attn.indexer.weights_proj.weight"),
    (D + "self_attention.dsa_indexer.wk.weight", C + "attn.indexer.wk.weight"),
    (D + "self_attention.dsa_indexer.wq_b.weight", C + "attn.indexer.wq_b.weight"),
)
# Megatron-Core's own MLA modules, as torch_dist stores them (keys below ``decoder.layers.<i>.``):
# the two down-projections apart (the torch format keeps MindSpeed-LLM's fused linear_qkv) and
# every norm a module of its own; with Transformer Engine the q / kv norms are fused into the
# up-projections (MCORE_MLA_TE_NORMS)
MCORE_MLA_KEYS = (
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attention.linear_q_down_proj.weight", "attn.q_a.weight"),
    ("self_attention.linear_q_proj.weight", "attn.q.weight"),
    ("self_attention.linear_kv_down_proj.weight", "attn.kv_a.weight"),
    ("self_attention.q_layernorm.weight", "attn.q_a_norm.weight"),
    ("self_attention.kv_layernorm.weight", "attn.kv_a_norm.weight"),
    ("self_attention.linear_q_up_proj.weight", "attn.q_b.weight"),
    ("self_attention.linear_kv_up_proj.weight", "attn.kv_b.weight"),
    ("pre_mlp_layernorm.weight", "mlp_norm.weight"),
)
MCORE_MLA_TE_NORMS = (
    ("self_attention.linear_q_up_proj.layer_norm_weight", "attn.q_a_norm.weight"),
    ("self_attention.linear_kv_up_proj.layer_norm_weight", "attn.kv_a_norm.weight"),
)
_NORM_KEYS = (
    (D + "input_layernorm.weight", C + "attn_norm.weight"),
    (D + "input_layernorm.bias", C + "attn_norm.bias"),
    (D + "pre_mlp_layernorm.weight", C + "mlp_norm.weight"),
    (D + "pre_mlp_layernorm.bias", C + "mlp_norm.bias"),
    (D + "post_attn_norm.weight", C + "post_attn_norm.weight"),
    (D + "post_mlp_layernorm.weight", C + "post_mlp_norm.weight"),
)
_MLP_KEYS = (
    (D + "mlp.linear_fc1.weight", C + "mlp.gate_up.weight"),
    (D + "mlp.linear_fc1.bias", C + "mlp.gate_up.bias"),
    (D + "mlp.linear_fc2.weight", C + "mlp.down.weight"),
    (D + "mlp.linear_fc2.bias", C + "mlp.down.bias"),
    (D + "mlp.router.weight", C + "mlp.router.weight"),
    (D + "mlp.router.expert_bias", C + "mlp.router.bias"),
    (D + "mlp.router.bias", C + "mlp.router.logit_bias"),
    (D + "mlp.shared_experts.gate_weight", C + "mlp.shared_gate.weight"),
    (D + "mlp.shared_experts.linear_fc1.weight", C + "mlp.shared.gate_up.weight"),
    (D + "mlp.shared_experts.linear_fc1.bias", C + "mlp.shared.gate_up.bias"),
    (D + "mlp.shared_experts.linear_fc2.weight", C + "mlp.shared.down.weight"),
    (D + "mlp.shared_experts.linear_fc2.bias", C + "mlp.shared.down.bias"),
    # {e} is the expert's index local to its EP rank; written expert by expert (fc1, fc2, fc1, ...)
    (D + "mlp.experts.local_experts.{e}.linear_fc1.weight", C + "mlp.experts.{e}.gate_up.weight"),
    (D + "mlp.experts.local_experts.{e}.linear_fc1.bias", C + "mlp.experts.{e}.gate_up.bias"),
    (D + "mlp.experts.local_experts.{e}.linear_fc2.weight", C + "mlp.experts.{e}.down.weight"),
    (D + "mlp.experts.local_experts.{e}.linear_fc2.bias", C + "mlp.experts.{e}.down.bias"),
)
# Per-layer order follows MindSpeed-LLM's writer (norms, attention, then MLP), so rank files list
# keys in the same order as that converter's.
_LAYER_KEYS = _NORM_KEYS + _ATTENTION_KEYS + _MLP_KEYS
# canonical roles megatron-core keeps in fp32 whatever params_dtype: the router's expert_bias, a
# buffer it returns to fp32 before every save and load (moe/router.py _maintain_float32_expert_bias)
KEPT_FP32 = (C + "mlp.router.bias",)
_MLA_LAYER_KEYS = _NORM_KEYS + _MLA_ATTENTION_KEYS + _MLP_KEYS
GROUPED = {"weight1": "gate_up", "weight2": "down"}  # D + "mlp.experts.weight1" holds every local expert
GROUPED_KEY = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.(weight1|weight2)$")


# Grouped GEMM stores a layer's local experts as one raw memory view: ``weight1`` is
# (E_loc, H, 2F/T) -- block e the transpose of expert e's fc1 shard -- viewed as [H, E_loc*2F/T];
# ``weight2`` is (E_loc, F/T, H) viewed as [E_loc*F/T, H].  One stack rule, both directions.
def _expert_stack(experts: int) -> Stack:
    return Stack.of((str(j), 1) for j in range(experts))


def group_experts(kind: str, shards: list[E.Expr]) -> E.Expr:
    """The grouped-GEMM view of the local experts' (TP-sharded) fc1 [2F/T, H] or fc2 [H, F/T]."""
    blocks = [E.Transpose(s, 0, 1) for s in shards]
    rows, cols = blocks[0].shape
    stacked = _expert_stack(len(blocks)).fuse(
        {str(j): E.Reshape(b, (1, rows, cols)) for j, b in enumerate(blocks)}
    )
    shape = (rows, len(blocks) * cols) if kind == "weight1" else (len(blocks) * rows, cols)
    return E.simplify(E.Reshape(stacked, shape))


def ungroup_experts(kind: str, expr: E.Expr, experts: int) -> list[E.Expr]:
    """Inverse of :func:`group_experts`: each local expert's (TP-sharded) fc1 or fc2."""
    if kind == "weight1":  # [H, E*2F/T] viewed as (E, H, 2F/T)
        h, cols = expr.shape
        view = E.Reshape(expr, (experts, h, cols // experts))
    else:  # [E*F/T, H] viewed as (E, F/T, H)
        rows, h = expr.shape
        view = E.Reshape(expr, (experts, rows // experts, h))
    _, a, b = view.shape
    parts = _expert_stack(experts).split(view)
    return [E.simplify(E.Transpose(E.Reshape(parts[str(j)], (a, b)), 0, 1)) for j in range(experts)]


_TE_NORMS = {
    D + "input_layernorm.weight": D + "self_attention.linear_qkv.layer_norm_weight",
    D + "pre_mlp_layernorm.weight": D + "mlp.linear_fc1.layer_norm_weight",
    D + "input_layernorm.bias": D + "self_attention.linear_qkv.layer_norm_bias",
    D + "pre_mlp_layernorm.bias": D + "mlp.linear_fc1.layer_norm_bias",
}
PRE_LAYERS = (
    ("embedding.word_embeddings.weight", "embed.weight"),
    ("embedding.position_embeddings.weight", "pos_embed.weight"),
    # BLOOM's embedding LayerNorm (MindSpeed-LLM's module path)
    ("embedding.word_embeddings.norm.weight", "embed_norm.weight"),
    ("embedding.word_embeddings.norm.bias", "embed_norm.bias"),
)
POST_LAYERS = (
    ("decoder.final_layernorm.weight", "final_norm.weight"),
    ("decoder.final_layernorm.bias", "final_norm.bias"),
    ("output_layer.weight", "lm_head.weight"),
    ("output_layer.bias", "lm_head.bias"),
)
# multi-token prediction (last stage): its transformer layer's keys are a decoder layer's under
# mtp.layers.{k}.transformer_layer.; with MTP the main final norm is a top-level final_layernorm
MTP_PREFIX = "mtp.layers.{k}.transformer_layer."
MTP_KEYS = (
    ("mtp.layers.{k}.enorm.weight", "mtp.enorm.weight"),
    ("mtp.layers.{k}.hnorm.weight", "mtp.hnorm.weight"),
    ("mtp.layers.{k}.eh_proj.weight", "mtp.eh_proj.weight"),
    ("mtp.final_layernorms.{k}.weight", "mtp.norm.weight"),
)
MTP_FINAL_NORM = "final_layernorm.weight"


# MiniMax-M2's full-width q/k norms take the per-head norms' keys (MindSpeed-LLM, Megatron-Bridge)
_FULL_QK_NORM = {
    C + "attn.q_norm.weight": C + "attn.q_full_norm.weight",
    C + "attn.k_norm.weight": C + "attn.k_full_norm.weight",
}


def _layer_keys(mla: bool, full_qk_norm: bool, family: str | None = None, gated: bool = True):
    """The decoder-layer keys; a plain (not gated) MLP's linear_fc1 is the canonical fc1."""
    keys = _MLA_LAYER_KEYS if mla else _LAYER_KEYS
    if full_qk_norm:
        keys = tuple((m, _FULL_QK_NORM.get(c, c)) for m, c in keys)
    if family is not None:  # a family's own keys for some roles (Gemma 3's post norms, Megatron-Bridge)
        from ckpt_ir.families import by_name

        own = {c: m for m, c in by_name(family).megatron_keys}
        keys = tuple((own.get(c, m), c) for m, c in keys)
    return keys if gated else tuple((m, c.replace(".gate_up.", ".fc1.")) for m, c in keys)


def _table(keys, norm_names: str) -> NameTable:
    if norm_names == "local":
        return NameTable(keys)
    renames = (
        dict(_TE_NORMS)
        if norm_names == "te"
        else {m: _TE_NORMS[m] for m in (D + "input_layernorm.weight", D + "input_layernorm.bias")}
    )
    return NameTable((renames.get(m, m), c) for m, c in keys)


LOCAL_LAYER_TABLE = _table(_LAYER_KEYS, "local")
TE_LAYER_TABLE = _table(_LAYER_KEYS, "te")
READ_TABLES = (LOCAL_LAYER_TABLE, TE_LAYER_TABLE)
GLOBAL_TABLE = NameTable(PRE_LAYERS + POST_LAYERS)

EXTRA_STATE = "._extra_state"


def extra_state_layout(spec: ModelSpec, layout: Layout) -> tuple:
    """What decides whether Transformer Engine's per-module ``_extra_state`` (FP8 scaling state of
    one TP shard) still belongs to the same module shard after a conversion: the layers, the
    (expert) TP sizes, the expert storage and the module types (norm naming)."""
    return (
        spec.num_layers,
        spec.mtp_layers,
        layout.tp,
        layout.expert_tp if spec.num_experts else None,
        layout.grouped_gemm,
        layout.norm_names,
    )


# Megatron / MindSpeed LoRA: X.lora_A.default.weight [r, in] and X.lora_B.default.weight [out, r]
# beside the base X.weight, which LoRA training stores as X.base_layer.weight.
LORA_KEY = re.compile(r"^(.*)\.lora_([AB])(?:\.default)?\.weight$")
CANONICAL_LORA = {"A": ".lora_a.weight", "B": ".lora_b.weight"}


def lora_key(target_key: str, which: str) -> str:
    """``...linear_qkv.weight`` -> ``...linear_qkv.lora_A.default.weight``."""
    return target_key[: -len(".weight")] + (".lora_A" if which == "a" else ".lora_B") + ".default.weight"


def layer_table(
    norm_names: str,
    mla: bool = False,
    full_qk_norm: bool = False,
    family: str | None = None,
    gated: bool = True,
) -> NameTable:
    """Decoder-layer key table for a naming (``local``, ``te``, ``te-input``; MindSpeed-LLM v2's
    transformer_engine output fuses only the input norm for dense layers)."""
    return _table(_layer_keys(mla, full_qk_norm, family, gated), norm_names)


def spec_layer_table(norm_names: str, spec: ModelSpec) -> NameTable:
    """:func:`layer_table` for the model ``spec`` describes."""
    return layer_table(norm_names, spec.mla, spec.qk_full_norm, spec.family, spec.gated_mlp)


def read_tables(spec: ModelSpec) -> tuple[NameTable, ...]:
    """The decoder-layer tables a reader tries (local and TE norm names) for ``spec``."""
    return tuple(spec_layer_table(n, spec) for n in ("local", "te"))


def role_order(mla: bool, full_qk_norm: bool = False, gated: bool = True) -> tuple[str, ...]:
    return tuple(c for _, c in _layer_keys(mla, full_qk_norm, gated=gated))


def rank_dir(tp: int, pp: int, layout: Layout, ep: int = 0, ep_size: int = 1) -> str:
    name = f"mp_rank_{tp:02d}"
    if layout.pp > 1:
        name += f"_{pp:03d}"
    if ep_size > 1:
        name += f"_{ep:03d}"
    return name


RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def iter_dir(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


# ---------------------------------------------------------------------------------------------
# args

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


# ---------------------------------------------------------------------------------------------
# reading: the shared end of the torch and torch_dist frontends


def iteration_dir(path: str) -> tuple[str, Any]:
    """(the iteration directory, its iteration) of a Megatron checkpoint: the one
    ``latest_checkpointed_iteration.txt`` names, the only ``iter_*``, or ``path`` itself."""
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if text == "release":
            it: Any = "release"
        else:
            try:
                it = int(text)
            except ValueError:
                raise FormatError(
                    f"{tracker}: expected an iteration number or 'release', found {text!r}"
                ) from None
        d = os.path.join(path, iter_dir(it))
        if not os.path.isdir(d):
            raise FormatError(f"{tracker}: names iteration {text} but {d} does not exist")
        return d, it
    names = os.listdir(path)
    if any(RANK_DIR.match(n) for n in names):
        return path, 1
    iters = sorted(n for n in names if n.startswith("iter_") or n == "release")
    if len(iters) > 1:
        raise FormatError(
            f"{path}: several iterations ({', '.join(iters)}) and no latest_checkpointed_iteration.txt; "
            f"point at one iter_* directory"
        )
    if not iters:
        raise FormatError(
            f"{path}: no iter_* directory or latest_checkpointed_iteration.txt; not a Megatron checkpoint"
        )
    it = "release" if iters[0] == "release" else int(iters[0][5:])
    return os.path.join(path, iters[0]), it


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


@attrs.frozen
class LocalName:
    """A canonical name read from a Megatron key whose layer number is still the rank file's own:
    local layer ``local`` of pipeline stage ``stage`` / virtual chunk ``chunk``, or, with ``mtp``,
    multi-token-prediction layer ``local``.  The layout resolves it to the model's layer."""

    rest: str  # the canonical name below the layer, e.g. attn.qkv.weight
    local: int
    stage: int = 0
    chunk: int = 0
    mtp: bool = False

    def resolve(self, slot_of: dict, main_layers: int, where: str) -> str:
        """The canonical name; ``slot_of`` maps (stage, chunk, local) to the layout's layer slot."""
        if self.mtp:  # multi-token-prediction layer k is model layer main_layers + k
            return layer_name(main_layers + self.local, self.rest)
        slot = slot_of.get((self.stage, self.chunk, self.local))
        if slot is None or slot.real is None:
            kind = "a no-op layer" if slot is not None else "no layer"
            raise FormatError(
                f"{where}: stage {self.stage} chunk {self.chunk} has local layer {self.local}, but the "
                f"layout in args puts {kind} there; args (num_layers, noop_layers, num_layer_list) do "
                f"not match the weights"
            )
        return layer_name(slot.real, self.rest)

    def __str__(self) -> str:
        where = (
            f"mtp {self.local}" if self.mtp else f"stage {self.stage} chunk {self.chunk} local {self.local}"
        )
        return f"layers.<{where}>.{self.rest}"


def canonical_key(key: str, stage: int = 0, chunk: int = 0, tables=READ_TABLES) -> str | LocalName | None:
    """The canonical name of Megatron key ``key`` in a rank file of ``stage`` / ``chunk`` (layer
    keys as :class:`LocalName`), or None if the key means nothing to ckpt-ir."""
    key = key.replace(".base_layer.", ".")
    m = LORA_KEY.match(key)
    if m:
        target = canonical_key(m.group(1) + ".weight", stage, chunk, tables)
        if target is None:
            return None
        suffix = CANONICAL_LORA[m.group(2)]
        if isinstance(target, LocalName):
            return attrs.evolve(target, rest=target.rest[: -len(".weight")] + suffix)
        return target[: -len(".weight")] + suffix
    glob = GLOBAL_TABLE.to_canonical(key)
    if glob is not None:
        return glob
    for table in tables:
        c = table.to_canonical(key)
        if c is not None:
            layer, rest = split_layer(c)
            assert layer is not None
            return LocalName(rest, layer, stage, chunk)
    return None


def with_global_expert(name: str | LocalName, first_expert: int) -> tuple[str | LocalName, bool]:
    """(``name`` with a rank-local expert number made global by adding ``first_expert``, whether
    it is an expert tensor)."""
    rest = name.rest if isinstance(name, LocalName) else name
    expert = expert_of(rest)
    if expert is None:
        return name, False
    rest = rest.replace(f".experts.{expert}.", f".experts.{first_expert + expert}.")
    return (attrs.evolve(name, rest=rest) if isinstance(name, LocalName) else rest), True
