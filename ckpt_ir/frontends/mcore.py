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
from typing import Any

import attrs

from ckpt_ir import mcore_distopt as distopt
from ckpt_ir import mcore_format as M
from ckpt_ir.errors import CoverageError, FormatError, option
from ckpt_ir.families import by_name, for_hf_config
from ckpt_ir.frontends.hf import MCORE_HF_DIR, side_files
from ckpt_ir.io.torchzip import TorchZip, iter_tensors, with_exprs
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode
from ckpt_ir.ir.layout import Layout, expert_rank_files, layer_slots
from ckpt_ir.ir.names import is_expert, is_lora
from ckpt_ir.ir.roles import canonical_order, split_rule


def detect(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")):
        return True
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(n.startswith("iter_") or n == "release" or M.RANK_DIR.match(n) for n in names)


class _Args:
    """Typed access to Megatron ``args``: every bad value is a FormatError naming the file and key."""

    def __init__(self, args: dict[str, Any], where: str) -> None:
        self.args, self.where = args, where

    def size(self, key: str, default: int | None = 1, limit: int = 1 << 16) -> int | None:
        v = self.args.get(key)
        if v is None:
            return default
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
            raise FormatError(f"{self.where}: args.{key} must be an integer from 1 to {limit}, got {v!r}")
        return v

    def layers(self, key: str) -> tuple[int, ...] | None:
        v = self.args.get(key)
        if v in (None, False, ""):
            return None
        try:
            out = M.int_list(v)
        except (ValueError, TypeError):
            out = None
            bad = True
        else:
            bad = out is None or any(i < 0 for i in out)
        if bad:
            raise FormatError(f"{self.where}: args.{key} must list layer numbers like '2,6', got {v!r}")
        return out


def spec_from_args(
    args: dict[str, Any],
    hf_config: dict[str, Any] | None,
    where: str,
    family: str | None = None,
    config_name: str | None = None,
):
    """(ModelSpec, HF config, why) of a Megatron checkpoint from its ``args``: from ``hf_config``
    (named ``config_name`` in errors) when given, from the HF config ckpt-ir or MindSpeed-LLM
    copied into the args, else (plain Megatron-LM args) for ``family`` or the family inferred from
    the args (``why`` says which and why; None when nothing was inferred)."""
    from ckpt_ir.families import infer

    a = _Args(args, where)
    named = args.get("ckpt_ir_family") or args.get("model_type_hf")
    why = None
    if hf_config is None and infer.MEGATRON.name in (family, named):
        spec, cfg = infer.megatron_spec(args, where), None
        why = "family megatron (Megatron targets only): the model is described by its args alone"
    elif hf_config is not None:
        cfg, fam = hf_config, for_hf_config(hf_config, config_name or option("hf_config"))
    elif (
        named
        or args.get("ckpt_ir_hf_config") is not None
        or args.get("model_type")
        or args.get("architectures")
    ):
        try:  # an HF config ckpt-ir or MindSpeed-LLM copied into the args
            cfg = M.hf_config_from_args(args)
        except ValueError as e:
            raise FormatError(f"{where}: {e}") from None
        fam = by_name(named) if named else for_hf_config(cfg, where)
    elif family:
        fam = by_name(family)
        cfg = infer.hf_config_for(fam, args, where)
        why = f"family {fam.name} ({option('family')}); HF config built from args"
    else:
        try:
            fam, cfg, why = infer.infer(args, where)
        except infer.NoFamily as e:
            # resharding needs no HF family: the args describe every tensor Megatron wrote
            spec, cfg, why = infer.megatron_spec(args, where), None, infer.args_only(e.detail)
    if cfg is not None:
        spec = fam.spec_from_config(cfg, where=f"{where} (args)")
    if args.get("mtp_num_layers") is not None:
        spec = _evolve(spec, mtp_layers=a.size("mtp_num_layers", 0, 64) if args["mtp_num_layers"] else 0)
    return spec, cfg, why


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
) -> Checkpoint:
    """``hf_config`` describes the model instead of the args (``config_name`` names it in errors;
    it must describe the tensors, see :func:`check_config_fits`).
    ``family``: the model family when the args do not say (default: inferred from them).
    ``weights_from="master"`` takes every parameter from the distributed optimizer's fp32 master
    copy (``distrib_optim.pt``) instead of the model's (e.g. bf16) weights.  ``optimizer=True``
    also lifts the distributed-optimizer state (when the checkpoint has it) into ``states``.
    ``optimizer_layout`` corrects what args say about that state's layout: ``dp``, ``bucket_size``
    (0: one bucket) and ``align`` (elements each parameter starts on a multiple of).
    ``replicas``: how copies of a replicated tensor in several rank files are treated, see
    :func:`check_replicas`."""
    if replicas not in REPLICA_MODES:
        raise ValueError(f"replicas={replicas!r}: choose one of {', '.join(REPLICA_MODES)}")
    it_dir, iteration = M.iteration_dir(path)
    found: dict[tuple[int, int | None, int | None], str] = {}
    for n in sorted(os.listdir(it_dir)):
        m = M.RANK_DIR.match(n)
        if not m:
            continue
        f = os.path.join(it_dir, n, "model_optim_rng.pt")
        if not os.path.isfile(f):
            raise FormatError(f"{os.path.join(it_dir, n)}: rank directory has no model_optim_rng.pt")
        found[(int(m.group(1)), _int(m.group(2)), _int(m.group(3)))] = f
    if not found:
        raise FormatError(f"{it_dir}: no mp_rank_* directories")
    first = TorchZip(found[min(found, key=lambda k: (k[0], k[1] or 0, k[2] or 0))])
    if not isinstance(first.obj, dict):
        raise FormatError(f"{first.path}: not a Megatron checkpoint dict")
    args = M.args_dict(first.obj.get("args"), first.path)
    a = _Args(args, first.path)
    tp = a.size("tensor_model_parallel_size")
    pp = a.size("pipeline_model_parallel_size")
    ep = a.size("expert_model_parallel_size")
    etp_arg = a.size("expert_tensor_parallel_size", None)
    etp = None if etp_arg in (None, tp) else etp_arg
    if tp * pp * ep > 4 * len(found):  # args claim far more ranks than there are directories
        raise FormatError(
            f"{it_dir}: args say TP={tp}, PP={pp}, EP={ep} but only {len(found)} rank "
            f"directories exist; the checkpoint is incomplete or its args are wrong"
        )
    spec, cfg, inferred = spec_from_args(args, hf_config, first.path, family, config_name)
    tables = M.read_tables(spec)
    noop = a.layers("noop_layers") or ()
    layout = Layout(
        format="mcore",
        tp=tp,
        pp=pp,
        vpp_layers=a.size("num_layers_per_virtual_pipeline_stage", None),
        num_layer_list=a.layers("num_layer_list"),
        noop_layers=noop,
        fused_qkv=True,
        fused_gate_up=True,
        ep=ep,
        etp=etp,
        grouped_gemm=bool(args.get("moe_grouped_gemm")) and spec.num_experts > 0,
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
    has_state = {
        f: os.path.isfile(os.path.join(os.path.dirname(f), "distrib_optim.pt")) for f in ranks.values()
    }
    carry = optimizer and any(has_state.values())
    lora_run = any(
        M.LORA_KEY.match(k) for ck in distopt.chunk_keys(first.obj) for k, _ in iter_tensors(first.obj[ck])
    )
    if carry and lora_run and weights_from != "master":
        # LoRA training keeps optimizer state for the adapters only (frozen base weights have none)
        carry = False
    if carry and not all(has_state.values()):
        lacking = next(f for f, ok in has_state.items() if not ok)
        raise FormatError(
            f"{os.path.dirname(lacking)}: no distrib_optim.pt although other rank directories have "
            f"one; the optimizer state is incomplete (use {option('optimizer', False)} to convert the weights)"
        )
    # tensor set ("" = weights, else a state key) -> canonical name (layer/expert still local) -> {tp rank: expr}
    pieces: dict[str, dict[str, dict[int, E.Expr]]] = defaultdict(lambda: defaultdict(dict))
    dropped: dict[str, str] = {}
    # replicated weights: (local canonical name, slot) -> rank directory, and further copies
    labels: dict[tuple[str, int], str] = {}
    copies: dict[tuple[str, int], list[tuple[str, E.Expr]]] = defaultdict(list)
    unknown: list[str] = []
    te_norms = te_fc1 = False
    opt_meta: dict[str, Any] = {}
    training: dict[str, Any] = {
        "rng_state": {},
        "source_layout": (tp, pp, ep),
        "args": M.all_args(first.obj.get("args")),
    }
    for (t, p, e), f in sorted(ranks.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        z = first if f == first.path else TorchZip(f)
        rel = os.path.relpath(f, path)
        if not isinstance(z.obj, dict):
            raise FormatError(f"{f}: not a Megatron checkpoint dict")
        it2 = z.obj.get("iteration")
        if it2 is not None and iteration != "release" and it2 != iteration:
            raise FormatError(
                f"{f}: iteration {it2} but the tracker says {iteration}; the directory mixes iterations"
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
                te_norms |= key.endswith("linear_qkv.layer_norm_weight")
                te_fc1 |= key.endswith("linear_fc1.layer_norm_weight")
                # with experts, EP rank > 0 directories hold expert state only (their dense
                # tensors are replicas of EP rank 0's)
                has = state is not None and (ck, key) in state["param"]
                values = {
                    "": state["param"][(ck, key)]
                    if weights_from == "master" and has
                    else z.load_expr(ref, f"{ck}.{key}")
                }
                if carry and has:
                    values.update({which: state[which][(ck, key)] for which in distopt.STATE_KEYS})
                for set_name, value in values.items():
                    if (
                        key == "embedding.word_embeddings.weight"
                        and p == pp - 1
                        and pp > 1
                        and spec.mtp_layers
                    ):
                        found = [(M.LocalName("mtp.embed.weight", 0, mtp=True), value, False)]
                    else:
                        found = _lift_key(key, value, p, chunk, e, experts_per_rank, tables)
                    if found is None:
                        if any(fnmatch.fnmatch(key, pat) for pat in allow_unused):
                            dropped[f"{rel}:{ck}.{key}"] = f"matched {option('allow_unused')}"
                        elif not set_name:
                            unknown.append(f"{ck}.{key} in {rel}")
                        continue
                    for canon, expr, is_exp in found:
                        # experts with expert TP = 1 are whole: they count as TP rank 0
                        slot = 0 if is_exp and layout.expert_tp == 1 else t
                        if slot in pieces[set_name][canon]:
                            dropped[f"{rel}:{ck}.{key}"] = (
                                "replica of the same tensor in another EP rank's file"
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
            dropped[os.path.join(os.path.dirname(rel), "distrib_optim.pt")] = (
                "distributed-optimizer state of LoRA adapters: not carried (ckpt-ir carries full-model state)"
                if lora_run and optimizer
                else "distributed-optimizer state (fp32 masters, Adam moments): carried only to a Megatron target; "
                "the model weights come from model_optim_rng.pt"
            )
    for canon, shards in pieces[""].items():  # TP replicas of tensors no rule splits
        name = _resolve_layer(canon, slot_of, path, spec.num_layers)
        if split_rule(name) is None or (layout.expert_tp if is_expert(name) else layout.tp) == 1:
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
        name: _assemble(set_pieces, slot_of, spec, layout, path, dropped if not name else {})
        for name, set_pieces in pieces.items()
    }
    tensors = sets.pop("", {})
    if spec.tied_embeddings and "lm_head.weight" in tensors:
        dropped["output_layer.weight"] = "copy of the tied embedding on the last pipeline stage"
    for s_tensors in (tensors, *sets.values()):
        add_mtp_copies(spec, s_tensors)
        if spec.tied_embeddings:
            s_tensors.pop("lm_head.weight", None)
    if "embed.weight" in tensors:
        rows = tensors["embed.weight"].shape[0]
        if rows != spec.vocab_size:
            layout = _evolve(layout, padded_vocab=rows)
    if hf_config is not None:
        check_config_fits(config_name, path, spec, layout, tensors, unknown)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise CoverageError(
            f"{len(unknown)} Megatron tensor(s) have no known meaning and would be lost: {shown}; "
            f"pass {option('allow_unused', metavar='PATTERN')} to drop them on purpose"
        )
    weights = [t for n, t in tensors.items() if not is_lora(n)]
    spec = _evolve(spec, dtype=weights[0].dtype if weights else spec.dtype)
    lora_a = [t for n, t in tensors.items() if n.endswith(".lora_a.weight")]
    if lora_a:
        alpha = args.get("lora_alpha")
        spec = _evolve(
            spec, lora_rank=lora_a[0].shape[0], lora_alpha=float(alpha) if alpha is not None else None
        )
    layout = _evolve(layout, norm_names="te" if te_fc1 else "te-input" if te_norms else "local")
    ordered = dict(sorted(tensors.items(), key=lambda kv: canonical_order(kv[0])))
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
    if sets:
        meta["optimizer"] = {**opt_meta, "source_layout": (tp, pp, ep), **distopt.training_args(opt_args)}
    return Checkpoint(
        spec=spec,
        layout=layout,
        tensors=ordered,
        dropped=dropped,
        hf_config=cfg,
        source=path,
        aux_files=side_files(os.path.join(path, MCORE_HF_DIR), config=True),
        meta=meta,
        states={k: {n: v[n] for n in ordered if n in v} for k, v in sets.items()},
    )


def check_config_fits(
    config_name: str | None,
    path: str,
    spec,
    layout: Layout,
    tensors: dict[str, TensorNode],
    unknown: list[str],
) -> None:
    """An HF config given for a Megatron checkpoint (``--hf-config``) must describe its tensors: a
    tensor the config's model has no place for (``unknown``: Megatron keys no rule of the family
    maps), one it needs that the checkpoint lacks, or a shape they disagree on is a one-line error
    naming the config and the first disagreement (not "incomplete", nor a hint to drop tensors,
    nor tensors written beside a config that leaves them out)."""
    from ckpt_ir.ir.roles import expected_names, expected_shape

    model = f"a {spec.family} model as the config describes it"
    expected = expected_names(spec, layout)
    weights = {n for n in tensors if not is_lora(n)}
    extra = unknown or sorted(weights - expected, key=canonical_order)
    missing = sorted(expected - weights, key=canonical_order)
    what = None
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        what = f"the checkpoint holds {extra[0]}{more}, which {model} has no place for"
    elif missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        what = f"{model} has {missing[0]}{more}, which the checkpoint lacks"
    else:
        for name in sorted(weights, key=canonical_order):
            want, got = expected_shape(spec, layout, name), tensors[name].shape
            if want is not None and got != want:
                what = f"{name} is {list(got)} in the checkpoint but {list(want)} in {model}"
                break
    if what:
        raise FormatError(
            f"{config_name or 'the given HF config'}: this config does not describe the checkpoint "
            f"{path}: {what}; pass the config of the model the checkpoint holds"
        )


def add_mtp_copies(spec, tensors: dict[str, TensorNode]) -> None:
    """MTP layers share the main embedding / output layer in Megatron: give each its canonical
    copies (an HF target writes them as the released checkpoints do)."""
    for k in range(spec.mtp_layers):
        for own, main in (("mtp.embed.weight", "embed.weight"), ("mtp.head.weight", "lm_head.weight")):
            name = f"layers.{spec.num_layers + k}.{own}"
            if name not in tensors and main in tensors:
                tensors[name] = attrs.evolve(tensors[main], name=name)


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
                f"other ranks' copies ({option('replicas', 'take-rank0')})"
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
                        f"ranks drifted apart); pass {option('replicas', 'take-rank0')} to keep {first}'s copy on "
                        f"purpose"
                    )
    return []


def _assemble(
    pieces: dict[str, dict[int, E.Expr]],
    slot_of: dict,
    spec,
    layout: Layout,
    path: str,
    dropped: dict[str, str],
) -> dict[str, TensorNode]:
    """Tensor nodes from the per-TP-rank pieces of one tensor set (model layers resolved)."""
    tensors: dict[str, TensorNode] = {}
    for canon_local, shards in pieces.items():
        name = _resolve_layer(canon_local, slot_of, path, spec.num_layers)
        if name in tensors:
            raise FormatError(
                f"{path}: tensor {name} appears twice (check num_layer_list / noop_layers in args)"
            )
        rule = split_rule(name)
        n = layout.expert_tp if is_expert(name) else layout.tp
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


MTP_LAYER_KEY = re.compile(r"^mtp\.layers\.(\d+)\.transformer_layer\.(.*)$")


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _evolve(obj, **kw):
    import attrs

    return attrs.evolve(obj, **kw)


def _lift_key(key: str, expr: E.Expr, stage: int, chunk: int, ep: int, experts_per_rank: int, tables):
    """[(canonical name with its layer still local, expression, is_expert)] for one stored key,
    or None if the key means nothing to us.  Expert indices become global here; a grouped-GEMM
    weight yields one entry per local expert; layers stay local (:class:`~ckpt_ir.mcore_format.LocalName`)."""
    if key == M.MTP_FINAL_NORM:
        return [("final_norm.weight", expr, False)]
    m = MTP_LAYER_KEY.match(key)
    if m:
        k = m.group(1)
        inner = _lift_key(
            f"decoder.layers.{k}.{m.group(2)}", expr, stage, chunk, ep, experts_per_rank, tables
        )
        return (
            None
            if inner is None
            else [(M.LocalName(c.rest, int(k), mtp=True), x, is_e) for c, x, is_e in inner]
        )
    for template, canon in M.MTP_KEYS:
        mm = re.match("^" + re.escape(template).replace(re.escape("{k}"), r"(\d+)") + "$", key)
        if mm:
            return [(M.LocalName(canon, int(mm.group(1)), mtp=True), expr, False)]
    m = M.GROUPED_KEY.match(key)
    if m:
        local_layer, kind = m.group(1), m.group(2)
        out = []
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
