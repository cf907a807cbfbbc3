"""Frontends: detect a checkpoint's format and lift it into the IR (headers only, no data)."""

from __future__ import annotations

import os
from typing import Any

from ckpt_ir.errors import FormatError
from ckpt_ir.ir.checkpoint import Checkpoint


def detect(path: str) -> str:
    from ckpt_ir.frontends import hf, mcore, torch_dist

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
    if torch_dist.detect(path):  # before mcore: both live in Megatron iter_* directories
        return "torch_dist"
    if mcore.detect(path):
        return "mcore"
    raise FormatError(
        f"{path}: not a recognised checkpoint (expected an HF directory with config.json and "
        f"*.safetensors, or Megatron iter_*/mp_rank_* directories)"
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
) -> Checkpoint:
    """Lift a checkpoint (an HF directory or one ``.safetensors`` file beside its config.json,
    Megatron ``torch`` rank directories, a ``torch_dist`` checkpoint; the format is detected)
    into a :class:`~ckpt_ir.ir.checkpoint.Checkpoint`, reading headers only.

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
    tensors are compared (``check``, ``check-all``, ``take-rank0``)."""
    config_name = None
    if isinstance(hf_config, str):
        from ckpt_ir.frontends.hf import read_config

        config_name, hf_config = os.path.join(hf_config, "config.json"), read_config(hf_config)
    fmt = detect(path)
    if weights_from != "model" and fmt not in ("mcore", "torch_dist"):
        from ckpt_ir.errors import UsageError, option

        raise UsageError(
            f"{option('weights_from', weights_from)}: only Megatron checkpoints with distributed-optimizer "
            f"state have master weights"
        )
    if fmt == "hf":
        from ckpt_ir.frontends import hf

        return hf.lift(
            path, allow_unused=allow_unused, hf_config=hf_config, config_name=config_name, family=family
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
    )
