"""MindSpeed-LLM's FSDP2 checkpoints (``train_fsdp2.py``), read without torch.distributed or any
tensor data.

Every ``save_steps`` its ``CheckpointManager`` (``mindspeed_llm/fsdp2/checkpoint/
checkpoint_manager.py``) writes::

    <output_dir>/checkpoints/global_step_<N>/
        .metadata, __<rank>_0.distcp             torch.distributed.checkpoint: {"model", "optimizer"}
        extra_state/extra_state_rank_<r>.pt      torch.save: step counters, LR scheduler, RNG state

``model`` is ``get_model_state_dict`` of what the trainer holds: ``MindSpeedParallelEngine``, which
keeps the transformers model as its ``model``, so each weight is ``model.model.<name>``; a
transformers model saved the same way without the engine gives ``model.<name>``.  ``<name>`` is the
tensor's name in the running transformers model (:mod:`ckpt_ir.families.runtime`: transformers 5's
fused experts, MindSpeed's grouped-GEMM experts), the whole tensor's chunks spread over the ranks
(FSDP2 and expert parallelism shard it; DCP records the global shape).  ``optimizer`` is
``get_optimizer_state_dict`` (``optimizer.state.<parameter>.{step,exp_avg,exp_avg_sq}``,
``optimizer.param_groups.*``).  No config is saved: the HF model the run started from
(``model_name_or_path``) describes the checkpoint.

The FSDP2 backend starts from HF weights directly (``ModelLoader`` / ``WeightLoader`` read
``config.json`` and ``*.safetensors`` from ``model_name_or_path``), so an HF output is what it
reads; nothing else is written for it.
"""

from __future__ import annotations

import os
import re
from typing import Any

import attrs

from ckpt_ir.errors import FormatError, UsageError, setting
from ckpt_ir.families import Family, by_name, for_hf_config
from ckpt_ir.families.runtime import runtime_name
from ckpt_ir.io.dcp import METADATA_FILE, Assembler, ChunkResolver, read_metadata
from ckpt_ir.ir import expr as E

STEP_DIR = re.compile(r"^global_step_(\d+)$")
EXTRA_STATE = "extra_state"
CHECKPOINTS = "checkpoints"  # under the run's output_dir
# the DCP prefixes of the model's weights: through the engine, or a transformers model saved bare
PREFIXES = ("model.model.", "model.")


@attrs.frozen
class Step:
    """One saved step: its directory, its number, the model's tensors under their in-memory names
    (prefix removed) and what is left out."""

    path: str
    step: int | None
    tensors: dict[str, E.Expr]
    dropped: dict[str, str]


def step_dir(path: str, iteration: int | str | None = None) -> tuple[str, int | None] | None:
    """(the ``global_step_<N>`` directory, N) that ``path`` is, or holds directly or under
    ``checkpoints/`` (the latest step, or step ``iteration``); None when it is none of these."""
    own = STEP_DIR.match(os.path.basename(os.path.abspath(path)))
    if _is_step(path) and (own or os.path.isdir(os.path.join(path, EXTRA_STATE))):
        n = int(own.group(1)) if own else None
        if iteration is not None and n is not None and str(iteration) != str(n):
            raise UsageError(
                f"{path}: is step {n} itself, not {iteration}; give the directory holding the "
                f"global_step_* directories to read another step"
            )
        return path, n
    for parent in (path, os.path.join(path, CHECKPOINTS)):
        if not os.path.isdir(parent):
            continue
        steps = {
            int(m.group(1)): os.path.join(parent, name)
            for name in os.listdir(parent)
            if (m := STEP_DIR.match(name)) and _is_step(os.path.join(parent, name))
        }
        if not steps:
            continue
        if iteration is None:
            n = max(steps)
        elif str(iteration).isdigit() and int(iteration) in steps:
            n = int(iteration)
        else:
            raise UsageError(f"{parent}: no global_step_{iteration}; steps present: {sorted(steps)}")
        return steps[n], n
    return None


def _is_step(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA_FILE))


def detect(path: str) -> bool:
    try:
        return step_dir(path) is not None
    except OSError:
        return False


def read(
    path: str,
    cfg: dict[str, Any] | None,
    where: str,
    iteration: int | str | None = None,
    family: str | None = None,
) -> Step:
    """The model tensors of the step at ``path`` (see :func:`step_dir`), described by the HF config
    ``cfg`` (named ``where``; the model the run started from)."""
    found = step_dir(path, iteration)
    if found is None:
        raise FormatError(f"{path}: no global_step_* directory with {METADATA_FILE}")
    d, n = found
    if cfg is None:
        raise UsageError(
            f"{d}: a MindSpeed-LLM FSDP2 checkpoint holds no config.json; pass "
            f"{setting('hf_config', metavar='DIR')}, the HF model the run started from (its "
            f"model_name_or_path)"
        )
    md = read_metadata(d)
    prefix = _prefix(d, md.tensors, _family(cfg, where, family))
    dropped: dict[str, str] = {}
    tensors: dict[str, E.Expr] = {}
    with ChunkResolver(d) as resolver:
        build = Assembler(md.path, resolver)
        for key, t in md.tensors.items():
            if key.startswith(prefix):
                tensors[key[len(prefix) :]] = build(t)
            elif key.startswith("optimizer."):
                dropped["optimizer.*"] = "the FSDP2 run's optimizer state (AdamW moments): not carried"
            else:
                dropped[key] = "not a model weight of the MindSpeed-LLM FSDP2 checkpoint"
    if any(k.startswith("optimizer.") for k in md.objects):
        dropped["optimizer.*"] = "the FSDP2 run's optimizer state (AdamW moments): not carried"
    if os.path.isdir(os.path.join(d, EXTRA_STATE)):
        dropped[f"{EXTRA_STATE}/"] = "the FSDP2 run's step counters, LR scheduler and RNG state: not carried"
    return Step(d, n, tensors, dropped)


def _family(cfg: dict[str, Any], where: str, family: str | None) -> Family:
    try:
        return for_hf_config(cfg, where)
    except FormatError:
        if family is None:
            raise
        return by_name(family)


def _prefix(path: str, keys: dict[str, Any], family: Family) -> str:
    """The prefix of the model's weights: the one before the embedding's in-memory name."""
    embed = runtime_name(family, family.names.from_canonical("embed.weight") or "")
    for prefix in PREFIXES:
        if prefix + embed in keys:
            return prefix
    raise FormatError(
        f"{path}: holds neither {PREFIXES[0]}{embed} nor {PREFIXES[1]}{embed}; not a MindSpeed-LLM "
        f"FSDP2 checkpoint of the {family.name} model the HF config describes"
    )
