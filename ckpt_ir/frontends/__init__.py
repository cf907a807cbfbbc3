"""Frontends: detect a checkpoint's format and lift it into the IR (headers only, no data)."""

from __future__ import annotations

import fnmatch
import os
from typing import Any

from ckpt_ir.errors import FormatError, UsageError, setting
from ckpt_ir.io.side_files import CHAT_TEMPLATES_ENTRY, HF_FILES, NOTES_FILE
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.megatron.keys import DIRECTORY_ENTRIES

# the formats of training saves: no HF config of their own (--hf-config describes them, else
# Megatron's args) and --iteration picks one of a run's saves: torch rank files, torch_dist,
# torch_dcp / fsdp_dtensor, MindSpeed-LLM's FSDP2 ones
MEGATRON_FORMATS = ("mcore", "torch_dist", "fsdp", "mindspeed_fsdp2")


def detect(path: str, iteration: int | str | None = None) -> str:
    """The format of the checkpoint at ``path`` (``iteration``: the one of a Megatron save
    directory that decides between ``torch_dist``, ``fsdp`` (``torch_dcp`` / ``fsdp_dtensor``)
    and ``mcore``, default the latest)."""
    from ckpt_ir.frontends import fsdp, hf, mcore, mindspeed_fsdp2, torch_dist

    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file or directory")
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return "hf"  # one weight file; its directory holds config.json
    if not os.path.isdir(path):
        raise FormatError(
            f"{path}: expected a checkpoint directory (or one .safetensors file beside its config.json)"
        )
    if hf.detect(path):
        return "hf"
    if mindspeed_fsdp2.detect(path):  # before the Megatron formats: a DCP save in global_step_N/
        return "mindspeed_fsdp2"
    if torch_dist.detect(path, iteration):  # before mcore: both live in Megatron iter_* directories
        return "torch_dist"
    if fsdp.detect(path, iteration):  # a DCP save without torch_dist's metadata.json
        return "fsdp"
    if mcore.detect(path):
        return "mcore"
    raise FormatError(
        f"{path}: not a recognised checkpoint (expected an HF directory with config.json and "
        f"*.safetensors, Megatron iter_*/mp_rank_* directories, or MindSpeed-LLM FSDP2 "
        f"global_step_* directories)"
    )


def load(
    path: str,
    *,
    allow_unused: tuple[str, ...] = (),
    hf_config: dict[str, Any] | str | None = None,
    weights_from: str = "model",
    family: str | None = None,
    optimizer: bool = False,
    optimizer_layout: dict[str, int | None] | None = None,
    replicas: str = "check",
    iteration: int | str | None = None,
    source_ckpt_format: str | None = None,
) -> Checkpoint:
    """Lift a checkpoint (an HF directory or one ``.safetensors`` file beside its config.json,
    Megatron ``torch`` rank directories, a ``torch_dist``, ``torch_dcp`` or ``fsdp_dtensor``
    checkpoint, a MindSpeed-LLM FSDP2 ``global_step_<N>`` directory; the format is detected)
    into a :class:`~ckpt_ir.ir.checkpoint.Checkpoint`, reading headers only.  ``path`` may also be
    a Hugging Face Hub id, ``org/name[@revision]`` (:func:`ckpt_ir.io.hub.resolve`).

    ``allow_unused``: glob patterns of source tensors to drop on purpose (recorded in
    ``dropped``); any other tensor ckpt-ir does not understand is an error.  ``hf_config``: the HF
    config describing the model (a directory holding config.json, or the config itself) instead
    of the checkpoint's own (a Megatron checkpoint's args); a config that does not describe the
    checkpoint's tensors is an error naming it.  ``family``: the model family when neither the
    config nor the args name one (``ckpt-ir models`` lists them).  ``weights_from="master"``: a
    Megatron checkpoint's weights come from its distributed optimizer's fp32 master copies;
    ``optimizer=True``: lift its optimizer state too (``Checkpoint.states``), when it has any,
    with ``optimizer_layout`` correcting what the args say of its layout (``dp``,
    ``bucket_size``, ``align``).  ``replicas``: how a Megatron checkpoint's copies of replicated
    tensors are compared (``check``, ``check-all``, ``take-rank0``).  ``iteration``: which
    iteration of a Megatron save directory to read (a number or ``release``; default the
    latest), or which ``global_step_<N>`` of a MindSpeed-LLM FSDP2 run (whose checkpoint needs
    ``hf_config``: the HF model the run started from).  ``source_ckpt_format``: ``"torch_dcp"``
    or ``"fsdp_dtensor"``, which of the two a Megatron DCP checkpoint is when its args do not say."""
    from ckpt_ir.io.hub import resolve

    config_name = None
    if isinstance(hf_config, str):
        from ckpt_ir.frontends.hf import read_config

        config_name, hf_config = os.path.join(hf_config, "config.json"), read_config(hf_config)

    path = resolve(path)
    fmt = detect(path, iteration)
    if source_ckpt_format is not None and fmt != "fsdp":
        raise UsageError(
            f"{setting('source_ckpt_format', source_ckpt_format)}: {path} is no Megatron DCP checkpoint "
            f"(torch_dcp or fsdp_dtensor); its format is detected"
        )
    if iteration is not None and fmt not in MEGATRON_FORMATS:
        raise UsageError(
            f"{path}: an HF checkpoint has no iterations; only a Megatron or MindSpeed-LLM FSDP2 "
            f"checkpoint has"
        )
    if weights_from != "model" and fmt not in ("mcore", "torch_dist"):
        raise UsageError(
            f"{setting('weights_from', weights_from)}: only Megatron checkpoints with distributed-optimizer "
            f"state have master weights"
        )
    if fmt == "hf":
        from ckpt_ir.frontends import hf

        return hf.lift(
            path, allow_unused=allow_unused, hf_config=hf_config, config_name=config_name, family=family
        )
    if fmt == "fsdp":
        from ckpt_ir.frontends import fsdp

        return fsdp.lift(
            path,
            allow_unused=allow_unused,
            hf_config=hf_config,
            config_name=config_name,
            optimizer=optimizer,
            family=family,
            iteration=iteration,
            source_ckpt_format=source_ckpt_format,
        )
    if fmt == "mindspeed_fsdp2":
        from ckpt_ir.frontends import hf, mindspeed_fsdp2

        where = config_name or "the given HF config"
        step = mindspeed_fsdp2.read(path, hf_config, where, iteration, family)
        return hf.lift(
            step.path,
            hf_config=hf_config,
            config_name=config_name,
            allow_unused=allow_unused,
            family=family,
            runtime=step.tensors,
            dropped=step.dropped,
        )
    if fmt == "torch_dist":
        from ckpt_ir.frontends import torch_dist

        return torch_dist.lift(
            path,
            allow_unused=allow_unused,
            hf_config=hf_config,
            config_name=config_name,
            optimizer=optimizer,
            weights_from=weights_from,
            family=family,
            iteration=iteration,
        )
    from ckpt_ir.frontends import mcore

    return mcore.lift(
        path,
        allow_unused=allow_unused,
        hf_config=hf_config,
        config_name=config_name,
        weights_from=weights_from,
        optimizer=optimizer,
        optimizer_layout=optimizer_layout,
        family=family,
        replicas=replicas,
        iteration=iteration,
    )


