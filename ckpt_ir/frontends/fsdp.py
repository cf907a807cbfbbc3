"""Megatron-LM's checkpoints of fully sharded data-parallel runs, ``--ckpt-format torch_dcp``
(torch FSDP2) and ``--ckpt-format fsdp_dtensor`` (Megatron-FSDP), lifted into the IR without
Megatron, torch.distributed or reading any tensor data.

An iteration directory holds DCP's ``.metadata`` and ``__R_K.distcp`` data files and nothing
else (:mod:`ckpt_ir.megatron.fsdp` has the two layouts).  Keys are the model's own, with global
layer numbers (:mod:`ckpt_ir.megatron.global_keys`); each tensor is assembled lazily from the
chunks the FSDP ranks saved.  A SwiGLU fc1 saved as its two halves (``weight_w`` /
``weight_v``) is lifted as the ``[gate; up]`` fc1 of a Megatron layout (a lazy concatenation, so
an HF export reads each half once, where it lies).  The result is a TP=1, PP=1 Megatron layout
with fused QKV and gate/up, as from ``torch_dist``.

Which of the two formats it is comes from the checkpoint's ``args`` (``ckpt_format``, else
``use_megatron_fsdp`` / ``use_torch_fsdp2``), or from ``source_ckpt_format`` when the args do
not say.  The weights read the same either way; the optimizer state (saved per parameter index
by ``torch_dcp``, per parameter name by ``fsdp_dtensor``) is not lifted: asking for it is a
one-line error that says to convert the weights only.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

from ckpt_ir.errors import CkptIrError, FormatError, UsageError, setting
from ckpt_ir.io.dcp import METADATA_FILE, Assembler, ChunkResolver, DcpTensor, read_metadata, read_object
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode
from ckpt_ir.ir.layout import Layout
from ckpt_ir.megatron import args as megatron_args
from ckpt_ir.megatron import fsdp, global_keys
from ckpt_ir.megatron import keys as M
from ckpt_ir.megatron import lift as lift_tail
from ckpt_ir.megatron.lift import spec_from_args

# non-tensor state Megatron-LM saves beside the model (bytes entries, flattened by DCP)
_SCHEDULER = "opt_param_scheduler."
_FLOPS = "num_floating_point_operations_so_far"
# the run's per-rank state: not carried (it belongs to the source's rank grid)
_RUN_STATE = {
    "rng_state": "per-rank random-number state of the run: not carried",
    "rerun_state_machine": "Megatron's rerun state machine (per-rank): not carried",
}


def detect(path: str, iteration: int | str | None = None) -> bool:
    """A Megatron iteration directory (or save directory whose iteration, the latest or
    ``iteration``, is one) holding a plain DCP save: ``.metadata`` without torch_dist's
    ``metadata.json``."""
    if not os.path.isdir(path):
        return False
    try:
        it_dir, _ = M.iteration_dir(path, iteration)
    except (CkptIrError, OSError, ValueError):
        return False
    return os.path.isfile(os.path.join(it_dir, METADATA_FILE)) and not os.path.isfile(
        os.path.join(it_dir, M.TORCH_DIST_METADATA)
    )


def lift(
    path: str,
    *,
    allow_unused: tuple[str, ...] = (),
    hf_config: dict[str, Any] | None = None,
    config_name: str | None = None,
    optimizer: bool = False,
    family: str | None = None,
    iteration: int | str | None = None,
    source_ckpt_format: str | None = None,
) -> Checkpoint:
    """Lift a ``torch_dcp`` or ``fsdp_dtensor`` checkpoint (``iteration``: which one of a save
    directory, default the latest).  ``source_ckpt_format`` says which when its args do not;
    ``hf_config`` (named ``config_name``) describes the model instead of the args, and is needed
    when the checkpoint has none.  ``optimizer=True`` refuses a checkpoint holding optimizer
    state (not lifted yet)."""
    it_dir, iteration = M.iteration_dir(path, iteration)
    md = read_metadata(it_dir)
    where = os.path.join(it_dir, METADATA_FILE)
    raw_args = read_object(md, "args") if "args" in md.objects else None
    args = megatron_args.args_dict(raw_args, where) if raw_args is not None else {}
    fmt = _which(args, source_ckpt_format, where)
    if not args and hf_config is None:
        raise UsageError(
            f"{where}: the checkpoint holds no 'args' to describe the model; pass "
            f"{setting('hf_config', metavar='DIR')} (the HF config of the model it holds)"
        )
    spec, cfg, inferred = spec_from_args(args, hf_config, where, family, config_name)
    n_args = args.get("num_layers")
    if isinstance(n_args, int) and n_args != spec.num_layers:
        raise FormatError(
            f"{where}: args.num_layers is {n_args} but the HF config has {spec.num_layers} layers; "
            f"the config does not belong to this checkpoint"
        )
    tables = M.read_tables(spec)
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    stored: dict[str, DcpTensor | tuple[DcpTensor, DcpTensor]] = {}  # model key -> tensor or SwiGLU halves
    halves: dict[str, dict[str, DcpTensor]] = {}
    optimizer_keys: list[str] = []
    te_norms = te_fc1 = False
    for key, t in md.tensors.items():
        k = fsdp.bare(key)
        if k is None:
            if key.startswith("optimizer."):
                optimizer_keys.append(key)
            elif key.split(".", 1)[0] in _RUN_STATE:
                dropped[key.split(".", 1)[0] + ".*"] = _RUN_STATE[key.split(".", 1)[0]]
            else:
                unknown.append(key)
            continue
        if k.endswith(M.EXTRA_STATE):
            dropped[k] = "Transformer-Engine _extra_state (FP8 metadata)"
            continue
        te_norms |= k.endswith(M.TE_QKV_NORM)
        te_fc1 |= k.endswith(M.TE_FC1_NORM)
        half = fsdp.swiglu_half(k)
        if half is not None:
            halves.setdefault(half[0], {})[half[1]] = t
        else:
            stored[k] = t
    for k, parts in halves.items():
        w, v = (parts.get(h) for h in fsdp.HALVES)
        if w is None or v is None or w.shape != v.shape or w.dtype != v.dtype:
            have = ", ".join(f"{k}_{h} {t.dtype} {list(t.shape)}" for h, t in sorted(parts.items()))
            raise FormatError(
                f"{where}: SwiGLU fc1 {k} is saved as two halves {k}_w and {k}_v of one shape, but the "
                f"checkpoint has {have}; it is incomplete or corrupt"
            )
        if k in stored:
            raise FormatError(f"{where}: {k} is stored both whole and as SwiGLU halves")
        stored[k] = (w, v)
    model: dict[str, tuple[DcpTensor | tuple[DcpTensor, DcpTensor], tuple[int, ...]]] = {}
    for k, entry in stored.items():
        shape = entry.shape if isinstance(entry, DcpTensor) else (2 * entry[0].shape[0], *entry[0].shape[1:])
        found = global_keys.names(k, shape, spec.num_layers, tables, where, spec.mla)
        if found is None:
            if any(fnmatch.fnmatch(k, pat) for pat in allow_unused):
                dropped[k] = f"matched {setting('allow_unused')}"
            else:
                unknown.append(k)
            continue
        for canon, index in found:
            if canon in model:
                raise FormatError(f"{where}: tensor {canon} is stored twice (as {k} and another key)")
            model[canon] = (entry, index)
    for key in md.objects:
        k, top = fsdp.bare(key), key.split(".", 1)[0]
        if top in _RUN_STATE:
            dropped[f"{top}.*"] = _RUN_STATE[top]
        elif k is not None:  # a model entry that is no tensor: Transformer Engine's FP8 state, or None
            if k.endswith(M.EXTRA_STATE):
                dropped[k] = "Transformer-Engine _extra_state (FP8 metadata)"
            else:
                unknown.append(key)
    if unknown and hf_config is None:  # with a config: said by check_config_fits, below
        raise lift_tail.unknown_tensors(unknown, it_dir)
    saved_optimizer = optimizer_keys or [k for k in md.objects if k.startswith("optimizer.")]
    if saved_optimizer:
        if optimizer:
            raise FormatError(
                f"{it_dir}: the {fmt} checkpoint holds optimizer state (e.g. {saved_optimizer[0]}), "
                f"which ckpt-ir does not carry yet; convert the weights only "
                f"({setting('optimizer', False)})"
            )
        dropped["optimizer.*"] = f"{fmt} optimizer state: not requested"
    with ChunkResolver(it_dir) as resolver:
        build = Assembler(where, resolver)
        tensors = {}
        for canon, (entry, index) in model.items():
            if isinstance(entry, DcpTensor):
                expr = build(entry, index)
            else:  # SwiGLU halves: [gate; up]
                expr = E.Concat((build(entry[0], index), build(entry[1], index)), 0)
            tensors[canon] = TensorNode.whole(canon, expr)
    if spec.mla:
        lift_tail.fuse_mla(spec, tensors)
    lift_tail.complete_tensors(spec, tensors, {}, dropped)
    layout = Layout(
        format="mcore",
        fused_qkv=True,
        fused_gate_up=True,
        norm_names=lift_tail.norm_names(te_norms, te_fc1),
    )
    if hf_config is not None:
        lift_tail.check_config_fits(config_name, path, spec, layout, tensors, unknown)
    meta: dict[str, Any] = {
        "iteration": iteration if isinstance(iteration, int) else _value(md, "iteration", int) or 1,
        "args": args,
        "format": fmt,
    }
    if inferred:
        meta["family_from_args"] = inferred
    scheduler = {k[len(_SCHEDULER) :]: read_object(md, k) for k in md.objects if k.startswith(_SCHEDULER)}
    meta["training"] = {
        "args": megatron_args.all_args(raw_args),
        "opt_param_scheduler": scheduler or None,
        "num_floating_point_operations_so_far": _value(md, _FLOPS, (int, float)),
        "rng_state": {},
        "source_layout": None,
    }
    return lift_tail.checkpoint(
        path, spec, layout, tensors, {}, args=args, cfg=cfg, dropped=dropped, meta=meta, iteration_dir=it_dir
    )


def _which(args: dict[str, Any], given: str | None, where: str) -> str:
    """torch_dcp or fsdp_dtensor: what the checkpoint's args say, else ``given``."""
    said = fsdp.format_from_args(args)
    if given is not None and given not in fsdp.FORMATS:
        raise UsageError(f"{setting('source_ckpt_format', given)}: choose {' or '.join(fsdp.FORMATS)}")
    if said is not None and given is not None and given != said:
        raise UsageError(
            f"{where}: the checkpoint's args say it is {said}, not {given}; leave out "
            f"{setting('source_ckpt_format', given)}"
        )
    fmt = said or given
    if fmt is None:
        raise UsageError(
            f"{where}: a DCP checkpoint whose args do not say whether Megatron-LM saved it as "
            f"torch_dcp (torch FSDP2) or fsdp_dtensor (Megatron-FSDP); pass "
            f"{setting('source_ckpt_format', metavar='FORMAT')}"
        )
    return fmt


def _value(md, key: str, kind) -> Any:
    """The plain value of bytes entry ``key`` when it is one of ``kind``, else None."""
    if key not in md.objects:
        return None
    value = read_object(md, key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None
