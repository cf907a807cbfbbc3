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

import os
import re

import attrs

from ckpt_ir.errors import FormatError, LayoutError, UsageError, setting
from ckpt_ir.io.side_files import AUX_PATTERNS, CHAT_TEMPLATES_ENTRY
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.blocks import OWN_MIXERS
from ckpt_ir.ir.layout import LORA_KEYS, Layout, has_gdn_modules
from ckpt_ir.ir.names import COLUMN, NameTable, Split, expert_of, layer_name, split_layer
from ckpt_ir.ir.roles import Fixed, roles, split_rule
from ckpt_ir.ir.rules import Stack
from ckpt_ir.ir.spec import ModelSpec
from ckpt_ir.megatron.integrity import MANIFEST

# file and key names the frontends and backends name directly
RANK_FILE = "model_optim_rng.pt"  # a rank's model (and args, RNG, scheduler) state
DISTOPT_FILE = "distrib_optim.pt"  # its distributed-optimizer state, beside it
LAYERS = "decoder.layers."  # the decoder layers' keys start with it (then the local layer number)
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm."  # + weight / bias
OUTPUT_LAYER = "output_layer."  # + weight / bias
TE_QKV_NORM = "linear_qkv.layer_norm_weight"  # Transformer Engine's input norm, fused into linear_qkv
TE_FC1_NORM = "linear_fc1.layer_norm_weight"  # and its pre-MLP norm, fused into linear_fc1
HYBRID_FINAL_NORM = "decoder.final_norm.weight"  # a MambaModel's final norm (GPTModel: final_layernorm)
# Transformer Engine's input norm of megatron-core's GatedDeltaNet layer, fused into its in_proj
GDN_TE_NORM = "self_attention.in_proj.layer_norm_weight"
# keys only one of the two gated-delta-net layouts has (Layout.gdn_keys): MindSpeed-LLM's packed
# projections and unfused gated attention, megatron-core's fused in_proj and zero-centred out_norm
_GDN_MARKS = {
    "mindspeed": ("self_attention.in_proj_qkvz.weight", "self_attention.q_proj.weight"),
    "mcore": ("self_attention.in_proj.weight", "self_attention.out_norm.weight"),
}


def gdn_keys_of(key: str) -> str | None:
    """Whose gated-delta-net modules a Megatron key belongs to (None: either's, or neither's)."""
    return next((who for who, marks in _GDN_MARKS.items() if key.endswith(marks)), None)


def gdn_keys_from_args(spec: ModelSpec, args: dict, tp: int) -> str:
    """The gated-delta-net layout a Megatron checkpoint's args imply before its keys are read:
    megatron-core's when its GatedDeltaNet is configured (Megatron-LM's and ckpt-ir's args) or at
    TP > 1 (MindSpeed-LLM's layout exists only at TP 1), else MindSpeed-LLM's (the Layout default,
    and always for a model without gated-delta-net layers or gated attention)."""
    if not has_gdn_modules(spec):
        return "mindspeed"
    mcore = tp > 1 or args.get("experimental_attention_variant") == "gated_delta_net"
    return "mcore" if mcore else "mindspeed"


