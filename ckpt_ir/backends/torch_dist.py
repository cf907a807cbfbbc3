"""Megatron-Core ``torch_dist`` backend (``--to mcore --ckpt-format torch_dist``): a checkpoint
``megatron.core.dist_checkpointing.load`` reads into a GPTModel at any TP / PP.

Written as Megatron-Core 0.15-0.18 lays it out (``version="0.15"``, which 0.19+ loads too; see
:mod:`ckpt_ir.frontends.torch_dist`)::

    latest_checkpointed_iteration.txt
    hf/                         the HF side files (config.json, tokenizer, generation config, chat
                                template, remote code), as the torch format keeps them
    iter_N/metadata.json        {"sharded_backend": "torch_dist", "sharded_backend_version": 1, ...}
    iter_N/common.pt            args, iteration, checkpoint_version, content_metadata
    iter_N/__0_K.distcp         one torch.save blob per stored entry (tensor K, or a sharded object)
    iter_N/.metadata            torch.distributed.checkpoint Metadata naming each entry's file, written last
    iter_N/tokenizer/           the source's tokenizer files, where Megatron-LM saves a run's tokenizer
    iter_N/integrity.json       with ``integrity``: Megatron-Core 0.18+'s SHA-256 manifest of iter_N's files

Keys are global: every decoder-layer tensor is stacked on a leading layer axis
(``decoder.layers.self_attention.linear_qkv.weight`` is ``[L, ...]``; MoE experts on the next
axis, ``decoder.layers.mlp.experts.experts.linear_fc1.weight`` ``[L, E, 2F, H]``; layers that
differ each under its global number, ``decoder.layers.<i>.<key>``), the norms named the
Transformer-Engine way (``linear_qkv.layer_norm_weight``) whatever the layer spec, as Megatron
saves them; each tensor is one whole chunk (Megatron reshards on load).  Every linear module also
gets the ``_extra_state`` sharded object Megatron's modules expect (``None``: Transformer Engine
then starts its FP8 state afresh).  Each entry is a file of its own, so files are written in
parallel and streamed (a stacked tensor layer by layer) like every other output.  Optimizer state
(``ckpt.states``) is written fully reshardable: ``optimizer.state.<state>.<model key>`` in the
weights' shapes, the optimizer's param groups in ``common.pt``.

``version="0.19"`` writes Megatron-Core 0.19+'s own layout (its ``dist_checkpointing.save``):
no ``common.pt``, the same common state stored as the sharded object ``common_state`` (global
shape (1,), DCP key ``common_state/shard_0_1``, ``torch.save([state])`` like every sharded
object; 0.19 loads it with ``weights_only=True``), and ``metadata.json`` holding only the two
fields of 0.19's ``CheckpointingConfig``.
"""

from __future__ import annotations

import json
import os

from ckpt_ir.backends.mcore import hf_folder, placeholders
from ckpt_ir.backends.plan import OutputFile, Plan
from ckpt_ir.errors import UsageError, VerifyError, setting
from ckpt_ir.families import by_name
from ckpt_ir.io.safe_pickle import TorchDtype
from ckpt_ir.io.side_files import is_tokenizer_file, side_file_name
from ckpt_ir.io.torchzip import Tensor, writable
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.blocks import is_hybrid
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.dtypes import torch_name
from ckpt_ir.ir.layout import has_gdn_modules
from ckpt_ir.ir.names import NameTable, role_of, split_stack
from ckpt_ir.ir.rules import mla_rule
from ckpt_ir.megatron import args as megatron_args
from ckpt_ir.megatron import global_keys, mindspeed_mm, multimodal
from ckpt_ir.megatron import keys as M
from ckpt_ir.megatron.integrity import MANIFEST

METADATA_JSON = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
VERSIONS = ("0.15", "0.19")  # the layouts written: common.pt (0.15-0.18), common_state entry (0.19+)
COMMON_STATE_KEY = "common_state/shard_0_1"  # ShardedObject("common_state", ..., (1,), (0,)).unique_key
STATE_PREFIX = "optimizer.state."