# An entry is (name pattern, what a directory of that name holds); None: a file, not a directory.
Entries = tuple[tuple[str, "Entries | None"], ...]

# What a checkpoint directory holds, and nothing else: the directories ``--overwrite`` replaces.
# A directory holds a checkpoint when a frontend recognises it (HF: ``config.json`` and weights;
# Megatron: the tracker file or an iteration directory, ``torch`` or ``torch_dist``; PEFT:
# ``adapter_config.json``) and every entry in it, at every depth, is one that such a checkpoint
# holds.  A previous ckpt-ir output is one of these formats, with its notes file where it
# records a choice.
CHECKPOINT_ENTRIES: Entries = (
    *((p, None) for p in HF_FILES),
    CHAT_TEMPLATES_ENTRY,
    *DIRECTORY_ENTRIES,
    (NOTES_FILE, None),
)


def foreign_entry(path: str, entries: Entries = CHECKPOINT_ENTRIES) -> str | None:
    """The first entry under directory ``path`` (depth first, in name order) that ``entries``
    do not describe, as a path relative to ``path``; None if there is none."""
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        is_dir = entry.is_dir(follow_symlinks=False)  # a symlink is a file here: removing it removes a link
        for pattern, inner in entries:
            if fnmatch.fnmatchcase(entry.name, pattern) and (inner is not None) == is_dir:
                break
        else:
            return entry.name
        found = foreign_entry(entry.path, inner) if inner is not None else None
        if found is not None:
            return os.path.join(entry.name, found)
    return None


def holds_checkpoint(path: str) -> bool:
    """Whether a frontend recognises directory ``path`` as a checkpoint (HF, Megatron or PEFT)."""
    from ckpt_ir.frontends import hf, mcore, peft

    return hf.detect(path) or mcore.detect(path) or peft.detect(path)


def check_replaceable(path: str) -> None:
    """Refuse (exit 2) to replace directory ``path`` unless it holds a checkpoint and nothing else."""
    foreign = foreign_entry(path)
    if foreign is not None:
        raise UsageError(
            f"{os.path.join(path, foreign)}: not part of a checkpoint, and --overwrite replaces only a "
            f"directory that holds a checkpoint and nothing else; move it out of {path} or choose "
            f"another destination"
        )
    if not holds_checkpoint(path):
        raise UsageError(
            f"{path}: holds no checkpoint (HF, Megatron or PEFT), and --overwrite replaces only a "
            f"directory that holds one; choose another destination"
        )