def gdn_keys_seen(spec: ModelSpec, seen: set[str], default: str, where: str) -> str:
    """The gated-delta-net layout of the keys read (``gdn_keys_of`` of each), else ``default``."""
    if not has_gdn_modules(spec):
        return default
    seen = seen - {""}
    if len(seen) > 1:
        raise FormatError(
            f"{where}: the rank files mix MindSpeed-LLM's gated-delta-net keys (in_proj_qkvz, q_proj) "
            f"with megatron-core's (in_proj, out_norm); the checkpoint is not one model"
        )
    return next(iter(seen), default)


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
    # their biases: MindSpeed-MM's canonical layout (--mm-keys mindspeed-canonical) keeps the
    # language model's q / k / v apart with HF's leaf names (converters/qwen2vl.py:101-103)
    *((D + f"self_attention.{p}_proj.bias", C + f"attn.{p}.bias") for p in "qkv"),
    (D + "self_attention.linear_qkv.weight", C + "attn.qkv.weight"),
    (D + "self_attention.linear_proj.weight", C + "attn.o.weight"),
    (D + "self_attention.linear_proj.bias", C + "attn.o.bias"),
    (D + "self_attention.q_layernorm.weight", C + "attn.q_norm.weight"),
    (D + "self_attention.k_layernorm.weight", C + "attn.k_norm.weight"),
    (D + "self_attention.linear_qkv.bias", C + "attn.qkv.bias"),  # after the q/k norms (GLM-4.5)
    (D + "self_attention.core_attention.softmax_offset", C + "attn.sinks"),
    # AFMoE's output gate (its own linear; megatron-core's gated attention packs it into linear_qkv)
    (D + "self_attention.linear_gate.weight", C + "attn.gate.weight"),
    # gated-delta-net linear attention layers: MindSpeed-LLM's qwen3-next names (HF packing, the
    # plain norm), and megatron-core's GatedDeltaNet (ssm/gated_delta_net.py: in_proj [q; k; v; z;
    # b; a] per rank, the zero-centred out_norm; conv1d, A_log, dt_bias and out_proj alike)
    (D + "self_attention.A_log", C + "attn.gdn.A_log"),
    (D + "self_attention.conv1d.weight", C + "attn.gdn.conv1d.weight"),
    (D + "self_attention.dt_bias", C + "attn.gdn.dt_bias"),
    (D + "self_attention.in_proj_ba.weight", C + "attn.gdn.in_ba.weight"),
    (D + "self_attention.in_proj_qkvz.weight", C + "attn.gdn.in_qkvz.weight"),
    (D + "self_attention.norm.weight", C + "attn.gdn.norm.weight"),
    (D + "self_attention.in_proj.weight", C + "attn.gdn.in_proj.weight"),
    (D + "self_attention.out_norm.weight", C + "attn.gdn.out_norm.weight"),
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
    # HY-V4's MLA: softmax sinks and the output gate, under the names GQA attention has them by
    (D + "self_attention.core_attention.softmax_offset", C + "attn.sinks"),
    (D + "self_attention.linear_gate.weight", C + "attn.gate.weight"),
)
# Megatron-Core's own MLA modules (MLASelfAttention), as torch_dist stores them and Megatron-LM's
# torch format too (keys below ``decoder.layers.<i>.``): the two down-projections apart (the torch
# format keeps MindSpeed-LLM's fused linear_qkv unless --mla-keys mcore) and every norm a module of
# its own; with Transformer Engine the q / kv norms are fused into the up-projections
# (MCORE_MLA_TE_NORMS)
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
MCORE_MLA_MARK = "self_attention.linear_kv_down_proj.weight"  # a key only megatron-core's MLA has
TE_MLA_NORM = "linear_kv_up_proj.layer_norm_weight"  # Transformer Engine's kv norm in megatron-core's MLA
# megatron-core's MLA in a torch-format rank file (--mla-keys mcore): its modules' keys, each MLA
# down-projection a tensor of its own (the DSA indexer keeps MindSpeed-LLM's names)
_MCORE_MLA_ATTENTION_KEYS = (
    *((D + m, C + c) for m, c in MCORE_MLA_KEYS if m.startswith("self_attention.")),
    (D + "self_attention.linear_proj.weight", C + "attn.o.weight"),
    *(kc for kc in _MLA_ATTENTION_KEYS if ".dsa_indexer." in kc[0]),
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
    # MindSpeed-MM's canonical layout: gate and up apart, HF's leaf names (converters/qwen2vl.py:104-105)
    (D + "mlp.gate_proj.weight", C + "mlp.gate.weight"),
    (D + "mlp.up_proj.weight", C + "mlp.up.weight"),
    # xIELU's learned gains (Megatron-Bridge's Apertus MLP: activation_func, between fc1 and fc2);
    # its beta and eps are Python floats there, not stored (Role.fixed, fixed_roles)
    (D + "mlp.activation_func.alpha_p", C + "mlp.act.alpha_p"),
    (D + "mlp.activation_func.alpha_n", C + "mlp.act.alpha_n"),
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
# a Mamba-2 mixer layer (megatron-core's MambaLayer; MindSpeed-LLM's Mamba-2 converter writes the
# same keys, in its HF source's sorted order: mixer tensors, then the layer norm, as here)
_MAMBA_KEYS = (
    *(
        (D + "mixer." + part, C + "mamba." + part)
        for part in (
            "A_log",
            "D",
            "conv1d.bias",
            "conv1d.weight",
            "dt_bias",
            "in_proj.weight",
            "norm.weight",
            "out_proj.weight",
        )
    ),
    (D + "norm.weight", C + "mamba_norm.weight"),
)
# ckpt-ir's own names for mixers no Megatron implementation has (LFM2's short convolution, Kimi
# delta attention, Jamba's Mamba-1; no Megatron trainer loads them): in a GPTModel-like layer
# beside input_layernorm, pre_mlp_layernorm and the MLP, each tensor under
# decoder.layers.N.<block>.* by its canonical name, TP-split by its role (ir/roles.py)
OWN_MIXER_KEYS = tuple(
    (D + r.template[len(C) :], r.template)
    for r in roles()
    if r.template.startswith(tuple(C + b + "." for b in OWN_MIXERS)) and ".lora_" not in r.template
)
# a layer's hyper-connection mixers (block hc), MindSpeed-LLM's deepseek4 modules
_HC_KEYS = tuple(
    (D + f"{m}.{k}", C + f"{c}.{t}")
    for m, c in (("attn_mhc", "hc_attn"), ("mlp_mhc", "hc_ffn"))
    for k, t in (("hc_base", "base"), ("hc_fn.weight", "fn"), ("hc_scale", "scale"))
)
# DeepSeek-V4's layer (blocks mqa, compressor, csa_indexer, hc, moe, hash_router) as
# MindSpeed-LLM's convert_ckpt_deepseek4.py writes it, in its order: norms, attention (its
# compressor, then the indexer's), router, shared experts, the two hyper-connection mixers, experts
_MQA = D + "self_attention."
_MQA_LAYER_KEYS = (
    (D + "input_layernorm.weight", C + "attn_norm.weight"),
    (D + "pre_mlp_layernorm.weight", C + "mlp_norm.weight"),
    (_MQA + "attn_sink", C + "mqa.sinks"),
    (_MQA + "kv_layernorm.weight", C + "mqa.kv_norm.weight"),
    (_MQA + "q_layernorm.weight", C + "mqa.q_norm.weight"),
    (_MQA + "linear_o_down_proj.weight", C + "mqa.wo_a.weight"),
    (_MQA + "linear_kv.weight", C + "mqa.wkv.weight"),
    (_MQA + "linear_o_up_proj.weight", C + "mqa.wo_b.weight"),
    (_MQA + "linear_q.weight", C + "mqa.wq_a.weight"),
    (_MQA + "linear_q_up_proj.weight", C + "mqa.wq_b.weight"),
    *(
        (_MQA + m + t, C + c + t)
        for m, c in (
            ("compressor.", "mqa.compressor."),
            ("indexer.kv_compressor.", "mqa.indexer.compressor."),
        )
        for t in ("ape", "norm.weight", "wgate.weight", "wkv.weight")
    ),
    (_MQA + "indexer.wq_b.weight", C + "mqa.indexer.wq_b.weight"),
    (_MQA + "indexer.weights_proj.weight", C + "mqa.indexer.weights_proj.weight"),
    (D + "mlp.router.weight", C + "mlp.router.weight"),
    (D + "mlp.router.expert_bias", C + "mlp.router.bias"),
    (D + "mlp.router.tid2eid", C + "mlp.router.tid2eid"),
    *(kc for kc in _MLP_KEYS if ".shared_experts.linear_" in kc[0] and kc[0].endswith(".weight")),
    *_HC_KEYS,
    *(kc for kc in _MLP_KEYS if ".experts.local_experts." in kc[0] and kc[0].endswith(".weight")),
)
# the hyper-connection heads of the model (last stage, after the output layer) and of each MTP layer
HC_HEAD = tuple(
    (f"hc_head.{k}", f"hc_head.{t}")
    for k, t in (("hc_base", "base"), ("hc_fn.weight", "fn"), ("hc_scale", "scale"))
)
MTP_HC_HEAD = tuple(("mtp.layers.{k}." + k, "mtp." + c) for k, c in HC_HEAD)


def fixed_roles() -> dict[str, Fixed]:
    """The layer roles (``layers.{i}.<role>``) whose value the architecture fixes (``Role.fixed``):
    Megatron stores none of them, its modules hold the value (xIELU's beta and eps).  Writers
    check that the source holds that value (:func:`fixed_checks`), readers re-create the tensor
    (:func:`add_fixed`)."""
    return {r.template: r.fixed for r in roles() if r.fixed is not None and r.template.startswith(C)}


def _fixed_expr(template: str, layer: int, fixed: Fixed, spec: ModelSpec, dtype: str) -> E.Expr:
    from ckpt_ir.ir.roles import role

    r = role(template.format(i=layer))
    assert r is not None, template
    return E.Fill(r.shape(spec, Layout(format="mcore")), dtype, fixed.value)


def add_fixed(spec: ModelSpec, tensors: dict) -> None:
    """Re-create in ``tensors`` (canonical name -> TensorNode) the fixed-value tensors of every
    layer that has the role they take their dtype from (xIELU's alphas)."""
    from ckpt_ir.ir.checkpoint import TensorNode

    for template, fixed in fixed_roles().items():
        for i in range(spec.total_layers):
            name, like = template.format(i=i), layer_name(i, fixed.dtype_of)
            if name not in tensors and like in tensors:
                expr = _fixed_expr(template, i, fixed, spec, tensors[like].dtype)
                tensors[name] = TensorNode.whole(name, expr)


def fixed_checks(spec: ModelSpec, tensors: dict):
    """(name, what, its expression, the fixed value's) of every fixed-value tensor in ``tensors``,
    which a Megatron output leaves out: the executor checks each holds the value before writing."""
    for template, fixed in fixed_roles().items():
        for i in range(spec.total_layers):
            name = template.format(i=i)
            if name in tensors:
                x = tensors[name].shards[0]
                what = f"{fixed.value!r}, the value Megatron's module fixes"
                yield name, what, x, _fixed_expr(template, i, fixed, spec, x.dtype)


# Gemma 4's per-layer input (block ple) and output scale (block layer_scalar), under
# Megatron-Bridge's names (gemma4_bridge.py, its dense model's Gemma4DenseTransformerLayer)
_PLE_KEYS = (
    (D + "per_layer_input_gate.weight", C + "ple.gate.weight"),
    (D + "per_layer_projection.weight", C + "ple.proj.weight"),
    (D + "post_per_layer_input_norm.weight", C + "ple.norm.weight"),
    (D + "layer_scalar", C + "layer_scalar"),
)

# Per-layer order follows MindSpeed-LLM's writer (norms, attention, then MLP), so rank files list
# keys in the same order as that converter's.
_LAYER_KEYS = _NORM_KEYS + _ATTENTION_KEYS + _MLP_KEYS + _MAMBA_KEYS + OWN_MIXER_KEYS + _PLE_KEYS
# canonical roles megatron-core keeps in fp32 whatever params_dtype: the router's expert_bias, a
# buffer it returns to fp32 before every save and load (moe/router.py _maintain_float32_expert_bias)
KEPT_FP32 = (C + "mlp.router.bias",)
_MLA_LAYER_KEYS = _NORM_KEYS + _MLA_ATTENTION_KEYS + _MLP_KEYS + OWN_MIXER_KEYS + _HC_KEYS
_MCORE_MLA_LAYER_KEYS = _NORM_KEYS + _MCORE_MLA_ATTENTION_KEYS + _MLP_KEYS + OWN_MIXER_KEYS
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
    D + "norm.weight": D + "mixer.in_proj.layer_norm_weight",  # a Mamba layer's input norm
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
    # Gemma 4's per-layer input embeddings (Megatron-Bridge's Gemma 4 dense model, on the first stage)
    ("per_layer_embedding.weight", "ple_embed.weight"),
    ("per_layer_model_proj.weight", "ple_proj.weight"),
    ("per_layer_proj_norm.weight", "ple_norm.weight"),
)
POST_LAYERS = (
    ("decoder.final_layernorm.weight", "final_norm.weight"),
    ("decoder.final_layernorm.bias", "final_norm.bias"),
    ("output_layer.weight", "lm_head.weight"),
    ("output_layer.bias", "lm_head.bias"),
    # megatron-core's MambaModel (MambaStack) names its final norm final_norm
    (HYBRID_FINAL_NORM, "final_norm.weight"),
    *HC_HEAD,
)