def check_whole(ckpt: Checkpoint, fmt: str) -> None:
    """Output in ``fmt`` (torch_dist, fsdp_dtensor) holds whole tensors, resharded on load: the IR
    must be one whole, fused Megatron layout without unmerged LoRA."""
    spec, layout = ckpt.spec, ckpt.layout
    if spec.vision is not None and layout.mm_keys != "bridge":
        raise UsageError(
            f"{setting('ckpt_format', fmt)}: MindSpeed-MM's layout ({setting('mm_keys', 'mindspeed')}) exists "
            f"only as torch-format release/ rank files, which its trainer loads; leave out "
            f"{setting('ckpt_format', fmt)} or use {setting('mm_keys', 'bridge')} (Megatron-Bridge's)"
        )
    if spec.vision is not None and fmt != "torch_dist":
        raise UsageError(
            f"{setting('ckpt_format', fmt)}: this version writes a vision-language model ({spec.family}) to "
            f"Megatron as torch or torch_dist (Megatron-Bridge's) only; use {setting('ckpt_format', 'torch_dist')}"
        )
    if (
        layout.tp != 1
        or layout.pp != 1
        or layout.vpp_layers
        or layout.num_layer_list
        or layout.noop_layers
        or not (layout.fused_qkv and layout.fused_gate_up)
        or layout.vision_tp != 1
        or layout.vision_layer_list
        # the tower fused where its Megatron form fuses it (Megatron-Bridge's Qwen3-VL tower)
        or layout.vision_fused != (spec.vision is not None and mindspeed_mm.fuses_tower(spec, layout.mm_keys))
    ):
        raise VerifyError(
            f"{fmt} output needs one whole, fused Megatron layout (it is resharded on load), got "
            f"{layout.describe()}"
        )
    if spec.lora_rank is not None:
        raise VerifyError(
            f"{fmt} output supports dense GPTs, MoE models (dense layers, shared experts, router "
            "bias, grouped GEMM), multi-latent attention and multi-token prediction, not unmerged "
            f"LoRA; write {setting('ckpt_format', 'torch')} instead"
        )


def output_args(ckpt: Checkpoint, fmt: str):
    """The ``args`` output in ``fmt`` carries: the model's and layout's, over a Megatron source's
    args (which travel whole: training settings; what an args-only model computes)."""
    spec = ckpt.spec
    family = by_name(spec.family)
    source = (ckpt.meta.get("training") or {}).get("args")
    args = megatron_args.build_args(
        spec,
        ckpt.layout,
        ckpt.hf_config,
        family.mindspeed_names[0] if family.mindspeed_names else spec.family,
        source={k: v for k, v in source.items() if writable(v)} if source else None,
        hf_naming=ckpt.meta.get("hf_naming"),
    )
    args.ckpt_format = fmt
    if fmt == "torch_dist" and is_hybrid(spec):  # stored under megatron-core's (TE) hybrid layer spec
        args.spec = megatron_args.MAMBA_STACK_SPEC
    return args


