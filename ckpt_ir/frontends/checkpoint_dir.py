"""What a checkpoint directory holds, and nothing else: the directories ``--overwrite`` replaces.

A directory holds a checkpoint when a frontend recognises it (HF: ``config.json`` and weights;
Megatron: the tracker file or an iteration directory, ``torch`` or ``torch_dist``; PEFT:
``adapter_config.json``) and every entry in it, at every depth, is one that such a checkpoint
holds (:data:`TOP` and the tables below it).  A previous ckpt-ir output is one of these formats,
with ``ckpt-ir-notes.txt`` where it records a choice.
"""

from __future__ import annotations

import fnmatch
import os

from ckpt_ir.backends.plan import NOTES_FILE
from ckpt_ir.errors import UsageError
from ckpt_ir.frontends.hf import AUX_PATTERNS, MCORE_HF_DIR

# An entry is (name pattern, what a directory of that name holds); None: a file, not a directory.
Entries = tuple[tuple[str, "Entries | None"], ...]

# the files of an HF model or a PEFT adapter: weights and their index, configs, the tokenizer,
# processor, chat-template and remote-code side files, what a Hub snapshot adds (model card, licence,
# git attributes)
HF_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "config.json",
    "generation_config.json",
    "processor_config.json",
    *AUX_PATTERNS,
    "adapter_config.json",
    "adapter_model.bin",
    "README.md",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY.md",
    ".gitattributes",
)
RANK: Entries = (("model_optim_rng.pt", None), ("distrib_optim.pt", None))
# an iteration: rank directories (torch format) or torch_dist's files
ITERATION: Entries = (
    ("mp_rank_[0-9][0-9]*", RANK),
    *((p, None) for p in ("*.distcp", ".metadata", "metadata.json", "common.pt")),
)
TOP: Entries = (
    *((p, None) for p in HF_FILES),
    ("latest_checkpointed_iteration.txt", None),
    ("iter_[0-9]*", ITERATION),
    ("release", ITERATION),
    (MCORE_HF_DIR, tuple((p, None) for p in ("config.json", *AUX_PATTERNS))),  # ckpt-ir's side files
    (NOTES_FILE, None),
)


def foreign_entry(path: str, entries: Entries = TOP) -> str | None:
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