@attrs.frozen
class MtpNames:
    """How a ``torch``-format rank file names multi-token-prediction layer ``{k}`` (last stage):
    its own ``enorm``, ``hnorm`` and ``eh_proj`` (:data:`MTP_HEAD`), its transformer layer (a
    decoder layer's keys under ``layer``), its final ``norm``; with MTP the main model's final
    norm is ``final_norm``.  ``megatron_order``: listed as Megatron-Core's GPTModel registers its
    modules (the embedding, the decoder with its final norm, the MTP block, the output layer)
    rather than as MindSpeed-LLM's converter writes them (MTP before the decoder layers)."""

    name: str
    layer: str
    norm: str
    final_norm: str
    megatron_order: bool


MTP_HEAD = (
    ("mtp.layers.{k}.enorm.weight", "mtp.enorm.weight"),
    ("mtp.layers.{k}.hnorm.weight", "mtp.hnorm.weight"),
    ("mtp.layers.{k}.eh_proj.weight", "mtp.eh_proj.weight"),
)
# MindSpeed-LLM's converter (ckpt-ir's default); Megatron-Core's own GPTModel state dict
# (MultiTokenPredictionLayer: enorm, hnorm, eh_proj, transformer_layer, final_layernorm), whose
# transformer layer Megatron-Core 0.17 renamed mtp_model_layer (only its sharded state dict, and
# so torch_dist, maps it back to transformer_layer)
MTP_MINDSPEED = MtpNames(
    "mindspeed",
    "mtp.layers.{k}.transformer_layer.",
    "mtp.final_layernorms.{k}.weight",
    "final_layernorm.weight",
    False,
)
MTP_MCORE = MtpNames(
    "mcore",
    "mtp.layers.{k}.transformer_layer.",
    "mtp.layers.{k}.final_layernorm.weight",
    "decoder.final_layernorm.weight",
    True,
)
MTP_MCORE_017 = attrs.evolve(MTP_MCORE, name="mcore-0.17", layer="mtp.layers.{k}.mtp_model_layer.")
MTP_NAMES = {n.name: n for n in (MTP_MINDSPEED, MTP_MCORE, MTP_MCORE_017)}
MTP_RENAMED_IN = (0, 17)  # the Megatron-Core release that named the MTP layer mtp_model_layer