def plan(
    ckpt: Checkpoint, *, iteration: int | None = None, version: str = "0.15", integrity: bool = False
) -> Plan:
    """``integrity``: write Megatron-Core's ``integrity.json`` (:mod:`ckpt_ir.megatron.integrity`)
    after every other file of the iteration."""
    spec, layout = ckpt.spec, ckpt.layout
    check_whole(ckpt, "torch_dist")
    # grouped-GEMM experts (layout.grouped_gemm) are written as per-expert keys all the same:
    # Megatron-Core's GroupedMLP and TEGroupedMLP save and load the sequential experts' keys and
    # [L, E, ...] shapes; only the args (moe_grouped_gemm) say which module the run builds
    experts = spec.num_experts
    te = layout.norm_names != "local"  # the layer spec the written args name (transformer_impl)
    stored, objects = _model(ckpt, ckpt.tensors, experts, te)
    for which, nodes in ckpt.states.items():  # fully reshardable: the same keys and shapes as the weights
        stored += [
            (f"{STATE_PREFIX}{which}.{key}", expr) for key, expr in _model(ckpt, nodes, experts, te)[0]
        ]
    it = iteration if iteration is not None else ckpt.meta.get("iteration", 1)
    d = M.iter_dir(it)
    files: list[OutputFile] = []
    entries: list[tuple[str, str, str, tuple[int, ...], str]] = []  # (key, kind, dtype, shape, data file)
    for k, (key, expr) in enumerate(stored):
        data = f"__0_{k}.distcp"
        files.append(
            OutputFile(f"{d}/{data}", "torch", ((key, expr),), obj=Tensor(key, expr.dtype, expr.shape))
        )
        entries.append((key, "tensor", expr.dtype, expr.shape, data))
    for key in objects:
        data = f"__0_{len(entries)}.distcp"
        files.append(OutputFile(f"{d}/{data}", "torch", (), obj=[None]))  # Megatron's torch.save([state])
        entries.append((key, "bytes", "", (), data))
    args = output_args(ckpt, "torch_dist")
    common = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": it,
        # the optimizer's sharding type only where optimizer state is written (a model-only
        # checkpoint, e.g. from HF, holds none to describe)
        "content_metadata": {
            "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True,
            **({"distrib_optim_sharding_type": "fully_reshardable"} if ckpt.states else {}),
        },
    }
    dropped = dict(ckpt.dropped)
    if ckpt.states:
        common.update(_training_state(ckpt, args, dropped))
    common_tensors: list[tuple[str, E.Expr]] = []  # e.g. a tensor Adam step in the param groups
    common = placeholders(common, "common", common_tensors)
    if version == "0.19":
        data = f"__0_{len(entries)}.distcp"
        files.append(OutputFile(f"{d}/{data}", "torch", tuple(common_tensors), obj=[common]))
        entries.append((COMMON_STATE_KEY, "bytes", "", (), data))
        config = {k: METADATA_JSON[k] for k in ("sharded_backend", "sharded_backend_version")}
    else:
        files.append(OutputFile(f"{d}/common.pt", "torch", tuple(common_tensors), obj=common))
        config = METADATA_JSON
    files.append(OutputFile(f"{d}/metadata.json", "text", text=json.dumps(config)))
    files.append(OutputFile(f"{d}/.metadata", "dcp-metadata", obj=tuple(entries)))
    files.append(OutputFile(M.TRACKER, "text", text=str(it)))
    files.extend(hf_folder(ckpt))  # every side file, as the torch format keeps them
    files.extend(  # the tokenizer where Megatron-LM saves a run's, too
        OutputFile(f"{d}/{M.TOKENIZER_DIR}/{side_file_name(f)}", "copy", source=f)
        for f in ckpt.aux_files
        if is_tokenizer_file(f)
    )
    if integrity:  # last: it hashes the files written before it
        files.append(OutputFile(f"{d}/{MANIFEST}", "integrity"))
    if ckpt.meta.get("extra_state"):
        dropped["*._extra_state"] = (
            "Transformer-Engine _extra_state (FP8 metadata): torch_dist output starts it afresh"
        )
    fixed = tuple(M.fixed_checks(spec, ckpt.tensors))
    dropped.update({name: f"not stored in Megatron: {what} (checked)" for name, what, _, _ in fixed})
    return Plan(tuple(files), dropped, checks=fixed)


def _model(
    ckpt: Checkpoint, nodes: dict, experts: int, te: bool
) -> tuple[list[tuple[str, E.Expr]], list[str]]:
    """(torch_dist key, expression) of one tensor set (the weights, or an optimizer state in their
    shapes) and the ``_extra_state`` objects beside them.  A vision-language model is saved as
    Megatron-Bridge's model saves it (:func:`~ckpt_ir.megatron.multimodal.tower_global`): its
    GPTModel's keys under ``language_model.``, the tower's first."""
    spec = ckpt.spec
    if spec.vision is None:
        return _stored(nodes, spec, spec.num_layers, experts, te)
    text = {n: t for n, t in nodes.items() if split_stack(n)[0] != "vision"}
    stored, objects = _stored(text, spec, spec.num_layers, experts, te)
    tower, tower_objects = multimodal.tower_global(ckpt, nodes)
    prefix = multimodal.TEXT_PREFIX["bridge"]
    return (
        tower + [(prefix + key, x) for key, x in stored],
        tower_objects + [prefix + key for key in objects],
    )


