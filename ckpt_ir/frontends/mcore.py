"""Megatron-Core frontend: lift ``torch``-format rank directories (as written by Megatron-LM,
MindSpeed-LLM or ckpt-ir) into the IR without loading any tensor data.

The layout (TP, PP, VPP, layer list, no-op layers) is read from ``args`` and checked against the
rank directories present; local layer numbers are mapped back to model layers through the same
placement rule the backend uses.  Tensor-parallel shards stay shards (``gather`` joins them).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections import defaultdict
from collections.abc import Callable, Collection
from typing import Any

import attrs

from ckpt_ir.errors import CoverageError, FormatError, setting
from ckpt_ir.io.torchzip import TorchZip, iter_tensors, with_exprs
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode, gather_exprs
from ckpt_ir.ir.layout import Layout, expert_rank_files, layer_slots
from ckpt_ir.ir.names import NameTable, Split, is_expert
from ckpt_ir.ir.roles import split_rule
from ckpt_ir.ir.spec import ModelSpec
from ckpt_ir.megatron import args as megatron_args
from ckpt_ir.megatron import distopt, mindspeed_mm, multimodal
from ckpt_ir.megatron import keys as M
from ckpt_ir.megatron import lift as lift_tail
from ckpt_ir.megatron.lift import ArgReader, spec_from_args


def detect(path: str) -> bool:
    if os.path.isfile(os.path.join(path, M.TRACKER)):
        return True
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(n.startswith("iter_") or n == "release" or M.RANK_DIR.match(n) for n in names)


def lift(
    path: str,
    *,
    allow_unused: tuple[str, ...] = (),
    hf_config: dict[str, Any] | None = None,
    config_name: str | None = None,
    weights_from: str = "model",
    optimizer: bool = False,
    optimizer_layout: dict[str, int | None] | None = None,
    family: str | None = None,
    replicas: str = "check",
    iteration: int | str | None = None,
) -> Checkpoint:
    """``iteration``: which iteration of a save directory to read (a number or ``release``; default
    the latest, see :func:`~ckpt_ir.megatron.keys.iteration_dir`).  ``hf_config`` describes the
    model instead of the args (``config_name`` names it in errors; it must describe the tensors,
    see :func:`~ckpt_ir.megatron.lift.check_config_fits`).  ``family``: the model family when the
    args do not say (default: inferred from them).  ``weights_from="master"`` takes every
    parameter from the distributed optimizer's fp32 master
    copy (``distrib_optim.pt``) instead of the model's (e.g. bf16) weights.  ``optimizer=True``
    also lifts the distributed-optimizer state (when the checkpoint has it) into ``states``.
    ``optimizer_layout`` corrects what args say about that state's layout: ``dp``, ``bucket_size``
    (0: one bucket) and ``align`` (elements each parameter starts on a multiple of).
    ``replicas``: how copies of a replicated tensor in several rank files are treated, see
    :func:`check_replicas`."""
    if replicas not in REPLICA_MODES:
        raise ValueError(f"replicas={replicas!r}: choose one of {', '.join(REPLICA_MODES)}")
    it_dir, iteration = M.iteration_dir(path, iteration)
    found: dict[tuple[int, int | None, int | None], str] = {}
    for n in sorted(os.listdir(it_dir)):
        m = M.RANK_DIR.match(n)
        if not m:
            continue
        f = os.path.join(it_dir, n, M.RANK_FILE)
        if not os.path.isfile(f):
            raise FormatError(f"{os.path.join(it_dir, n)}: rank directory has no model_optim_rng.pt")
        found[(int(m.group(1)), _int(m.group(2)), _int(m.group(3)))] = f
    if not found:
        raise FormatError(f"{it_dir}: no mp_rank_* directories")
    first = TorchZip(found[min(found, key=lambda k: (k[0], k[1] or 0, k[2] or 0))])
    if not isinstance(first.obj, dict):
        raise FormatError(f"{first.path}: not a Megatron checkpoint dict")
    no_args = first.obj.get("args") is None and bool(distopt.chunk_keys(first.obj))
    if no_args and hf_config is None and _mindspeed_mm_keys(first):  # ckpt-ir keeps the config in hf/
        own = os.path.join(os.path.dirname(os.path.abspath(it_dir)), M.MCORE_HF_DIR, "config.json")
        if os.path.isfile(own):
            hf_config, config_name = _json_object(own), own
    if no_args and _mindspeed_mm_keys(first):
        found = _mm_expert_ranks(found)
    if no_args:
        args = _no_args(found, hf_config, first.path, mm=_mindspeed_mm_keys(first))
    else:
        args = megatron_args.args_dict(first.obj.get("args"), first.path)
    a = ArgReader(args, first.path)
    said_by = it_dir  # what gives the iteration every rank file must hold
    if iteration is None:  # an iteration directory whose name does not say which: its files do
        said_by, stored = first.path, first.obj.get("iteration")
        iteration = stored if isinstance(stored, int) else 1
    tp = a.size("tensor_model_parallel_size")
    pp = a.size("pipeline_model_parallel_size")
    ep = a.size("expert_model_parallel_size")
    # MindSpeed-LLM's deepseek4 converter records it as expert_tp_size (its default 1)
    etp_arg = a.size("expert_tensor_parallel_size", None) or a.size("expert_tp_size", None)
    etp = None if etp_arg in (None, tp) else etp_arg
    if tp * pp * ep > 4 * len(found):  # args claim far more ranks than there are directories
        raise FormatError(
            f"{it_dir}: args say TP={tp}, PP={pp}, EP={ep} but only {len(found)} rank "
            f"directories exist; the checkpoint is incomplete or its args are wrong"
        )
    spec, cfg, inferred = spec_from_args(args, hf_config, first.path, family, config_name)
    tables = M.read_tables(spec)
    noop = a.layers("noop_layers") or ()
    # the padded rows (the tensors confirm them below): an odd vocabulary splits over TP only padded
    rows = args.get("padded_vocab_size")
    placement = (
        _mm_layout(found, spec, tp, pp, first)
        if no_args and spec.vision is not None
        else {
            "num_layer_list": a.layers("num_layer_list") or _hybrid_stages(args, pp, first.path),
            "padded_vocab": rows if isinstance(rows, int) and rows > spec.vocab_size else None,
        }
    )
    layout = Layout(
        format="mcore",
        tp=tp,
        pp=pp,
        vpp_layers=a.size("num_layers_per_virtual_pipeline_stage", None),
        noop_layers=noop,
        **{"fused_qkv": True, "fused_gate_up": True, **placement},
        ep=ep,
        etp=etp,
        grouped_gemm=bool(args.get("moe_grouped_gemm")) and spec.num_experts > 0,
        # gated-delta-net models: the keys say whose modules (below); MindSpeed-LLM's only at TP 1
        gdn_keys=M.gdn_keys_from_args(spec, args, tp),
    )
    # mp_rank_TT_XXX is TP+PP when PP > 1, else TP+EP: only args can tell
    ranks = {
        (t, a or 0, b or 0) if b is not None or pp > 1 else (t, 0, a or 0): f
        for (t, a, b), f in found.items()
    }
    n_args = args.get("num_layers")
    if isinstance(n_args, int) and n_args != spec.num_layers + len(noop):
        raise FormatError(
            f"{first.path}: args.num_layers is {n_args} but the HF config has {spec.num_layers} layers "
            f"(+{len(noop)} no-op); the config does not belong to this checkpoint"
        )
    want = {(t, p, e) for p in range(pp) for t, e in expert_rank_files(layout)}
    missing = sorted(want - set(ranks))
    if missing:
        t, p, e = missing[0]
        name = M.rank_dir(t, p, layout, e, ep)
        raise FormatError(
            f"{it_dir}: rank directory {name} is missing (args say TP={tp}, PP={pp}, EP={ep}); "
            f"the checkpoint is incomplete"
        )
    extra = sorted(set(ranks) - want)
    every_pair = {(t, p, e) for p in range(pp) for t in range(tp) for e in range(ep)}
    if extra and layout.expert_tp == 1 and set(ranks) == every_pair:
        # MindSpeed-LLM's deepseek4 writes every (TP, EP) pair with expert TP 1, though Megatron's
        # expert grid uses only some: the others hold copies, read and compared as replicas
        extra = []
    if extra:
        raise FormatError(
            f"{it_dir}: rank directories beyond TP={tp}, PP={pp}, EP={ep} from args (e.g. "
            f"{M.rank_dir(extra[0][0], extra[0][1], layout, extra[0][2], max(ep, 2))}); "
            f"the directory mixes layouts"
        )
    experts_per_rank = spec.num_experts // ep if spec.num_experts else 0
    slot_of = {(s.stage, s.chunk, s.local): s for s in layer_slots(spec, layout)}
    extra_state: dict[tuple, Any] = {}  # (layer, module key, expert, TP slot) -> stored value
    lay = optimizer_layout or {}
    opt_args = distopt.apply_overrides(args, lay.get("dp"), lay.get("bucket_size"))  # the run's true layout
    has_state = {f: os.path.isfile(os.path.join(os.path.dirname(f), M.DISTOPT_FILE)) for f in ranks.values()}
    carry = optimizer and any(has_state.values())
    lora_run = any(
        M.lora_parts(k) for ck in distopt.chunk_keys(first.obj) for k, _ in iter_tensors(first.obj[ck])
    )
    if carry and lora_run and weights_from != "master":
        # LoRA training keeps optimizer state for the adapters only (frozen base weights have none)
        carry = False
    if carry and not all(has_state.values()):
        lacking = next(f for f, ok in has_state.items() if not ok)
        raise FormatError(
            f"{os.path.dirname(lacking)}: no distrib_optim.pt although other rank directories have "
            f"one; the optimizer state is incomplete (use {setting('optimizer', False)} to convert the weights)"
        )
    # tensor set ("" = weights, else a state key) -> canonical name (layer/expert still local) -> {tp rank: expr}
    pieces: dict[str, dict[str | M.LocalName, dict[int, E.Expr]]] = defaultdict(lambda: defaultdict(dict))
    dropped: dict[str, str] = {}
    # replicated weights: (local canonical name, slot) -> rank directory, and further copies
    labels: dict[tuple[str | M.LocalName, int], str] = {}
    copies: dict[tuple[str | M.LocalName, int], list[tuple[str, E.Expr]]] = defaultdict(list)
    unknown: list[str] = []
    te_norms = te_fc1 = te_mla = mcore_mla = False
    gdn_seen: set[str] = set()  # whose gated-delta-net modules the keys are (keys.gdn_keys_of)
    mtp_keys: set[str] = set()  # which of the namings of multi-token prediction (keys.MTP_NAMES)
    # LoRA factor -> the naming of its keys (keys.LORA_NAMINGS)
    lora_namings: dict[str | M.LocalName, str] = {}
    opt_meta: dict[str, Any] = {}
    # a vision-language model: the naming its keys show, and its tower's keys (TP rank, stage,
    # chunk, rank directory, expression), lifted once every rank file is read
    namings: set[str] = set()
    tower: dict[str, list[tuple[int, int, int, str, E.Expr]]] = defaultdict(list)
    training: dict[str, Any] = {
        "rng_state": {},
        "source_layout": (tp, pp, ep),
        "args": megatron_args.all_args(first.obj.get("args")),
    }
    for (t, p, e), f in sorted(ranks.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        z = first if f == first.path else TorchZip(f)
        rel = os.path.relpath(f, path)
        if not isinstance(z.obj, dict):
            raise FormatError(f"{f}: not a Megatron checkpoint dict")
        it2 = z.obj.get("iteration")
        if it2 is not None and iteration != "release" and it2 != iteration:
            raise FormatError(
                f"{f}: iteration {it2}, but {said_by} is iteration {iteration}; the directory mixes iterations"
            )
        chunk_keys = distopt.chunk_keys(z.obj)
        if not chunk_keys:
            raise FormatError(f"{f}: no 'model' state dict in the rank file")
        state = None
        if weights_from == "master" or carry:
            state, opt_meta["dtype_key"] = distopt.read_state(f, z, opt_args, p, pp, align=lay.get("align"))
        for ck in chunk_keys:
            chunk = 0 if ck == "model" else int(ck[5:])
            sd = z.obj[ck]
            for key, ref in iter_tensors(sd):
                if key.endswith(M.EXTRA_STATE):
                    continue
                te_norms |= key.endswith((M.TE_QKV_NORM, M.GDN_TE_NORM))
                te_fc1 |= key.endswith(M.TE_FC1_NORM)
                gdn_seen.add(M.gdn_keys_of(key) or "")
                if key.startswith("mtp."):
                    mtp_keys.add(key)
                te_mla |= key.endswith(M.TE_MLA_NORM)  # megatron-core's MLA with Transformer Engine
                mcore_mla |= key.endswith(M.MCORE_MLA_MARK)
                # with experts, EP rank > 0 directories hold expert state only (their dense
                # tensors are replicas of EP rank 0's)
                master = None if state is None else state["param"].get((ck, key))
                values = {
                    "": master
                    if weights_from == "master" and master is not None
                    else z.load_expr(ref, f"{ck}.{key}")
                }
                if carry and state is not None and master is not None:
                    values.update({which: state[which][(ck, key)] for which in distopt.STATE_KEYS})
                at_key, at_stage = key, p
                if spec.vision is not None:
                    module, at_key, naming = multimodal.module_of(key, None)
                    namings.add(naming)
                    if module == "vision":
                        tower[key].append((t, p, chunk, os.path.dirname(rel), values[""]))
                        continue
                if no_args and (m := _NEGATIVE_LAYER.match(key)) is not None:
                    # MindSpeed-LLM's Mamba-2 converter at PP > 1 repeats earlier stages' layers
                    # under negative numbers: each one a copy of that layer, compared as such
                    at_stage, local = divmod(
                        p * (spec.num_layers // pp) + int(m.group(1)), spec.num_layers // pp
                    )
                    at_key = f"{M.LAYERS}{local}.{m.group(2)}"
                for set_name, value in values.items():
                    lifted = lift_rank_key(
                        at_key, value, spec, layout, tables, stage=at_stage, chunk=chunk, tp=t, ep=e
                    )
                    if lifted is None:
                        if any(fnmatch.fnmatch(key, pat) for pat in allow_unused):
                            dropped[f"{rel}:{ck}.{key}"] = f"matched {setting('allow_unused')}"
                        elif not set_name:
                            unknown.append(f"{ck}.{key} in {rel}")
                        continue
                    lora = M.lora_parts(at_key)
                    for canon, expr, slot in lifted:
                        if lora is not None:
                            lora_namings[canon] = lora[2]
                        if slot in pieces[set_name][canon]:
                            dropped[f"{rel}:{ck}.{key}"] = (
                                "replica of the same tensor in another EP rank's file"
                                if not no_args
                                else "MindSpeed-LLM's Mamba-2 PP output: a copy of what another stage holds (a replica)"
                            )
                            if not set_name:
                                copies[(canon, slot)].append((os.path.dirname(rel), expr))
                            continue
                        pieces[set_name][canon][slot] = expr
                        if not set_name:
                            labels[(canon, slot)] = os.path.dirname(rel)
            for key in sd if isinstance(sd, dict) else ():
                if key.endswith(M.EXTRA_STATE):
                    place = _extra_state_place(key, p, chunk, e, experts_per_rank, slot_of)
                    if place is None:
                        dropped[f"{rel}:{ck}.{key}"] = "Transformer-Engine _extra_state (FP8 metadata)"
                    else:
                        slot = 0 if place[2] is not None and layout.expert_tp == 1 else t
                        extra_state.setdefault((*place, slot), with_exprs(sd[key], z, f"{ck}.{key}"))
        # training state besides the optimizer's travels whether or not the optimizer state does
        training["rng_state"][(t, p, e)] = with_exprs(z.obj.get("rng_state"), z, "rng_state")
        if f == first.path:
            for key in ("opt_param_scheduler", "num_floating_point_operations_so_far"):
                training[key] = with_exprs(z.obj.get(key), z, key)
        if carry:
            if f == first.path:
                opt_meta["optimizer"] = with_exprs(z.obj.get("optimizer"), z, "optimizer")
            continue
        if z.obj.get("optimizer") is not None:
            dropped[f"{rel}:optimizer"] = (
                "optimizer settings: carried only with the distributed-optimizer state to a Megatron target"
            )
        if has_state[f] and weights_from != "master":
            dropped[os.path.join(os.path.dirname(rel), M.DISTOPT_FILE)] = (
                "distributed-optimizer state of LoRA adapters: not carried (ckpt-ir carries full-model state)"
                if lora_run and optimizer
                else "distributed-optimizer state (fp32 masters, Adam moments): carried only to a Megatron target; "
                "the model weights come from model_optim_rng.pt"
            )
    norm_names = lift_tail.norm_names(te_norms, te_fc1 or te_mla)

    def rule_of(name: str) -> Split | None:  # megatron-core's local MLA spec splits more over TP
        return M.mcore_split(name, norm_names, spec) if mcore_mla else split_rule(name, spec)

    lora_keys = _lora_keys(lora_namings, it_dir)
    joined = {c for c in lora_namings if M.LORA_NAMINGS[lora_keys].whole_dim is not None}
    for canon, shards in pieces[""].items():  # TP replicas of tensors no rule splits
        name = _resolve_layer(canon, slot_of, path, spec.num_layers)
        if canon in joined:
            continue
        if rule_of(name) is None or (layout.expert_tp if is_expert(name) else layout.tp) == 1:
            copies[(canon, 0)][:0] = [(labels[(canon, r)], x) for r, x in sorted(shards.items()) if r > 0]
    notes = check_replicas(
        {
            _resolve_layer(c, slot_of, path, spec.num_layers) + (f" (TP shard {t})" if t else ""): [
                (labels[(c, t)], pieces[""][c][t]),
                *more,
            ]
            for (c, t), more in copies.items()
            if more
        },
        replicas,
        it_dir,
    )
    sets = {
        name: _assemble(
            set_pieces, slot_of, spec, layout, path, rule_of, dropped if not name else {}, joined, lora_keys
        )
        for name, set_pieces in pieces.items()
    }
    tensors = sets.pop("", {})
    if spec.vision is not None:
        naming = multimodal.check_naming(namings, it_dir)
        layout = multimodal.read_layout(layout, naming, spec)
        tower_tensors, tower_copies, tower_unknown = multimodal.lift_tower(
            tower, spec, layout, it_dir, dropped
        )
        check_replicas(tower_copies, replicas, it_dir)
        for key in tower_unknown:
            if any(fnmatch.fnmatch(key, pat) for pat in allow_unused):
                dropped[key] = f"matched {setting('allow_unused')}"
            else:
                unknown.append(key)
        tensors.update(tower_tensors)
    if mcore_mla:  # the down-projections as the Megatron layout's fused attn.qkv_a
        for s in (tensors, *sets.values()):
            lift_tail.fuse_mla(spec, s)
    lift_tail.complete_tensors(spec, tensors, sets, dropped)
    layout = attrs.evolve(
        layout,
        norm_names=norm_names,
        mla_keys="mcore" if mcore_mla else "mindspeed",
        gdn_keys=M.gdn_keys_seen(spec, gdn_seen, layout.gdn_keys, it_dir),
        lora_keys=lora_keys,
    )
    if lora_keys == "bridge" and args.get("lora_alpha") is None:
        alpha = lift_tail.bridge_lora_alpha(it_dir)
        if alpha is not None:
            args = {**args, "lora_alpha": alpha}
    if hf_config is not None:
        lift_tail.check_config_fits(config_name, path, spec, layout, tensors, unknown)
    if unknown:
        raise lift_tail.unknown_tensors(unknown)
    meta: dict[str, Any] = {
        "iteration": iteration if iteration != "release" else 1,
        "args": args,
        "training": training,
    }
    if inferred:
        meta["family_from_args"] = inferred
    if extra_state:
        meta["extra_state"] = {"layout": M.extra_state_layout(spec, layout), "entries": extra_state}
    if notes:
        meta["notes"] = notes
    if spec.mtp_layers:  # a Megatron target keeps it unless the target names a Megatron-Core release
        meta["mtp_names"] = M.mtp_naming(mtp_keys).name
    if sets:
        meta["optimizer"] = {**opt_meta, "source_layout": (tp, pp, ep), **distopt.training_args(opt_args)}
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


def lift_rank_key(
    key: str,
    value: E.Expr,
    spec: ModelSpec,
    layout: Layout,
    tables: tuple[NameTable, ...],
    *,
    stage: int,
    chunk: int,
    tp: int,
    ep: int,
) -> list[tuple[str | M.LocalName, E.Expr, int]] | None:
    """[(canonical name with its layer still local, expression, TP slot)] for the key ``key`` of
    model chunk ``chunk`` in the rank file of (``tp``, ``stage``, ``ep``), or None when the key
    means nothing to us.  Experts with expert TP = 1 are whole: their slot is 0."""
    if key == M.EMBEDDING and stage == layout.pp - 1 and layout.pp > 1 and spec.mtp_layers:
        lifted: list[tuple[str | M.LocalName, E.Expr, bool]] | None = [
            (M.LocalName("mtp.embed.weight", 0, mtp=True), value, False)
        ]
    else:
        experts_per_rank = spec.num_experts // layout.ep if spec.num_experts else 0
        lifted = _lift_key(key, value, stage, chunk, ep, experts_per_rank, tables)
    if lifted is None:
        return None
    return [(canon, expr, 0 if is_exp and layout.expert_tp == 1 else tp) for canon, expr, is_exp in lifted]


def lift_state_dicts(
    ranks: dict[tuple[int, int, int], list[dict[str, E.Expr]]],
    spec: ModelSpec,
    layout: Layout,
    *,
    where: str,
    args: dict[str, Any],
    cfg: dict[str, Any] | None,
    meta: dict[str, Any] | None = None,
) -> Checkpoint:
    """The Checkpoint of a Megatron model given as state dicts of expressions, as :func:`lift`
    reads them from rank files: ``ranks`` maps (TP rank, stage, EP rank) to the state dict of
    each of its model chunks (key -> expression; the tensors may live anywhere, e.g. in a training
    job's memory, see :mod:`ckpt_ir.live`).  ``layout`` gives the parallel sizes and placement
    (its norm naming is read off the keys); a key no table knows is a CoverageError naming it
    (``where`` says whose it is).  Replicas (dense tensors in every EP rank's state dict, TP
    replicas of whole tensors) are taken from the first rank holding them."""
    tables = M.read_tables(spec)
    layout = attrs.evolve(layout, gdn_keys=M.gdn_keys_from_args(spec, args, layout.tp))
    slot_of = {(s.stage, s.chunk, s.local): s for s in layer_slots(spec, layout)}
    pieces: dict[str | M.LocalName, dict[int, E.Expr]] = defaultdict(dict)
    unknown: list[str] = []
    te_norms = te_fc1 = False
    gdn_seen: set[str] = set()
    lora_namings: dict[str | M.LocalName, str] = {}  # as in lift
    for (t, p, e), chunks in sorted(ranks.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        for chunk, sd in enumerate(chunks):
            for key, value in sd.items():
                te_norms |= key.endswith((M.TE_QKV_NORM, M.GDN_TE_NORM))
                te_fc1 |= key.endswith(M.TE_FC1_NORM)
                gdn_seen.add(M.gdn_keys_of(key) or "")
                lifted = lift_rank_key(key, value, spec, layout, tables, stage=p, chunk=chunk, tp=t, ep=e)
                if lifted is None:
                    unknown.append(f"{key} (TP {t}, stage {p}, EP {e}, chunk {chunk})")
                lora = M.lora_parts(key)
                for canon, expr, slot in lifted or ():
                    pieces[canon].setdefault(slot, expr)
                    if lora is not None:
                        lora_namings[canon] = lora[2]
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
        raise CoverageError(
            f"{where}: {len(unknown)} tensor(s) have no known Megatron meaning and would be lost: {shown}; "
            f"ckpt-ir has no table for these modules (docs/live.md lists the megatron-core modules it reads)"
        )
    dropped: dict[str, str] = {}
    lora_keys = _lora_keys(lora_namings, where)
    tensors = _assemble(
        pieces,
        slot_of,
        spec,
        layout,
        where,
        lambda n: split_rule(n, spec),
        dropped,
        set(lora_namings),
        lora_keys,
    )
    lift_tail.complete_tensors(spec, tensors, {}, dropped)
    layout = attrs.evolve(
        layout,
        norm_names=lift_tail.norm_names(te_norms, te_fc1),
        gdn_keys=M.gdn_keys_seen(spec, gdn_seen, layout.gdn_keys, where),
        lora_keys=lora_keys,
    )
    return lift_tail.checkpoint(
        where,
        spec,
        layout,
        tensors,
        {},
        args=args,
        cfg=cfg,
        dropped=dropped,
        meta=dict(meta or {}),
        iteration_dir=None,
    )


REPLICA_MODES = ("check", "check-all", "take-rank0")
REPLICA_CHECK_BYTES = 1 << 20  # replicas up to this size (norms, routers, biases) are always compared


def check_replicas(copies: dict[str, list[tuple[str, E.Expr]]], mode: str, where: str) -> list[str]:
    """Compare the copies of each replicated tensor (name -> [(rank directory, expression)], the
    one kept first) by a hash of their bytes: ``check`` those up to REPLICA_CHECK_BYTES,
    ``check-all`` every one; ``take-rank0`` compares nothing and returns the note to record.
    Copies that differ (training drifted) are an error naming the tensor and the ranks."""
    if mode == "take-rank0":
        return (
            [
                f"replicated tensors ({len(copies)}) taken from the first rank holding them without comparing the "
                f"other ranks' copies ({setting('replicas', 'take-rank0')})"
            ]
            if copies
            else []
        )
    import hashlib

    with E.Reader() as reader:

        def digest(x: E.Expr) -> bytes:
            return hashlib.sha256(E.evaluate_raw(x, reader).tobytes()).digest()

        for name, versions in copies.items():
            (first, kept), *others = versions
            if mode == "check" and kept.nbytes > REPLICA_CHECK_BYTES:
                continue
            want = digest(kept)
            for label, x in others:
                if x.shape != kept.shape or x.dtype != kept.dtype or digest(x) != want:
                    raise FormatError(
                        f"{where}: replicated tensor {name} differs between {first} and {label} (the "
                        f"ranks drifted apart); pass {setting('replicas', 'take-rank0')} to keep {first}'s copy on "
                        f"purpose"
                    )
    return []


def _assemble(
    pieces: dict[str | M.LocalName, dict[int, E.Expr]],
    slot_of: dict,
    spec: ModelSpec,
    layout: Layout,
    path: str,
    rule_of: Callable[[str], Split | None],
    dropped: dict[str, str],
    joined: Collection[str | M.LocalName] = (),
    lora_keys: str = "mindspeed",
) -> dict[str, TensorNode]:
    """Tensor nodes from the per-TP-rank pieces of one tensor set (model layers resolved), each
    split over TP by ``rule_of`` its name; LoRA factors in ``joined`` that the IR keeps whole are
    joined from the TP shards naming ``lora_keys`` splits them into (``LoraNaming.whole_dim``)."""
    tensors: dict[str, TensorNode] = {}
    for canon_local, shards in pieces.items():
        name = _resolve_layer(canon_local, slot_of, path, spec.num_layers)
        if name in tensors:
            raise FormatError(
                f"{path}: tensor {name} appears twice (check num_layer_list / noop_layers in args)"
            )
        rule = rule_of(name)
        n = layout.expert_tp if is_expert(name) else layout.tp
        dim = M.LORA_NAMINGS[lora_keys].whole_dim
        if canon_local in joined and rule is None and n > 1 and dim is not None:
            if sorted(shards) != list(range(n)):
                raise FormatError(
                    f"{path}: LoRA factor {name} is missing on TP rank(s) {sorted(set(range(n)) - set(shards))}; "
                    f"{lora_keys} LoRA splits it over TP"
                )
            tensors[name] = TensorNode.whole(
                name, gather_exprs(tuple(shards[r] for r in range(n)), Split(dim))
            )
            continue
        if rule is None or n == 1:
            tensors[name] = TensorNode.whole(name, shards[0])
            for r in range(1, layout.tp):
                if r in shards:
                    dropped[f"{name}@tp{r}"] = "replica of TP rank 0 (replicated tensor)"
            continue
        if sorted(shards) != list(range(n)):
            raise FormatError(
                f"{path}: tensor {name} is missing on TP rank(s) {sorted(set(range(n)) - set(shards))}"
            )
        tensors[name] = TensorNode(name, tuple(shards[r] for r in range(n)), rule)
    return tensors


_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def _extra_state_place(key: str, stage: int, chunk: int, ep: int, experts_per_rank: int, slot_of: dict):
    """(model layer or None, module key with the layer number left out, global expert or None) of
    an ``_extra_state`` key, or None for one ckpt-ir does not place (MTP, no-op layers)."""
    m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", key)
    if m is None:
        return None if key.startswith("mtp.") else (None, key, None)
    slot = slot_of.get((stage, chunk, int(m.group(1))))
    if slot is None or slot.real is None:
        return None
    x = _LOCAL_EXPERT.match(m.group(2))
    if x:
        return (
            slot.real,
            "mlp.experts.local_experts.{e}." + x.group(2),
            ep * experts_per_rank + int(x.group(1)),
        )
    return slot.real, m.group(2), None


_NEGATIVE_LAYER = re.compile(r"^decoder\.layers\.(-\d+)\.(.+)$")


def _lora_keys(namings: dict[str | M.LocalName, str], where: str) -> str:
    """The one naming of a checkpoint's LoRA factor keys (keys.LORA_NAMINGS; mindspeed where none)."""
    seen = sorted(set(namings.values()))
    if len(seen) > 1:
        raise FormatError(
            f"{where}: LoRA factors named both ways ({' and '.join(seen)}: keys.LORA_NAMINGS); "
            f"the rank files do not belong together"
        )
    return seen[0] if seen else "mindspeed"


def _mm_layout(
    found: dict[tuple[int, int | None, int | None], str], spec: ModelSpec, tp: int, pp: int, first: TorchZip
) -> dict[str, Any]:
    """The layout of a vision-language model's rank files without args (MindSpeed-MM's): each
    module's layer counts per stage and chunk read off TP rank 0's keys, the tower's TP size off
    the width of its attention output projection, a padded vocabulary off the embedding's rows."""
    keys: dict[tuple[int, int], list[str]] = {}
    width: tuple[int, int] | None = None
    rows = spec.vocab_size
    vision_spec = spec.vision
    assert vision_spec is not None
    held: list[list] = []  # [(key, tensor reference)] of each chunk
    for (t, p, _), f in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        if t:
            continue
        z = first if f == first.path else TorchZip(f)
        for ck in distopt.chunk_keys(z.obj):
            refs = list(iter_tensors(z.obj[ck]))
            keys[(p or 0, 0 if ck == "model" else int(ck[5:]))] = [k for k, _ in refs]
            held.append(refs)
            if refs and not any(k.startswith((mindspeed_mm.IMAGE, mindspeed_mm.TEXT)) for k, _ in refs):
                raise FormatError(
                    f"{f}: a rank file without args whose keys are not MindSpeed-MM's (text_decoder.*, "
                    f"image_encoder.*); ckpt-ir reads a vision-language model's files without args in that "
                    f"layout only"
                )
    # MindSpeed-MM's default or canonical layout, as the keys say
    naming = mindspeed_mm.naming_of(k for names in keys.values() for k in names)
    canonical = naming == mindspeed_mm.CANONICAL
    tower = mindspeed_mm.tower_names(spec, naming)
    layer_table = mindspeed_mm.layer_table(vision_spec, tower)
    for refs in held:
        for k, ref in refs:
            canon = layer_table.to_canonical(k) or ""
            if width is None and not mindspeed_mm.is_whole(spec, k, naming):
                # a TP-split tensor's columns: the attention's output, or the MLP's (GLM-4.1V
                # keeps its attention whole)
                if canon.endswith(".attn.o.weight"):
                    width = (ref.shape[1], vision_spec.q_size)
                elif canon.endswith(".mlp.down.weight"):
                    width = (ref.shape[1], vision_spec.ffn_hidden_size)
            if k == mindspeed_mm.TEXT + M.EMBEDDING:
                rows = ref.shape[0] * tp
    text, vision = mindspeed_mm.scan_counts(keys, pp, spec)
    return {
        "mm_keys": naming,
        # the canonical layout keeps the language model's q / k / v and gate / up apart
        "fused_qkv": not canonical,
        "fused_gate_up": not canonical,
        "num_layer_list": tuple(text),
        "vision_layer_list": tuple(vision),
        "vision_tp": tp if width is not None and width[0] != width[1] else 1,
        "vision_fused": not tower.packed,  # packed keys: unpacked on lift
        "padded_vocab": rows if rows > spec.vocab_size else None,  # padded to split over TP
    }


def _mindspeed_mm_keys(z: TorchZip) -> bool:
    """Whether a rank file holds a vision-language model under MindSpeed-MM's names (files without
    args, whose model ckpt-ir reads from the hf/ folder it writes beside them)."""
    prefixes = (mindspeed_mm.TEXT, mindspeed_mm.IMAGE)
    return any(k.startswith(prefixes) for ck in distopt.chunk_keys(z.obj) for k, _ in iter_tensors(z.obj[ck]))


def _json_object(path: str) -> dict[str, Any]:
    import json

    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: not a JSON object")
    return obj


def _mm_expert_ranks(
    found: dict[tuple[int, int | None, int | None], str],
) -> dict[tuple[int, int | None, int | None], str]:
    """MindSpeed-MM's rank directories with (TP, PP, EP) read right: it names them
    ``mp_rank_TT[_PPP][_EEE]`` (``_PPP`` only with PP > 1, ``_EEE`` only with EP > 1: its
    hf_to_mm.py:168-195), so ``mp_rank_TT_XXX`` is a pipeline stage or an expert-parallel rank.
    Every EP rank holds the language model's embedding, one pipeline stage only: XXX is an EP rank
    where every such file holds it."""
    if len(found) < 2 or any(e is not None for _, _, e in found) or all(p is None for _, p, _ in found):
        return found
    key = mindspeed_mm.TEXT + M.EMBEDDING

    def holds(f: str) -> bool:
        obj = TorchZip(f).obj
        return any(k == key for ck in distopt.chunk_keys(obj) for k, _ in iter_tensors(obj[ck]))

    if not all(holds(f) for f in found.values()):
        return found
    return {(t, None, p): f for (t, p, _), f in found.items()}


def _no_args(
    found: dict[tuple[int, int | None, int | None], str],
    hf_config: dict[str, Any] | None,
    where: str,
    mm: bool = False,
) -> dict[str, Any]:
    """The layout args of rank files that carry none (MindSpeed-LLM's Mamba-2 converter writes only
    ``model``, ``checkpoint_version`` and ``iteration``): TP and PP from the directory names
    (``mp_rank_TT`` or ``mp_rank_TT_PPP``; such files have no expert parallelism, but
    MindSpeed-MM's, ``mm``, may: ``mp_rank_TT[_PPP]_EEE``), layers split evenly; the model from
    ``hf_config``."""
    if hf_config is None:
        raise FormatError(
            f"{where}: the rank file has no 'args' (MindSpeed-LLM's Mamba-2 converter and megatron-core's "
            "own saves write none); "
            f"pass {setting('hf_config', metavar='DIR')} (the model's HF config.json) to say what model it holds"
        )
    if any(e is not None for _, _, e in found) and not mm:
        raise FormatError(
            f"{where}: the rank file has no 'args', and directories named mp_rank_TT_PPP_EEE need them "
            "to tell the expert-parallel layout"
        )
    return {
        "tensor_model_parallel_size": 1 + max(t for t, _, _ in found),
        "pipeline_model_parallel_size": 1 + max(p or 0 for _, p, _ in found),
        "expert_model_parallel_size": 1 + max(e or 0 for _, _, e in found),
    }


def _hybrid_stages(args: dict[str, Any], pp: int, where: str) -> tuple[int, ...] | None:
    """A Megatron hybrid model's uneven pipeline stages, as Megatron-LM's args give them."""
    a = megatron_args.Args(args, where)
    return a.hybrid_stages(pp) if a.hybrid else None


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _lift_key(
    key: str,
    expr: E.Expr,
    stage: int,
    chunk: int,
    ep: int,
    experts_per_rank: int,
    tables: tuple[NameTable, ...],
) -> list[tuple[str | M.LocalName, E.Expr, bool]] | None:
    """[(canonical name with its layer still local, expression, is_expert)] for one stored key,
    or None if the key means nothing to us.  Expert indices become global here; a grouped-GEMM
    weight yields one entry per local expert; layers stay local (:class:`~ckpt_ir.megatron.keys.LocalName`)."""
    if key == M.MTP_FINAL_NORM:
        return [("final_norm.weight", expr, False)]
    m = M.MTP_LAYER_KEY.match(key)
    if m:
        k = m.group(1)
        inner = _lift_key(f"{M.LAYERS}{k}.{m.group(3)}", expr, stage, chunk, ep, experts_per_rank, tables)
        if inner is None:
            return None
        mtp: list[tuple[str | M.LocalName, E.Expr, bool]] = []
        for c, x, is_e in inner:
            assert isinstance(c, M.LocalName)  # a decoder.layers.<k>. key always lifts to a layer's name
            mtp.append((M.LocalName(c.rest, int(k), mtp=True), x, is_e))
        return mtp
    for template, mtp_canon in M.MTP_READ:
        mm = re.match("^" + re.escape(template).replace(re.escape("{k}"), r"(\d+)") + "$", key)
        if mm:
            return [(M.LocalName(mtp_canon, int(mm.group(1)), mtp=True), expr, False)]
    m = M.GROUPED_KEY.match(key)
    if m:
        local_layer, kind = m.group(1), m.group(2)
        out: list[tuple[str | M.LocalName, E.Expr, bool]] = []
        for j, e_expr in enumerate(M.ungroup_experts(kind, expr, experts_per_rank)):
            role = M.GROUPED[kind]
            out.append(
                (
                    M.LocalName(
                        f"mlp.experts.{ep * experts_per_rank + j}.{role}.weight",
                        int(local_layer),
                        stage,
                        chunk,
                    ),
                    e_expr,
                    True,
                )
            )
        return out
    canon = M.canonical_key(key, stage, chunk, tables)
    if canon is None:
        return None
    name, is_expert_tensor = M.with_global_expert(canon, ep * experts_per_rank)
    return [(name, expr, is_expert_tensor)]


def _resolve_layer(name: str | M.LocalName, slot_of: dict, path: str, main_layers: int) -> str:
    return name if isinstance(name, str) else name.resolve(slot_of, main_layers, path)