def mtp_names(megatron_version: tuple[int, ...]) -> MtpNames:
    """The MTP names of Megatron-Core release ``megatron_version`` (e.g. ``(0, 17)``)."""
    return MTP_MCORE_017 if megatron_version >= MTP_RENAMED_IN else MTP_MCORE


# what the reader accepts: every naming's transformer-layer prefix and norms
MTP_LAYER_KEY = re.compile(
    r"^mtp\.layers\.(\d+)\.("
    + "|".join(sorted({n.layer.split(".")[3] for n in MTP_NAMES.values()}))
    + r")\.(.*)$"
)
_MCORE_MTP_NORM = re.compile("^" + re.escape(MTP_MCORE.norm).replace(re.escape("{k}"), r"\d+") + "$")


def mtp_naming(keys) -> MtpNames:
    """The MTP naming that the keys of a rank file use (MindSpeed-LLM's when they do not tell)."""
    found = MTP_MINDSPEED
    for key in keys:
        m = MTP_LAYER_KEY.match(key)
        if m and m.group(2) == "mtp_model_layer":
            return MTP_MCORE_017
        if _MCORE_MTP_NORM.match(key):
            found = MTP_MCORE
    return found


MTP_READ = MTP_HEAD + MTP_HC_HEAD + tuple(sorted({(n.norm, "mtp.norm.weight") for n in MTP_NAMES.values()}))
# MindSpeed-LLM's names, which the torch format is written with by default
MTP_PREFIX = MTP_MINDSPEED.layer
MTP_KEYS = (*MTP_HEAD, (MTP_MINDSPEED.norm, "mtp.norm.weight"))
MTP_FINAL_NORM = MTP_MINDSPEED.final_norm