def _training_state(ckpt: Checkpoint, args, dropped: dict[str, str]) -> dict:
    """The common-state entries a resumed run needs besides the optimizer tensors: the optimizer's
    own state dict (param groups with the Adam step) marked fully reshardable, the scheduler, and
    the training args of the source run."""
    meta = ckpt.meta.get("optimizer") or {}
    for k, v in (meta.get("args") or {}).items():
        setattr(args, k, v)
    args.use_distributed_optimizer = True
    opt = meta.get("optimizer")

    def reshardable(state) -> dict:
        return {
            **(state if isinstance(state, dict) else {}),
            "param_state_sharding_type": "fully_reshardable",
        }

    # a MoE run's ChainedOptimizer ([dense, expert] in the torch format) saves {index: state}: its
    # fully-reshardable tensors carry no per-optimizer prefix (chained_optim_avoid_prefix), each
    # optimizer picks its own parameters' state out of the shared optimizer.state.* keys
    if isinstance(opt, dict) and opt and all(isinstance(k, int) for k in opt):  # read from torch_dist
        opt = [opt[k] for k in sorted(opt)]
    out = {
        "optimizer": {i: reshardable(o) for i, o in enumerate(opt)}
        if isinstance(opt, list)
        else reshardable(opt)
    }
    training = ckpt.meta.get("training") or {}
    for key in ("opt_param_scheduler", "num_floating_point_operations_so_far"):
        if training.get(key) is not None:
            out[key] = training[key]
    if any(v is not None for v in (training.get("rng_state") or {}).values()):
        dropped["rng_state"] = (
            "per-rank random-number state: torch_dist output leaves it out (resume with --no-load-rng)"
        )
    return out


def _stacked(parts: list[E.Expr]) -> E.Expr:
    return E.Concat(tuple(E.Reshape(p, (1, *p.shape)) for p in parts), 0)


def _layer_entries(
    nodes: dict, spec, layer: int, table: NameTable, used: set[str], te: bool
) -> list[tuple[str, E.Expr, bool]]:
    """(key below the layer, expression, stacked over experts) of one transformer layer's tensors:
    each routed-expert tensor is stacked on a leading expert axis (``[E, 2F, H]``)."""
    return [
        (key, _stacked(x), True) if isinstance(x, list) else (key, x, False)
        for key, x in layer_entries(nodes, spec, layer, table, used, te)
    ]


