"""Megatron-Core ``torch_dist`` frontend (``megatron.core.dist_checkpointing``, Megatron-LM's
default ``--ckpt-format`` since 0.9): lift an ``iter_N/`` directory into the IR without Megatron,
torch.distributed or reading any tensor data.

An iteration directory holds ``metadata.json`` (``sharded_backend: torch_dist``), ``common.pt``
(``args``, ``iteration`` and other non-sharded state), DCP's ``.metadata`` and ``__R_K.distcp``
data files (see :mod:`ckpt_ir.io.dcp`).  Keys are global and independent of the parallel layout
that saved them: decoder layers are stacked on a leading axis (``decoder.layers.<key>`` is
``[L, ...]``; ``decoder.layers.<i>.<key>`` when not stacked), MoE experts on the next one, and
each tensor is assembled from its chunks (the TP/PP shards of the ranks that saved it).  The
result is a TP=1, PP=1 Megatron layout with fused QKV and gate/up, exactly the tensors a TP=1
``torch`` checkpoint would hold.

Optimizer state saved with ``--dist-ckpt-optim-fully-reshardable``
(``optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>``, model shapes), in the per-bucket
``dp_reshardable`` layout (0.15+ default; MoE's chained dense + expert optimizers, MLA, MTP) or
reformulated ``fully_sharded_model_space``
(0.8-0.14 default) lifts into ``Checkpoint.states``; other layouts are refused when optimizer state
is asked for (the weights still convert without it).  Megatron-Core 0.19+ keeps the common state
(args, ...) in the DCP entry ``common_state`` instead of ``common.pt``.  An ``integrity.json``
(Megatron-Core 0.18+) is checked before anything else is read; the files of the iteration's
``tokenizer/`` (the run's tokenizer) become side files of an HF export.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

import attrs

from ckpt_ir.errors import CkptIrError, FormatError, setting
from ckpt_ir.io.dcp import Assembler, ChunkResolver, DcpTensor, read_metadata
from ckpt_ir.io.torchzip import TorchZip
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode
from ckpt_ir.ir.layout import Layout, has_gdn_modules
from ckpt_ir.ir.names import Split, layer_name, split_layer
from ckpt_ir.ir.roles import canonical_order
from ckpt_ir.megatron import args as megatron_args
from ckpt_ir.megatron import distopt, global_keys, integrity, mindspeed_mm, multimodal
from ckpt_ir.megatron import keys as M
from ckpt_ir.megatron import lift as lift_tail
from ckpt_ir.megatron.lift import spec_from_args

METADATA_JSON = M.TORCH_DIST_METADATA
COMMON = "common.pt"
COMMON_STATE = "common_state"  # Megatron-Core 0.19+: the common state as a DCP bytes entry
STATE_PREFIX = "optimizer.state."
# ChainedOptimizer (MoE: [dense, expert]) prefixes each optimizer's keys unless they are fully reshardable
_CHAINED = re.compile(r"^chained_\d+\.")


def _refused() -> str:
    """What to do about optimizer state ckpt-ir cannot reshard."""
    return (
        "re-save it with --dist-ckpt-optim-fully-reshardable, or convert the weights only "
        f"({setting('optimizer', False)})"
    )


def detect(path: str, iteration: int | str | None = None) -> bool:
    """A ``torch_dist`` iteration directory, or a Megatron save directory whose iteration (the
    latest, or ``iteration``) is one."""
    if not os.path.isdir(path):
        return False
    try:
        it_dir, _ = M.iteration_dir(path, iteration)
    except (CkptIrError, OSError, ValueError):
        return False
    return os.path.isfile(os.path.join(it_dir, METADATA_JSON))


def lift(
    path: str,
    *,
    allow_unused: tuple[str, ...] = (),
    hf_config: dict[str, Any] | None = None,
    config_name: str | None = None,
    optimizer: bool = False,
    weights_from: str = "model",
    family: str | None = None,
    iteration: int | str | None = None,
) -> Checkpoint:
    """Lift a ``torch_dist`` checkpoint (``iteration``: which one of a save directory, default the
    latest).  ``optimizer=True`` also lifts fully-reshardable distributed-optimizer state into
    ``states``; ``weights_from="master"`` takes the weights from its fp32 master copies.
    ``hf_config`` (named ``config_name``) describes the model instead of the args, and must
    describe the tensors (:func:`~ckpt_ir.megatron.lift.check_config_fits`)."""
    it_dir, iteration = M.iteration_dir(path, iteration)
    integrity.verify(it_dir)  # Megatron-Core 0.18+'s integrity.json, when the run wrote one
    _check_backend(it_dir)
    md = read_metadata(it_dir)
    common, common_path = _common_state(it_dir, md)
    if common.get("args") is None and hf_config is not None:
        # megatron-core's own dist_checkpointing.save (no Megatron-LM around it) keeps no args: the
        # model is the HF config's, the layout whole
        args: dict[str, Any] = {}
    elif common.get("args") is None:
        raise FormatError(
            f"{common_path}: the checkpoint has no 'args' (megatron-core's dist_checkpointing.save "
            f"writes none); pass {setting('hf_config', metavar='DIR')} (the model's HF config.json) to say "
            "what model it holds"
        )
    else:
        args = megatron_args.args_dict(common.get("args"), common_path)
    spec, cfg, inferred = spec_from_args(args, hf_config, common_path, family, config_name)
    n_args = args.get("num_layers")
    if isinstance(n_args, int) and n_args != spec.num_layers:
        raise FormatError(
            f"{common_path}: args.num_layers is {n_args} but the HF config has {spec.num_layers} "
            f"layers; the config does not belong to this checkpoint"
        )
    if iteration is None:
        iteration = common.get("iteration") if isinstance(common.get("iteration"), int) else 1
    tables = M.read_tables(spec)
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    model: dict[str, tuple[DcpTensor, tuple[int, ...]]] = {}
    states: dict[str, dict[str, tuple[DcpTensor, tuple[int, ...]]]] = {}
    other_optimizer: list[str] = []
    # set ("" = weights, else an optimizer state) -> Mamba mixer key -> part name -> its tensor
    parts: dict[str, dict[str, dict[str, DcpTensor]]] = {}
    te_norms = te_fc1 = False
    # a vision-language model (Megatron-Bridge's): set -> the tower's keys (HF names, whole)
    tower: dict[str, dict[str, DcpTensor]] = {}
    for key, t in md.tensors.items():
        plain = _CHAINED.sub("", key)  # without a chained optimizer's prefix (MoE: dense, expert)
        if plain.startswith("optimizer."):
            stored = plain[len(STATE_PREFIX) :].split(".", 1)[0] if plain.startswith(STATE_PREFIX) else ""
            which = _STATE_NAMES.get(stored, stored)
            if which in distopt.STATE_KEYS:
                target, set_name = states.setdefault(which, {}), which
                key = plain[len(STATE_PREFIX) + len(stored) + 1 :]
            else:
                other_optimizer.append(key)
                continue
        else:
            target, set_name = model, ""
        if spec.vision is not None:
            below = _language_model_key(key, t, tower.setdefault(set_name, {}), md.path)
            if below is None:  # a tower key
                continue
            key = below
        part = global_keys.MAMBA_PART_KEY.match(key)
        if part is not None:  # one part of a Mamba mixer's fused tensor: joined below
            parts.setdefault(set_name, {}).setdefault(part.group(1), {})[part.group(2)] = t
            continue
        if key.endswith(M.EXTRA_STATE):
            dropped[key] = "Transformer-Engine _extra_state (FP8 metadata)"
            continue
        te_norms |= key.endswith((M.TE_QKV_NORM, M.GDN_TE_NORM))
        te_fc1 |= key.endswith(M.TE_FC1_NORM)
        names = global_keys.names(key, t.shape, spec.num_layers, tables, md.path, spec.mla)
        if names is None:
            if any(fnmatch.fnmatch(key, pat) for pat in allow_unused):
                dropped[key if target is model else f"optimizer state of {key}"] = (
                    f"matched {setting('allow_unused')}"
                )
            elif target is model:
                unknown.append(key)
            continue
        for canon, index in names:
            if canon in target:
                raise FormatError(
                    f"{md.path}: tensor {canon} is stored twice (as {target[canon][0].key} and {key})"
                )
            target[canon] = (t, index)
    joined = _join_mamba_parts(parts, spec, tables, md.path, unknown)
    towers = _lift_towers(tower, spec, it_dir, md.path, dropped, allow_unused, unknown)
    if unknown and hf_config is None:  # with a config: said by check_config_fits, below
        raise lift_tail.unknown_tensors(unknown, it_dir)
    for key in md.objects:
        base = key.split("/shard_", 1)[0]
        if base == COMMON_STATE:
            continue
        if base.endswith(M.EXTRA_STATE):
            dropped[base] = "Transformer-Engine _extra_state (FP8 metadata)"
        else:
            dropped[base] = "Megatron sharded object (rng state, optimizer bookkeeping): not model weights"
    sharding = _sharding_type(common)
    want_states = optimizer or weights_from == "master"
    buckets = _bucket_keys(other_optimizer) if want_states and not states else None
    if buckets:
        other_optimizer = []
    if want_states and (other_optimizer or (states and set(states) != set(distopt.STATE_KEYS))):
        raise FormatError(
            f"{it_dir}: the distributed-optimizer state is saved as {sharding or 'an unknown type'!r} "
            f"(keys such as {_short((other_optimizer or sorted(states))[0])}), "
            f"which ckpt-ir cannot reshard; {_refused()}"
        )
    # Megatron names the sharding type in content_metadata whenever the run used the distributed
    # optimizer, also when it saved no optimizer state (--no-save-optim): refuse only saved state
    saved_objects = any("optimizer." in key.split("/shard_", 1)[0] for key in md.objects)
    if want_states and sharding and not states and not buckets and not other_optimizer and saved_objects:
        # e.g. dp_zero_gather_scatter: the whole state pickled as one object per model-parallel rank
        raise FormatError(
            f"{it_dir}: the distributed-optimizer state is saved as {sharding!r}, which ckpt-ir cannot "
            f"read; {_refused()}"
        )
    if weights_from == "master" and not states and not buckets:
        raise FormatError(
            f"{it_dir}: {setting('weights_from', 'master')} needs distributed-optimizer state, and this "
            f"checkpoint has none"
        )
    if not want_states:
        for key in other_optimizer:
            dropped[_short(key)] = "distributed-optimizer state (per-bucket layout): not requested"
        for which in states:
            dropped[f"{STATE_PREFIX}{which}.*"] = (
                "distributed-optimizer state (fp32 masters, Adam moments): carried only to a Megatron target"
            )
        states = {}
    # torch_dist names a layer's norms the Transformer-Engine way whatever the layer spec (the local
    # spec maps its keys so): the modules the run built, and so the torch format's names and the
    # optimizer's parameter order, are those of args.transformer_impl
    norm_names = (
        "local" if args.get("transformer_impl") == "local" else lift_tail.norm_names(te_norms, te_fc1)
    )
    with ChunkResolver(it_dir) as resolver:
        build = _Builder(md.path, resolver, _reformulated_shapes(md))
        tensors = {name: TensorNode.whole(name, build(t, index)) for name, (t, index) in model.items()}
        sets = {
            which: {name: TensorNode.whole(name, build(t, index)) for name, (t, index) in entries.items()}
            for which, entries in states.items()
        }
        for set_name, nodes in towers.items():
            (tensors if not set_name else sets.setdefault(set_name, {})).update(nodes)
        for set_name, entries in joined.items():
            into = tensors if not set_name else sets.setdefault(set_name, {})
            for name, pieces in entries.items():
                into[name] = TensorNode.whole(
                    name, E.simplify(E.Concat(tuple(build(t, ()) for t in pieces), 0))
                )
        dtype_key = None
        if buckets:
            sets, dtype_key = _bucket_states(buckets, md, build, spec, tensors, args, norm_names, it_dir)
            for key in [k for k in dropped if _CHAINED.sub("", k).startswith("optimizer.distributed.")]:
                del dropped[key]
    # (ckpt-ir's own output, whose args name its family, is written unshifted)
    if sets and args.get("overlap_grad_reduce") and not buckets and "ckpt_ir_family" not in args:
        import sys

        # Megatron-LM PR #5077: before the fix, fully-reshardable saves with several DDP buckets
        # did not subtract the stripped bucket padding, so states after bucket 0 are shifted
        sys.stderr.write(
            f"ckpt-ir: warning: {it_dir}: optimizer state saved with overlapped gradient reduction "
            f"(several DDP buckets); Megatron-Core <= 0.19 saved such fully-reshardable state shifted "
            f"(Megatron-LM PR #5077) and ckpt-ir carries it as saved\n"
        )
    if weights_from == "master":
        tensors = dict(sets["param"])
        if not optimizer:
            sets = {}
    if spec.mla:
        for s in (tensors, *sets.values()):
            lift_tail.fuse_mla(spec, s)
    lift_tail.complete_tensors(spec, tensors, sets, dropped)
    for which, s in sets.items():
        missing = sorted(set(tensors) - set(s), key=canonical_order)
        if missing:
            raise FormatError(
                f"{it_dir}: optimizer state {which!r} has no entry for {missing[0]}"
                f"{f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''}; the optimizer state "
                f"is incomplete: {_refused()}"
            )
        for name in set(s) - set(tensors):
            dropped[f"optimizer state {which} of {name}"] = "no matching model weight"
            del s[name]
    layout = Layout(
        format="mcore",
        fused_qkv=True,
        fused_gate_up=True,
        norm_names=norm_names,
        gdn_keys="mcore" if has_gdn_modules(spec) else "mindspeed",  # megatron-core's modules only
    )
    if spec.vision is not None:  # Megatron-Bridge's layout: the tower in its HF form or Megatron's
        layout = multimodal.read_layout(layout, "bridge", spec)
    if hf_config is not None:
        lift_tail.check_config_fits(config_name, path, spec, layout, tensors, unknown)
    meta: dict[str, Any] = {
        "iteration": iteration if isinstance(iteration, int) else 1,
        "args": args,
        "format": "torch_dist",
    }
    if inferred:
        meta["family_from_args"] = inferred
    if sets:
        opt = common.get("optimizer")
        meta["optimizer"] = {
            "optimizer": {k: v for k, v in opt.items() if k != "param_state_sharding_type"}
            if isinstance(opt, dict)
            else None,
            "source_layout": None,
            "sharding_type": sharding,
            **distopt.training_args(args),
        }
        if buckets:  # dp_reshardable keeps the optimizer's own state dict per (TP, PP) group: group 0's
            meta["optimizer"]["optimizer"] = _optimizer_objects(md, bool(spec.num_experts))
        if dtype_key is not None:
            meta["optimizer"]["dtype_key"] = dtype_key
    elif common.get("optimizer") is not None:
        dropped[f"{COMMON}:optimizer"] = "optimizer settings: carried only with the optimizer state"
    # the training state besides the optimizer's travels either way (rng_state is sharded per rank
    # in torch_dist and belongs to its grid: not carried)
    meta["training"] = {
        "args": megatron_args.all_args(common.get("args")),
        "opt_param_scheduler": common.get("opt_param_scheduler"),
        "num_floating_point_operations_so_far": common.get("num_floating_point_operations_so_far"),
        "rng_state": {},
        "source_layout": None,
    }
    return lift_tail.checkpoint(
        path,
        spec,
        layout,
        tensors,
        sets,
        args=args,
        cfg=cfg,
        dropped=dropped,
        meta=meta,
        iteration_dir=it_dir,
    )


def _language_model_key(key: str, t: DcpTensor, tower: dict[str, DcpTensor], where: str) -> str | None:
    """A vision-language model's key below Megatron-Bridge's ``language_model.`` (its GPTModel's
    own key), or None for a key of the tower, kept in ``tower``."""
    module, rest, naming = multimodal.module_of(key, None)
    if naming != "bridge":
        raise FormatError(
            f"{where}: {key} is MindSpeed-MM's name; MindSpeed-MM saves torch-format release/ rank "
            f"files, and ckpt-ir reads a vision-language model's torch_dist checkpoint in "
            f"Megatron-Bridge's layout (language_model.*) only"
        )
    if module == "text":
        return rest
    tower[key] = t
    return None


def _lift_towers(
    tower: dict[str, dict[str, DcpTensor]],
    spec,
    it_dir: str,
    where: str,
    dropped: dict[str, str],
    allow_unused: tuple[str, ...],
    unknown: list[str],
) -> dict[str, dict[str, TensorNode]]:
    """The vision tower's canonical tensors of each set ("" the weights, else an optimizer state)
    from Megatron-Bridge's keys (HF names, each one whole tensor: :func:`ckpt_ir.megatron.
    multimodal.tower_global`); keys no table knows go to ``unknown`` (or, matching
    ``allow_unused``, to ``dropped``)."""
    out: dict[str, dict[str, TensorNode]] = {}
    # a tower in Megatron's modules (Megatron-Bridge's Qwen3-VL): its stacked keys per layer, read
    # as the torch format's keys of a whole model
    names = mindspeed_mm.megatron_tower(spec, "bridge")
    layout = multimodal.read_layout(Layout(format="mcore"), "bridge", spec)
    with ChunkResolver(it_dir) as resolver:
        build = _Builder(where, resolver)
        for set_name, keys in tower.items():
            found = {
                local: [(0, 0, 0, where, build(t, index))]
                for key, t in keys.items()
                for local, index in multimodal.unstacked(names, key, tuple(t.shape))
            }
            nodes, _, left = multimodal.lift_tower(found, spec, layout, where, dropped)
            for key in left:
                if any(fnmatch.fnmatch(key, pat) for pat in allow_unused):
                    dropped[key if not set_name else f"optimizer state of {key}"] = (
                        f"matched {setting('allow_unused')}"
                    )
                elif not set_name:
                    unknown.append(key)
            out[set_name] = nodes
    return out


def _join_mamba_parts(
    parts: dict[str, dict[str, dict[str, DcpTensor]]], spec, tables, where: str, unknown: list[str]
) -> dict[str, dict[str, list[DcpTensor]]]:
    """The Mamba mixer tensors megatron-core stores part by part (``mixer.in_proj.weight.z`` ...):
    set -> canonical name -> its parts' tensors in the fused tensor's order.  A tensor with a part
    missing or an unknown part is an error naming it."""
    out: dict[str, dict[str, list[DcpTensor]]] = {}
    for set_name, by_key in parts.items():
        for key, have in by_key.items():
            names = global_keys.layer_mamba_parts(key)
            assert names is not None  # MAMBA_PART_KEY matched only such keys
            if set(have) != set(names):
                raise FormatError(
                    f"{where}: {key} is stored as parts {sorted(have)}, megatron-core's mixer has "
                    f"{list(names)}; the checkpoint is incomplete"
                )
            canon = global_keys.names(key, (), spec.num_layers, tables, where)
            if canon is None:
                unknown.append(key)
                continue
            out.setdefault(set_name, {})[canon[0][0]] = [have[n] for n in names]
    return out


_BUCKET = re.compile(
    r"^(?:chained_(\d+)\.)?optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\.dtype_(\(.+\))"
    r"\.bucket_idx_(\d+)\.(\w+)$"
)


def _bucket_keys(keys: list[str]) -> dict[tuple[int, int, int, int], dict[str, str]] | None:
    """dp_reshardable (Megatron-Core 0.15+ default) optimizer keys: (optimizer, its model-parallel
    rank, buffer, bucket) -> {state: key}; None when ``keys`` are not (only) that layout.  The
    optimizer is the index in Megatron's chain (``chained_<i>.``: 0 dense, 1 expert), 0 unchained."""
    out: dict[tuple[int, int, int, int], dict[str, str]] = {}
    for key in keys:
        m = _BUCKET.match(key)
        if m is None:
            return None
        at = (int(m.group(1) or 0), int(m.group(2)), int(m.group(3)), int(m.group(5)))
        out.setdefault(at, {})[m.group(6)] = key
    return out or None


def _group_objects(md, prefix: str) -> dict[str, Any]:
    """The DistributedOptimizer's own state dict (``optimizer`` param groups, ...) that dp_reshardable
    saves as sharded objects ``<prefix><key>`` (each ``torch.save([value])``)."""
    from ckpt_ir.io.dcp import read_object

    out = {}
    for key in md.objects:
        base = key.split("/shard_", 1)[0]
        if base.startswith(prefix) and not base[len(prefix) :].startswith("per_bucket_numel"):
            value = read_object(md, key)
            out[base[len(prefix) :]] = value[0] if isinstance(value, list) and len(value) == 1 else value
    return out


def _optimizer_objects(md, experts: bool) -> Any:
    """dp_reshardable's optimizer state dicts of model-parallel rank 0, as the ``optimizer`` entry of a
    torch-format ``model_optim_rng.pt`` holds them: one dict, or ``[dense, expert]`` with experts."""
    if not experts:
        return _group_objects(md, "optimizer.distributed.dp_group_idx_0.")
    return [_group_objects(md, f"chained_{i}.optimizer.distributed.dp_group_idx_0.") for i in (0, 1)]


def _bucket_states(
    buckets,
    md,
    build,
    spec,
    tensors: dict[str, TensorNode],
    args: dict[str, Any],
    norm_names: str,
    where: str,
) -> tuple[dict[str, dict[str, TensorNode]], tuple]:
    """Optimizer state saved ``dp_reshardable``: for each optimizer's model-parallel rank and each of
    its buffers (one per model chunk holding its parameters), one 1-D tensor per DDP bucket holding
    that bucket without its end padding, i.e. ``distrib_optim.pt``'s coalesced buffer cut at the
    bucket ends.  Parameters are placed as in ``distrib_optim.pt`` (the order of the layer spec the
    run used, args.transformer_impl, whose norm naming is ``norm_names``), then their TP shards are
    gathered.

    With experts Megatron chains two optimizers (``chained_0.``, ``chained_1.``): the dense one over
    the (TP, PP) ranks, ``TP rank + TP x stage``, and the expert one over the (expert TP, EP, PP)
    ranks, ``expert-TP rank + expert TP x (EP rank + EP x stage)``, whose buffers hold the routed
    experts of that EP rank laid out for the expert-DP size."""
    # the Megatron keys of each rank, as the torch-format writer places them
    from ckpt_ir.io.safe_pickle import TorchDtype
    from ckpt_ir.ir.checkpoint import gather_exprs
    from ckpt_ir.megatron.ranks import rank_content

    a = lambda k, d=1: args.get(k) or d  # noqa: E731
    tp, pp, dp = a("tensor_model_parallel_size"), a("pipeline_model_parallel_size"), a("data_parallel_size")
    ep, etp = a("expert_model_parallel_size"), a("expert_tensor_parallel_size", tp)
    unsupported = [
        what
        for what, yes in (
            ("context parallelism", a("context_parallel_size") != 1),
            ("grouped-GEMM experts", bool(args.get("moe_grouped_gemm"))),
            ("multi-token prediction with PP > 1", spec.mtp_layers > 0 and pp > 1),
        )
        if yes
    ]
    if unsupported:
        raise FormatError(
            f"{where}: dp_reshardable optimizer state with {unsupported[0]} is not supported yet; {_refused()}"
        )
    layout = Layout(
        format="mcore",
        tp=tp,
        pp=pp,
        vpp_layers=args.get("num_layers_per_virtual_pipeline_stage"),
        ep=ep,
        etp=None if etp == tp else etp,
        fused_qkv=True,
        fused_gate_up=True,
        norm_names=norm_names,
    )
    view_tensors = dict(tensors)
    if spec.mla:  # the torch format's fused linear_qkv, which rank_content places
        lift_tail.fuse_mla(spec, view_tensors)
    content, _ = rank_content(Checkpoint(spec=spec, layout=layout, tensors=view_tensors))
    content = {
        at: [m for e in entries for m in _mcore_entries(spec, e, norm_names != "local")]
        for at, entries in content.items()
    }
    chunks = 1 + max(c for _, c in content)
    tied = spec.tied_embeddings
    # (optimizer, experts?, its DP size, its model-parallel ranks: (index, TP shard, EP rank) per stage)
    optimizers: list[tuple[int, bool, int, Callable[[int], list[tuple[int, int, int | None]]]]] = [
        (0, False, dp, lambda stage: [(r + tp * stage, r, None) for r in range(tp)])
    ]
    if spec.num_experts:
        optimizers.append(
            (
                1,
                True,
                distopt.expert_dp(args, dp),
                lambda stage: [(r + etp * (e + ep * stage), r, e) for e in range(ep) for r in range(etp)],
            )
        )

    def rule_of(canon: str) -> Split | None:
        return M.mcore_split(canon, norm_names, spec)

    shards: dict[str, dict[str, dict[int, E.Expr]]] = {w: {} for w in distopt.STATE_KEYS}
    n_shards: dict[str, int] = {}
    expected: set[tuple[int, int, int, int]] = set()
    dtype_key = None
    for opt, experts, opt_dp, mp_ranks in optimizers:
        gbuf: dict[
            tuple[int, int], int
        ] = {}  # (stage, chunk) -> buffer index: Megatron counts only chunks with parameters of its own
        for stage, chunk in sorted(content):
            mine = [
                e
                for e in content[(stage, chunk)]
                if distopt.is_expert_param(e.key) == experts and not distopt.is_buffer(e.key)
            ]
            if mine:
                gbuf[(stage, chunk)] = sum(1 for s, _ in gbuf if s == stage)
            for group, shard, ep_rank in mp_ranks(stage) if mine else ():
                local = {}
                for e in mine:
                    if ep_rank is not None and e.ep != ep_rank:
                        continue
                    whole, rule = tensors[e.canon[0]].shape, rule_of(e.canon[0])
                    n = etp if experts else tp
                    local_shape = list(whole)
                    if rule is not None and n > 1:
                        local_shape[rule.dim] //= n
                    local[e.key] = (e.canon[0], tuple(local_shape))
                    n_shards[e.canon[0]] = n
                keys = distopt.registration_order(list(local)) or list(local)
                params = [(k, math.prod(local[k][1])) for k in keys]
                shared = frozenset() if experts else distopt.shared_params(tied, stage, pp, chunk, chunks)
                size = distopt.bucket_size_for(args, stage, chunk, opt_dp)
                lay = distopt.param_offsets(params, size, opt_dp, shared)
                at = [(opt, group, gbuf[(stage, chunk)], b) for b in range(len(lay.bucket_sizes))]
                expected.update(at)
                stored = [buckets.get(k) for k in at]
                if any(s is None or set(s) != set(distopt.STATE_KEYS) for s in stored):
                    raise FormatError(
                        f"{where}: dp_reshardable state of {'expert' if experts else 'dense'} optimizer "
                        f"rank {group} chunk {chunk} does not have the {len(lay.bucket_sizes)} buckets the "
                        f"parameter layout gives (DP {opt_dp}, bucket size {size}); the args do not "
                        f"match how it was saved"
                    )
                for bucket_size, keys_of in zip(lay.bucket_sizes, stored):
                    for key in keys_of.values():
                        dcp_t = md.tensors[key]
                        if dcp_t.shape != (bucket_size,) or dcp_t.dtype != "F32":
                            raise FormatError(
                                f"{where}: {key} is {dcp_t.dtype} {list(dcp_t.shape)}, but the rebuilt "
                                f"parameter layout gives F32 [{bucket_size}] for that bucket; the args do "
                                f"not match how the optimizer state was saved"
                            )
                        m = _BUCKET.match(key)
                        assert m is not None  # _bucket_keys kept only the keys it matched
                        dtype_key = dtype_key or m.group(4)
                for k, numel in params:
                    b, off = lay.in_bucket[k]
                    canon, shape = local[k]
                    for which in distopt.STATE_KEYS:
                        flat = build(md.tensors[stored[b][which]], ())
                        piece = E.simplify(E.Reshape(E.Slice(flat, 0, off, off + numel), shape))
                        shards[which].setdefault(canon, {}).setdefault(shard, piece)
    extra = sorted(set(buckets) - expected)
    if extra:
        raise FormatError(
            f"{where}: dp_reshardable bucket {extra[0]} (optimizer, rank, buffer, bucket) is not in the "
            f"parameter layout rebuilt from the args; the args do not match how it was saved"
        )
    sets: dict[str, dict[str, TensorNode]] = {}
    for which, by_name in shards.items():
        nodes = {}
        for canon, ranks in by_name.items():
            rule, n = rule_of(canon), n_shards[canon]
            whole_expr = (
                gather_exprs(tuple(ranks[r] for r in range(n)), rule)
                if rule is not None and n > 1
                else ranks[0]
            )
            nodes[canon] = TensorNode.whole(canon, whole_expr)
        sets[which] = nodes
    if dtype_key is None:
        raise FormatError(f"{where}: no dp_reshardable optimizer state found")
    return sets, tuple(TorchDtype(d.strip().removeprefix("torch.")) for d in dtype_key.strip("()").split(","))


_MTP_FINAL_NORMS = re.compile(r"^mtp\.final_layernorms\.(\d+)\.(weight|bias)$")
_LAYER_PREFIX = re.compile(r"^(decoder\.layers\.\d+\.|mtp\.layers\.\d+\.transformer_layer\.)")


def _mcore_entries(spec, entry, te: bool) -> list:
    """A torch-format rank entry under the names of megatron-core's own modules, which dp_reshardable
    lays out: the torch format keeps MindSpeed-LLM's for multi-latent attention (one fused
    ``linear_qkv`` for the two down-projections) and multi-token prediction (``mtp.final_layernorms.<k>``
    and a top-level ``final_layernorm`` for the main model's)."""

    if entry.key == M.MTP_FINAL_NORM or entry.key == M.MTP_FINAL_NORM[: -len("weight")] + "bias":
        return [attrs.evolve(entry, key="decoder." + entry.key)]
    m = _MTP_FINAL_NORMS.match(entry.key)
    if m:
        return [attrs.evolve(entry, key=f"mtp.layers.{m.group(1)}.final_layernorm.{m.group(2)}")]
    prefix = _LAYER_PREFIX.match(entry.key)
    if not spec.mla or prefix is None or len(entry.canon) != 1:
        return [entry]
    layer, rest = split_layer(entry.canon[0])
    assert layer is not None  # a decoder / MTP layer's key names a layer's tensor
    if rest == "attn.qkv_a.weight":
        q = "attn.q_a.weight" if spec.q_lora_rank else "attn.q.weight"
        return [
            attrs.evolve(
                entry, key=prefix.group(1) + str(M.mla_key(c, te, False)), canon=(layer_name(layer, c),)
            )
            for c in (q, "attn.kv_a.weight")
        ]
    key = M.mla_key(rest, te, spec.is_moe_layer(layer))
    return [entry if key is None else attrs.evolve(entry, key=prefix.group(1) + key)]


def _common_state(it_dir: str, md) -> tuple[dict, str]:
    """The non-sharded state (args, iteration, scheduler, ...): ``common.pt`` up to Megatron-Core
    0.18; from 0.19 the DCP bytes entry ``common_state`` (``torch.save([state])``)."""
    from ckpt_ir.io.dcp import read_object

    path = os.path.join(it_dir, COMMON)
    if os.path.isfile(path):
        common = TorchZip(path).obj
    else:
        key = next((k for k in md.objects if k.split("/shard_", 1)[0] == COMMON_STATE), None)
        if key is None:
            raise FormatError(
                f"{it_dir}: neither {COMMON} (Megatron-Core <= 0.18) nor a {COMMON_STATE} entry "
                f"(0.19+); the checkpoint's common state (args) is missing"
            )
        path = f"{md.path}/.metadata ({COMMON_STATE})"
        value = read_object(md, key)
        common = value[0] if isinstance(value, list) and len(value) == 1 else value
    if not isinstance(common, dict):
        raise FormatError(f"{path}: not a Megatron common-state dict")
    return common, path


# fully_sharded_model_space (Megatron-Core 0.8-0.14) calls the fp32 master copy "fp32_param"
_STATE_NAMES = {"fp32_param": "param"}


def _reformulated_shapes(md) -> dict[str, tuple[int, ...]]:
    """Tensors Megatron-Core <= 0.14 stored reformulated (``mcore_data[key]
    ['nd_reformulated_orig_global_shape']``): key -> their model shape."""
    out = {}
    data = md.mcore_data if isinstance(md.mcore_data, dict) else {}
    for key, info in data.items():
        shape = info.get("nd_reformulated_orig_global_shape") if isinstance(info, dict) else None
        if (
            isinstance(key, str)
            and isinstance(shape, (tuple, list))
            and all(isinstance(n, int) for n in shape)
        ):
            out[key] = tuple(shape)
    return out


def _check_backend(it_dir: str) -> None:
    path = os.path.join(it_dir, METADATA_JSON)
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read ({e}); the checkpoint is corrupt") from None
    backend = info.get("sharded_backend") if isinstance(info, dict) else None
    if backend != "torch_dist":
        raise FormatError(
            f"{path}: sharded backend {backend!r}; ckpt-ir reads only Megatron's 'torch_dist' "
            f"distributed checkpoints"
        )


def _short(key: str) -> str:
    return key.split(".gbuf_idx_", 1)[0] + ".*" if ".gbuf_idx_" in key else key


def _sharding_type(common: dict) -> str | None:
    cm = common.get("content_metadata")
    if isinstance(cm, dict) and isinstance(cm.get("distrib_optim_sharding_type"), str):
        return cm["distrib_optim_sharding_type"]
    opt = common.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("param_state_sharding_type"), str):
        return opt["param_state_sharding_type"]
    return None


class _Builder(Assembler):
    """An :class:`~ckpt_ir.io.dcp.Assembler` that also reads the tensors Megatron-Core <= 0.14
    stored reformulated (``reformulated``: key -> model shape)."""

    def __init__(
        self, where: str, resolver: ChunkResolver, reformulated: dict[str, tuple[int, ...]] | None = None
    ) -> None:
        super().__init__(where, resolver)
        self.reformulated = reformulated or {}

    def __call__(self, t: DcpTensor, index: tuple[int, ...] = ()) -> E.Expr:
        if t.key in self.reformulated:
            return self._reformulated(t, self.reformulated[t.key], index)
        return super().__call__(t, index)

    def _reformulated(self, t: DcpTensor, shape: tuple[int, ...], index: tuple[int, ...]) -> E.Expr:
        """Optimizer state Megatron-Core 0.8-0.14 saved ``fully_sharded_model_space``: the tensor of
        model shape ``shape`` is cut into a grid of ``t.shape[:-1]`` equal blocks, each stored
        flattened along the last axis; block ``b`` is the part at ``b * block shape``."""
        grid = t.shape[:-1]
        if (
            len(grid) != len(shape)
            or any(n % g for n, g in zip(shape, grid))
            or t.shape[-1] != math.prod(n // g for n, g in zip(shape, grid))
        ):
            raise FormatError(
                f"{self.where}: {t.key} is stored as {list(t.shape)}, which is no block grid of its "
                f"model shape {list(shape)}; the metadata is corrupt"
            )
        block = tuple(n // g for n, g in zip(shape, grid))
        k = len(index)
        if any(block[d] != 1 for d in range(k)):
            raise FormatError(f"{self.where}: {t.key}: a stacked axis is split into blocks of {block[:k]}")

        def tile(prefix: tuple[int, ...]) -> E.Expr:
            d = len(prefix)
            if d == len(grid):
                return E.Reshape(Assembler.__call__(self, t, prefix), block[k:])
            parts = [tile(prefix + (b,)) for b in range(grid[d])]
            return parts[0] if len(parts) == 1 else E.Concat(tuple(parts), d - k)

        return E.simplify(tile(tuple(index)))