# MiniMax-M2's full-width q/k norms take the per-head norms' keys (MindSpeed-LLM, Megatron-Bridge)
_FULL_QK_NORM = {
    C + "attn.q_norm.weight": C + "attn.q_full_norm.weight",
    C + "attn.k_norm.weight": C + "attn.k_full_norm.weight",
}


KeyPairs = tuple[tuple[str, str], ...]  # (Megatron key template, canonical template)

# A layer made of sublayers (ckpt_ir.ir.blocks; LongCat-Flash): its keys block by block in the
# layer's order, each sublayer's norms before its first block, the layer-level blocks' keys as a
# layer's.  A sublayer's modules are MindSpeed-LLM's LongCat layer's (model_builder.py,
# transformerlayer_type "longcat"): input_layernorm_<k>, pre_mlp_layernorm_<k>,
# self_attention_<k>, and its dense MLP mlps_<k>.
_MOE_ROLE = re.compile(r"^layers\.\{i\}\.mlp\.(?:router\.|shared[._]|experts\.)")
_BLOCK_KEYS = {
    "attention": _ATTENTION_KEYS,
    "mla": _MLA_ATTENTION_KEYS,
    "mlp": tuple(kc for kc in _MLP_KEYS if not _MOE_ROLE.match(kc[1])),
    "moe": tuple(kc for kc in _MLP_KEYS if _MOE_ROLE.match(kc[1])),
    "mamba": _MAMBA_KEYS,
}
SUBLAYER_MODULES = {
    "input_layernorm": "input_layernorm_{k}",
    "pre_mlp_layernorm": "pre_mlp_layernorm_{k}",
    "self_attention": "self_attention_{k}",
    "mlp": "mlps_{k}",
}


def _sublayer_keys(layer: tuple[str, ...]) -> KeyPairs:
    """The keys of a layer whose ``layer_blocks`` entry is ``layer``."""
    from ckpt_ir.ir.blocks import parse

    out: list[tuple[str, str]] = []
    seen: set[int] = set()
    for entry in layer:
        sub, kind = parse(entry)
        if kind not in _BLOCK_KEYS:
            raise LayoutError(f"a layer made of sublayers: no Megatron names for its {kind} block")
        keys = _BLOCK_KEYS[kind]
        if sub is None:
            out.extend(keys)
            continue
        if sub not in seen:
            seen.add(sub)
            keys = _NORM_KEYS + keys
        for m, c in keys:
            module, _, rest = m[len(D) :].partition(".")
            module = SUBLAYER_MODULES.get(module, module + "_{k}").format(k=sub)
            out.append((f"{D}{module}.{rest}", f"{C}sub{sub}.{c[len(C) :]}"))
    return tuple(out)


def _layer_keys(
    mla: bool,
    full_qk_norm: bool,
    family: str | None = None,
    gated: bool = True,
    mla_keys: str = "mindspeed",
    mqa: bool = False,
    sublayered: tuple[tuple[str, ...], ...] = (),
    variant: str | None = None,
) -> KeyPairs:
    """The decoder-layer keys; a plain (not gated) MLP's linear_fc1 is the canonical fc1; ``mqa``:
    DeepSeek-V4's layers (MindSpeed-LLM's modules); ``sublayered``: the distinct ``layer_blocks``
    entries of layers made of sublayers; ``variant``: the block whose family keys apply
    (``Family.megatron_variants``)."""
    keys: KeyPairs = (
        _MQA_LAYER_KEYS
        if mqa
        else (_MCORE_MLA_LAYER_KEYS if mla_keys == "mcore" else _MLA_LAYER_KEYS)
        if mla
        else _LAYER_KEYS
    )
    if sublayered:
        if mla_keys == "mcore":
            raise LayoutError(
                f"megatron-core's MLA modules ({setting('mla_keys', 'mcore')}) have no layer made of "
                f"sublayers (MindSpeed-LLM's LongCat layer); use {setting('mla_keys', 'mindspeed')}"
            )
        keys = tuple(dict.fromkeys(kc for layer in sublayered for kc in _sublayer_keys(layer)))
    if full_qk_norm:
        keys = tuple((m, _FULL_QK_NORM.get(c, c)) for m, c in keys)
    if family is not None:
        keys = _with_family_keys(keys, family, variant)
    return keys if gated else tuple((m, c.replace(".gate_up.", ".fc1.")) for m, c in keys)


def _with_family_keys(keys: KeyPairs, family: str, variant: str | None = None) -> KeyPairs:
    """``keys`` with a family's own Megatron keys: for a role of the table (Gemma 3's post norms,
    after Megatron-Bridge), or for a role the family registers, in the place of the table's role
    whose key it takes (Cohere's per-head q/k norms under q_layernorm / k_layernorm), else last."""
    from ckpt_ir.families import by_name

    fam = by_name(family)
    pairs = dict(fam.megatron_variants).get(variant, fam.megatron_keys) if variant else fam.megatron_keys
    own = {c: m for m, c in pairs}
    claims = {m: c for c, m in own.items()}
    out = [(own[c], c) if c in own else (m, claims[m]) if m in claims else (m, c) for m, c in keys]
    placed = {c for _, c in out}
    return tuple(out) + tuple((m, c) for c, m in own.items() if c not in placed)