def layer_entries(
    nodes: dict, spec, layer: int, table: NameTable, used: set[str], te: bool
) -> list[tuple[str, E.Expr | list[E.Expr]]]:
    """(key below the layer, expression) of one transformer layer's tensors (``nodes``; the names
    taken are added to ``used``) under Megatron-Core's module names, norms as ``table`` names them;
    a routed-expert tensor is the list of every expert's, under the key torch_dist stacks them
    in (``mlp.experts.experts.linear_fc1.weight``).  Multi-latent attention has Megatron-Core's own
    modules (with its Transformer-Engine spec when ``te``).  A MoE layer's pre-MLP norm is
    ``pre_mlp_layernorm`` with the Transformer-Engine layer spec (``te``: a module of its own), as
    ``table`` names it otherwise (torch_dist: ``mlp.linear_fc1.layer_norm_*``, the local spec's key
    map)."""
    out: list[tuple[str, E.Expr | list[E.Expr]]] = []
    here = f"layers.{layer}."
    local = M.layer_table("local")
    for role in M.role_order(spec):
        rest = role[len("layers.{i}.") :]
        if spec.mla and rest == "attn.qkv_a.weight" and here + rest in nodes:
            # Megatron-Core keeps MLA's two down-projections apart (the torch format's linear_qkv
            # is MindSpeed-LLM's fusion of them)
            parts = mla_rule(spec).split(nodes[here + rest].expr)
            q = M.mla_key("attn.q_a.weight" if spec.q_lora_rank else "attn.q.weight", te, False)
            out.append((str(q), E.simplify(parts["q"])))
            out.append((str(M.mla_key("attn.kv_a.weight", te, False)), E.simplify(parts["kv_a"])))
            used.add(here + rest)
            continue
        names = local if te and spec.is_moe_layer(layer) and rest.startswith("mlp_norm.") else table
        full_key = names.from_canonical(role.format(i=0, e=0))
        if full_key is None:
            raise VerifyError(f"layer {layer}: no Megatron name for {rest}")
        key = full_key[len(f"{M.LAYERS}0.") :]
        if te and rest == "attn_norm.weight" and spec.has_block(layer, "gdn"):
            key = M.GDN_TE_NORM  # megatron-core's GatedDeltaNet fuses the input norm into in_proj
        if spec.mla:
            key = M.mla_key(rest, te, spec.is_moe_layer(layer)) or key
        if "{e}" in rest:
            expert_names = [here + rest.format(e=e) for e in range(spec.num_experts)]
            have = [n for n in expert_names if n in nodes]
            if not have:
                continue
            if len(have) != len(expert_names):
                raise VerifyError(f"layer {layer} has some {rest} tensors but not every expert's")
            key = "mlp.experts.experts." + key.split(".local_experts.0.", 1)[1]
            out.append((key, [nodes[n].expr for n in expert_names]))
            used.update(expert_names)
        elif here + rest in nodes:
            out.append((key, nodes[here + rest].expr))
            used.add(here + rest)
    return out