def _table(keys: KeyPairs, norm_names: str, mla_keys: str = "mindspeed") -> NameTable:
    if norm_names == "local":
        return NameTable(keys)
    # Transformer Engine's MLA spec: the input norm a module of its own, the q / kv norms fused
    # into the up-projections, a dense layer's pre-MLP norm into fc1
    if mla_keys == "mcore":
        te = {C + c: D + m for m, c in MCORE_MLA_TE_NORMS}
        fc1 = {m: _TE_NORMS[m] for m in (D + "pre_mlp_layernorm.weight", D + "pre_mlp_layernorm.bias")}
        return NameTable((te.get(c, fc1.get(m, m)), c) for m, c in keys)
    renames = (
        dict(_TE_NORMS)
        if norm_names == "te"
        else {
            m: _TE_NORMS[m]
            for m in (D + "norm.weight", D + "input_layernorm.weight", D + "input_layernorm.bias")
        }
    )
    # the fused Mamba norm is a Mamba layer's own input norm only (Falcon-H1's norm.weight, shared
    # by its parallel mixers, stays a module of its own, as Megatron-Bridge builds it); read only: a
    # GatedDeltaNet layer's input norm (written per layer, see ranks.py)
    return NameTable(
        [
            *(
                (m if m == D + "norm.weight" and c != C + "mamba_norm.weight" else renames.get(m, m), c)
                for m, c in keys
            ),
            (D + GDN_TE_NORM, C + "attn_norm.weight"),
        ]
    )


LOCAL_LAYER_TABLE = _table(_LAYER_KEYS, "local")
TE_LAYER_TABLE = _table(_LAYER_KEYS, "te")
READ_TABLES = (LOCAL_LAYER_TABLE, TE_LAYER_TABLE)
GLOBAL_TABLE = NameTable(PRE_LAYERS + POST_LAYERS)

EXTRA_STATE = "._extra_state"


def extra_state_layout(spec: ModelSpec, layout: Layout) -> tuple:
    """What decides whether Transformer Engine's per-module ``_extra_state`` (FP8 scaling state of
    one TP shard) still belongs to the same module shard after a conversion: the layers, the
    (expert) TP sizes, the expert storage and the module types (norm naming, MLA modules)."""
    return (
        spec.num_layers,
        spec.mtp_layers,
        layout.tp,
        layout.expert_tp if spec.num_experts else None,
        layout.grouped_gemm,
        layout.norm_names,
        layout.mla_keys,
    )


@attrs.frozen
class LoraNaming:
    """How a trainer names the LoRA factors of a Megatron module beside its weight ``X.weight``
    (``a`` / ``b``: the suffixes replacing ``.weight``; ``read``: further spellings it may have
    saved) and how it splits them over TP: ``whole_dim`` is the dim on which it splits the factors
    that ckpt-ir's own LoRA keeps whole on every TP rank (A of a column-parallel target, B of a
    row-parallel one; ckpt_ir.ir.roles._lora_roles), None where it keeps them whole too."""

    a: str
    b: str
    read: tuple[str, ...] = ()
    whole_dim: int | None = None


# Megatron / MindSpeed LoRA (Layout.lora_keys): X.lora_A.default.weight [r, in] and
# X.lora_B.default.weight [out, r] beside the base X.weight, which LoRA training stores as
# X.base_layer.weight (peft's LoraLayer on megatron-core modules, MindSpeed-LLM).
# Megatron-Bridge: LoRALinear(to_wrap, adapter) saves the wrapped module's tensors under X. and
# the adapter's under X.adapter. (peft/adapter_wrapper.py:226, 229; sharded: 260, 268-270);
# ParallelLinearAdapter's A is linear_in, its B linear_out (peft/utils.py:1033-1081, forward
# 1237-1273: x -> linear_in -> linear_out -> * alpha / dim).  Over TP: a column-parallel base's
# linear_in is a ColumnParallelLinear(in, dim) (utils.py:1046-1056; A split on dim 0), its
# linear_out a ColumnParallelLinear(dim, out, gather_output=False) (1074-1081; B split like the
# weight, fc1's [gate_r; up_r] as its own, swiglu factory 1564-1568); a row-parallel base's
# linear_in a RowParallelLinear(in, dim, input_is_parallel=True) (1034-1044; A split on dim 1 like
# the weight), its linear_out a ColumnParallelLinear(dim, out, gather_output=True) (B split on
# dim 0).  So it splits on dim 0 exactly the factors ckpt-ir's LoRA keeps whole.
LORA_NAMINGS = {
    "mindspeed": LoraNaming(
        ".lora_A.default.weight", ".lora_B.default.weight", (".lora_A.weight", ".lora_B.weight")
    ),
    "bridge": LoraNaming(".adapter.linear_in.weight", ".adapter.linear_out.weight", whole_dim=0),
}
assert tuple(LORA_NAMINGS) == LORA_KEYS
CANONICAL_LORA = {"a": ".lora_a.weight", "b": ".lora_b.weight"}