def _stored(
    nodes: dict, spec, layers: int, experts: int = 0, te: bool = False
) -> tuple[list[tuple[str, E.Expr]], list[str]]:
    """(torch_dist key, expression) for one tensor set, and the keys of the ``_extra_state``
    objects Megatron's linear modules save beside them.  Decoder layers are stacked on a leading
    layer axis (``decoder.layers.<key>`` ``[L, ...]``) when every layer has the same modules, as
    Megatron-Core saves a homogeneous block; otherwise (dense and MoE layers mixed, layers of
    different blocks, hybrid stacks) each layer has its own keys (``decoder.layers.<i>.<key>``,
    :func:`_stacked_layers`).  Multi-token-prediction
    layers are ``mtp.layers.<k>.{enorm,hnorm,eh_proj,final_layernorm}`` around a
    ``transformer_layer``."""
    table = M.spec_layer_table("te", spec)
    stored: list[tuple[str, E.Expr]] = []
    objects: list[str] = []
    for key, name in M.PRE_LAYERS:  # the embedding (positions, BLOOM's norm)
        if name in nodes:
            stored.append((key, nodes[name].expr))
    used: set[str] = set()
    hybrid = is_hybrid(spec)
    per_layer = [_layer_entries(nodes, spec, i, table, used, te or hybrid) for i in range(layers)]

    def linear(key: str) -> bool:  # a module whose _extra_state Megatron saves
        module = key[: -len(".weight")].rsplit(".", 1)[-1]
        return key.endswith(".weight") and (
            module.startswith("linear_") or module == "eh_proj" or key in _MAMBA_LINEARS + _GDN_LINEARS
        )

    def own_objects(prefix: str, entries) -> None:
        for key, expr, by_expert in entries:
            base, _, part = key.rpartition(".")
            if part == (global_keys.mamba_parts(base) or ("",))[0]:  # a mixer tensor's first part
                key = base
            if linear(key):
                base = f"{prefix}{key[: -len('.weight')]}._extra_state"
                n = expr.shape[0] if by_expert else 1
                objects.extend(f"{base}/shard_{e}_{n}" for e in range(n))

    if is_hybrid(spec) or has_gdn_modules(spec):  # a mixer's fused tensors are stored part by part
        per_layer = [_mamba_parts(spec, entries) for entries in per_layer]
    if _stacked_layers(spec, per_layer):  # homogeneous: one stacked key per module
        first = per_layer[0] if per_layer else []
        for n, (key, _, by_expert) in enumerate(first):
            stored.append((M.LAYERS + key, E.simplify(_stacked([entries[n][1] for entries in per_layer]))))
            if linear(key):
                base = f"{M.LAYERS}{key[: -len('.weight')]}{M.EXTRA_STATE}"
                objects.extend(
                    f"{base}/shard_{i}.{e}_{layers}.{experts}" if by_expert else f"{base}/shard_{i}_{layers}"
                    for i in range(layers)
                    for e in range(experts if by_expert else 1)
                )
    else:
        for i, entries in enumerate(per_layer):
            stored += [(f"{M.LAYERS}{i}.{key}", E.simplify(x)) for key, x, _ in entries]
            own_objects(f"{M.LAYERS}{i}.", entries)
    stored += [
        (M.HYBRID_FINAL_NORM if hybrid else f"{M.FINAL_NORM}{w}", nodes[f"final_norm.{w}"].expr)
        for w in ("weight", "bias")
        if f"final_norm.{w}" in nodes
    ]
    for k in range(spec.mtp_layers):
        layer, prefix = layers + k, f"mtp.layers.{k}."
        head = [
            (m.format(k=k)[len(prefix) :], nodes[f"layers.{layer}.{c}"].expr, False)
            for m, c in M.MTP_KEYS[:3]
        ]
        body = [
            (f"transformer_layer.{key}", x, e)
            for key, x, e in _layer_entries(nodes, spec, layer, table, used, te)
        ]
        tail = [("final_layernorm.weight", nodes[f"layers.{layer}.mtp.norm.weight"].expr, False)]
        tail += [  # DeepSeek-V4: the MTP layer's hyper-connection head
            (m[len("mtp.layers.{k}.") :], nodes[f"layers.{layer}.{c}"].expr, False)
            for m, c in M.MTP_HC_HEAD
            if f"layers.{layer}.{c}" in nodes
        ]
        # the MTP block's own embedding and head are the main model's (shared in Megatron)
        used.update(
            f"layers.{layer}.{c}"
            for c in (
                *(c for _, c in (*M.MTP_KEYS, *M.MTP_HC_HEAD)),
                "mtp.embed.weight",
                "mtp.head.weight",
            )
        )
        stored += [(prefix + key, E.simplify(x)) for key, x, _ in head + body + tail]
        own_objects(prefix, head + body)
    stored += [
        (f"{M.OUTPUT_LAYER}{w}", nodes[f"lm_head.{w}"].expr)
        for w in ("weight", "bias")
        if f"lm_head.{w}" in nodes
    ]
    if hybrid:  # MambaModel saves its output layer's _extra_state (GPTModel drops it), tied or not
        objects.append(f"{M.OUTPUT_LAYER}_extra_state/shard_0_1")
    written = {"final_norm.weight", "final_norm.bias", "lm_head.weight", "lm_head.bias"}
    written |= {name for _, name in M.PRE_LAYERS}
    for key, name in M.POST_LAYERS:  # after the output layer: DeepSeek-V4's hyper-connection head
        if name in nodes and name not in written:
            stored.append((key, nodes[name].expr))
            written.add(name)
    fixed = M.fixed_roles()  # not stored: Megatron's modules hold the value (checked by the plan)
    left = sorted(n for n in nodes if n not in used and n not in written and role_of(n) not in fixed)
    if left:
        raise VerifyError(f"no torch_dist key for {left[0]}")
    return stored, objects