def lora_parts(key: str) -> tuple[str, str, str] | None:
    """(module stem ``X``, ``a`` or ``b``, naming in LORA_NAMINGS) of a Megatron LoRA factor key,
    else None."""
    for naming, n in LORA_NAMINGS.items():
        for which, suffix in (("a", n.a), ("b", n.b), *zip("ab", n.read)):
            if key.endswith(suffix):
                return key[: -len(suffix)], which, naming
    return None


def lora_key(target_key: str, which: str, naming: str = "mindspeed") -> str:
    """``...linear_qkv.weight`` -> ``...linear_qkv.lora_A.default.weight`` (naming ``bridge``:
    ``...linear_qkv.adapter.linear_in.weight``)."""
    n = LORA_NAMINGS[naming]
    return target_key[: -len(".weight")] + (n.a if which == "a" else n.b)


def layer_table(
    norm_names: str,
    mla: bool = False,
    full_qk_norm: bool = False,
    family: str | None = None,
    gated: bool = True,
    mla_keys: str = "mindspeed",
    mqa: bool = False,
    sublayered: tuple[tuple[str, ...], ...] = (),
    variant: str | None = None,
) -> NameTable:
    """Decoder-layer key table for a naming (``local``, ``te``, ``te-input``; MindSpeed-LLM v2's
    transformer_engine output fuses only the input norm for dense layers) and, with ``mla``, the
    MLA modules' (``mindspeed``: one fused linear_qkv; ``mcore``: megatron-core's own)."""
    mla_keys = mla_keys if mla else "mindspeed"
    keys = _layer_keys(mla, full_qk_norm, family, gated, mla_keys, mqa, sublayered, variant)
    return _table(keys, norm_names, mla_keys)


def has_mqa(spec: ModelSpec) -> bool:
    """Whether the model's layers are DeepSeek-V4's (MindSpeed-LLM's deepseek4 modules)."""
    return any(spec.has_block(i, "mqa") for i in range(spec.total_layers))


def _sublayered(spec: ModelSpec) -> tuple[tuple[str, ...], ...]:
    """The distinct ``layer_blocks`` entries of the layers made of sublayers, in layer order."""
    return tuple(dict.fromkeys(spec.layer_blocks[i] for i in range(spec.num_layers) if spec.sublayers(i)))


def spec_layer_table(norm_names: str, spec: ModelSpec, mla_keys: str = "mindspeed") -> NameTable:
    """:func:`layer_table` for the model ``spec`` describes."""
    return layer_table(
        norm_names,
        spec.mla,
        spec.qk_full_norm,
        spec.family,
        spec.gated_mlp,
        mla_keys,
        has_mqa(spec),
        _sublayered(spec),
        key_variant(spec),
    )


def key_variant(spec: ModelSpec) -> str | None:
    """The block of ``Family.megatron_variants`` whose keys the model takes (one of its layers
    holds it), or None."""
    from ckpt_ir.families import by_name

    variants = by_name(spec.family).megatron_variants if spec.family is not None else ()
    if not variants:
        return None
    blocks = {b for i in range(spec.total_layers) for b in spec.blocks(i)}
    return next((b for b, _ in variants if b in blocks), None)


def read_tables(spec: ModelSpec) -> tuple[NameTable, ...]:
    """The decoder-layer tables a reader tries (local and TE norm names; for MLA, MindSpeed-LLM's
    and megatron-core's modules) for ``spec``."""
    kinds = ("mindspeed", "mcore") if spec.mla and not _sublayered(spec) else ("mindspeed",)
    return tuple(spec_layer_table(n, spec, k) for k in kinds for n in ("local", "te"))


def role_order(spec: ModelSpec, mla_keys: str = "mindspeed") -> tuple[str, ...]:
    """The decoder-layer roles of the model ``spec`` describes, in the order rank files list them
    (``mla_keys``: MindSpeed-LLM's or megatron-core's MLA modules)."""
    keys = _layer_keys(
        spec.mla,
        spec.qk_full_norm,
        spec.family,
        spec.gated_mlp,
        mla_keys,
        has_mqa(spec),
        _sublayered(spec),
        key_variant(spec),
    )
    return tuple(c for _, c in keys)


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
# reading: the shared end of the torch and torch_dist frontends

TRACKER = "latest_checkpointed_iteration.txt"
TORCH_DIST_METADATA = "metadata.json"  # what marks a torch_dist iteration directory
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's (torch_dist, torch_dcp, fsdp_dtensor)
_ITER_NAME = re.compile(r"^iter_(\d+)$")


def iteration_of(name: str) -> int | str | None:
    """The iteration an ``iter_N`` or ``release`` directory name stands for, else None."""
    if name == "release":
        return name
    m = _ITER_NAME.match(name)
    return int(m.group(1)) if m else None