def _stacked_layers(spec, per_layer: list[list[tuple[str, E.Expr, bool]]]) -> bool:
    """Whether the decoder layers are stored stacked on a leading layer axis, as megatron-core
    saves a block of alike layers; else each layer under its global number
    (``decoder.layers.<i>.<key>``), as its TransformerBlock saves non-homogeneous layers (a
    ``moe_layer_freq`` pattern, heterogeneous block specs) and its MambaStack (and
    Megatron-Bridge's FalconH1Stack) every layer.  Layers whose keys or shapes differ (LFM2's
    convolution and attention layers, DeepSeek-V4's compressed and sliding-window attention, ...)
    are stored per layer, and so is every layer of a gated-delta-net model (its TransformerBlock
    with a ``linear_attention_freq``)."""
    if is_hybrid(spec) or spec.dense_layers or has_gdn_modules(spec):
        return False
    shapes = [[(k, x.shape) for k, x, _ in entries] for entries in per_layer]
    return all(s == shapes[0] for s in shapes)


# a Mamba mixer's linear modules (Transformer Engine's in megatron-core's stock spec and in
# Megatron-Bridge's FalconH1 spec): their _extra_state is saved beside them
_MAMBA_LINEARS = tuple(f"{m}.{p}_proj.weight" for m in global_keys.MAMBA_MODULES for p in ("in", "out"))
_GDN_LINEARS = ("self_attention.in_proj.weight", "self_attention.out_proj.weight")  # GatedDeltaNet's


def _mamba_parts(spec, entries: list[tuple[str, E.Expr, bool]]) -> list[tuple[str, E.Expr, bool]]:
    """A layer's entries with each fused Mamba or gated-delta-net mixer tensor as the parts
    megatron-core stores (``mixer.in_proj.weight.z`` ... ``.dt``, ``mixer.conv1d.weight.x`` ...;
    ``self_attention.in_proj.weight.query`` ... ``.alpha``, ``self_attention.conv1d.weight.query`` ...)."""
    out = []
    for key, expr, by_expert in entries:
        names = global_keys.mamba_parts(key)
        if names is None:
            out.append((key, expr, by_expert))
            continue
        start = 0
        for name, size in zip(names, global_keys.mamba_part_sizes(spec, key)):
            out.append((f"{key}.{name}", E.simplify(E.Slice(expr, 0, start, start + size)), False))
            start += size
    return out


def write_dcp_metadata(path: str, entries: tuple, data_dir: str) -> None:
    """``.metadata`` for ``entries`` (key, "tensor" | "bytes", dtype, shape, data file), each one
    whole blob of its data file (already written under ``data_dir``): the pickle
    ``torch.distributed.checkpoint`` writes, produced without importing torch (seconds)."""
    from ckpt_ir.io.torchzip import Call, _pickle

    dcp = "torch.distributed.checkpoint.metadata"

    def size(dims) -> Call:
        return Call("torch", "Size", (tuple(dims),))

    def obj(name: str, module: str = dcp, **state) -> Call:
        return Call(module, name, (), state)

    state, storage = {}, {}
    for key, kind, dtype, shape, data in entries:
        where = obj(
            "_StorageInfo",
            "torch.distributed.checkpoint.filesystem",
            relative_path=data,
            offset=0,
            length=os.path.getsize(os.path.join(data_dir, data)),
            transform_descriptors=None,
        )
        if kind == "bytes":
            state[key] = obj("BytesStorageMetadata")
            storage[obj("MetadataIndex", fqn=key, offset=None, index=None)] = where
            continue
        # TensorProperties pickles as (dtype, layout, requires_grad, memory format code, pin_memory)
        props = Call(
            dcp,
            "TensorProperties",
            (),
            (
                TorchDtype(torch_name(dtype)),
                Call("torch.serialization", "_get_layout", ("torch.strided",)),
                False,
                Call(dcp, "_MEM_FORMAT_ENCODING", (0,)),
                False,
            ),
        )
        state[key] = obj(
            "TensorStorageMetadata",
            properties=props,
            size=size(shape),
            chunks=[obj("ChunkStorageMetadata", offsets=size([0] * len(shape)), sizes=size(shape))],
        )
        storage[obj("MetadataIndex", fqn=key, offset=size([0] * len(shape)), index=None)] = where
    md = obj(
        "Metadata",
        state_dict_metadata=state,
        planner_data=None,
        storage_data=storage,
        storage_meta=None,
        version=None,
    )
    with open(path, "wb") as f:
        f.write(_pickle(md, []))