def iteration_dir(path: str, iteration: int | str | None = None) -> tuple[str, int | str | None]:
    """(the iteration directory, its iteration) of the Megatron checkpoint at ``path``.  A save
    directory gives ``iteration`` when asked (``--iteration``), else the one
    ``latest_checkpointed_iteration.txt`` names, else its only ``iter_*`` / ``release``.  An
    iteration directory given itself (rank directories or DCP files inside) is read as the
    iteration its name says (None when the name does not say: its files do)."""
    names = os.listdir(path)
    present = {
        it: n for n in names if (it := iteration_of(n)) is not None and os.path.isdir(os.path.join(path, n))
    }
    tracker = os.path.join(path, TRACKER)
    if not present and not os.path.isfile(tracker):
        if not any(RANK_DIR.match(n) for n in names) and not {TORCH_DIST_METADATA, DCP_METADATA} & set(names):
            raise FormatError(f"{path}: no iter_* directory or {TRACKER}; not a Megatron checkpoint")
        own = iteration_of(os.path.basename(os.path.abspath(path)))
        if iteration is not None and own is not None and iteration != own:
            raise UsageError(
                f"{path}: is iteration {own} itself, not {iteration}; give its save directory (the "
                f"parent) to read another iteration"
            )
        return path, own if own is not None else iteration
    if iteration is not None:
        if iteration not in present:
            raise UsageError(f"{path}: no iteration {iteration}; iterations present: {_listed(present)}")
        return os.path.join(path, present[iteration]), iteration
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        it = iteration_of(text if text == "release" else f"iter_{text}")
        if it is None:
            raise FormatError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
        if it not in present:
            raise FormatError(
                f"{tracker}: names iteration {text} but {os.path.join(path, iter_dir(it))} does not "
                f"exist (iterations present: {_listed(present)}; pick one with --iteration)"
            )
        return os.path.join(path, present[it]), it
    if len(present) > 1:
        raise FormatError(
            f"{path}: several iterations ({_listed(present)}) and no {TRACKER}; pick one with "
            f"--iteration or give its iter_* directory"
        )
    ((it, name),) = present.items()
    return os.path.join(path, name), it


def _listed(present: dict[int | str, str]) -> str:
    """The iterations of a save directory, in order (release last), or "none"."""
    order = sorted(present, key=lambda it: (isinstance(it, str), it if isinstance(it, int) else 0))
    return ", ".join(map(str, order)) or "none"


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
    lora = lora_parts(key)
    if lora:
        target = canonical_key(lora[0] + ".weight", stage, chunk, tables)
        if target is None:
            return None
        suffix = CANONICAL_LORA[lora[1]]
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


def mla_down_parts(spec: ModelSpec) -> dict[str, str]:
    """MLA's two down-projections, the parts of the IR's ``attn.qkv_a`` (``ir.rules.mla_rule``): part
    name -> canonical role below the layer (``attn.q`` when queries have no low-rank projection)."""
    return {"q": "attn.q_a.weight" if spec.q_lora_rank else "attn.q.weight", "kv_a": "attn.kv_a.weight"}


def mcore_split(name: str, norm_names: str, spec: ModelSpec | None = None) -> Split | None:
    """The TP split of canonical tensor ``name`` in megatron-core's own modules: its role's, but the
    local layer spec builds MLA's down-projections as ColumnParallelLinear (split over TP) where
    Transformer Engine's duplicates them (TELinear, whole on every rank, as the roles say)."""
    if norm_names == "local" and split_layer(name)[1] in ("attn.q_a.weight", "attn.kv_a.weight"):
        return COLUMN
    return split_rule(name, spec)


def mla_key(rest: str, te: bool, moe: bool) -> str | None:
    """Megatron-Core's key of an MLA layer's tensor where it differs from the torch format's."""
    if te and not moe and rest == "mlp_norm.weight":  # a dense layer's pre-MLP norm fused into fc1
        return "mlp.linear_fc1.layer_norm_weight"
    keys = {c: m for m, c in MCORE_MLA_KEYS} | ({c: m for m, c in MCORE_MLA_TE_NORMS} if te else {})
    return keys.get(rest)


# where a Megatron checkpoint written by ckpt-ir keeps the HF side files (and the source's
# config.json); Megatron reads only latest_checkpointed_iteration.txt and iter_*/, so it ignores it
MCORE_HF_DIR = "hf"
# where Megatron-LM saves the run's tokenizer (save_tokenizer_assets: torch_dist saves, on by default
# since 2026-08; an HF tokenizer's save_pretrained files, or a file-based tokenizer's vocabulary)
TOKENIZER_DIR = "tokenizer"


# What a Megatron checkpoint directory holds (name pattern, what a directory of that name holds;
# None: a file), for --overwrite, which replaces only a directory holding a checkpoint and nothing else
RANK_ENTRIES: tuple = ((RANK_FILE, None), (DISTOPT_FILE, None))
# an iteration: rank directories (torch format) or torch_dist's files
ITERATION_ENTRIES: tuple = (
    ("mp_rank_[0-9][0-9]*", RANK_ENTRIES),
    *((p, None) for p in ("*.distcp", ".metadata", "metadata.json", "common.pt", MANIFEST)),
    (TOKENIZER_DIR, (("*", None), CHAT_TEMPLATES_ENTRY)),  # the run's tokenizer files
)
DIRECTORY_ENTRIES: tuple = (
    (TRACKER, None),
    ("iter_[0-9]*", ITERATION_ENTRIES),
    ("release", ITERATION_ENTRIES),
    (
        MCORE_HF_DIR,
        (*((p, None) for p in ("config.json", *AUX_PATTERNS)), CHAT_TEMPLATES_ENTRY),
    ),  # ckpt-ir's side files
)
