"""Megatron-LM's checkpoints of fully sharded data-parallel runs: ``--ckpt-format torch_dcp``
(``--use-torch-fsdp2``) and ``--ckpt-format fsdp_dtensor`` (Megatron-FSDP).

Both are one plain ``torch.distributed.checkpoint`` save per iteration (``iter_N/.metadata`` and
``__R_K.distcp``, no ``metadata.json``) of the state dict Megatron-LM's ``generate_state_dict``
builds (``megatron/training/checkpointing.py``): ``args``, ``checkpoint_version``,
``iteration``, ``model``, ``optimizer``, ``opt_param_scheduler``, ``rng_state``, ... DCP flattens
nested dicts into dotted keys; every non-tensor value is a bytes entry (a ``torch.save`` blob).

* ``torch_dcp``: ``model.<key>``, the model's own ``state_dict()`` (one entry per layer,
  ``decoder.layers.<i>.``, fused QKV, fc1 = ``[gate; up]``), each tensor chunked over the FSDP
  ranks (dim 0); the optimizer is the plain ``optimizer.state_dict()`` (state by parameter
  index).
* ``fsdp_dtensor``: ``model.module.<key>`` (Megatron-FSDP's module wrappers, one ``module.`` per
  wrapper: ``model.module.module.<key>`` under a ``Float16Module``), the same keys but: the
  SwiGLU fc1 split into ``linear_fc1.weight_w`` (gate) / ``weight_v`` (up) (also ``bias`` and each
  expert's), experts at global indices (``local_experts.<e>``, or TEGroupedMLP's
  ``linear_fc1.weight<e>``), MLA's down-projections unfused, an MTP layer's transformer layer as
  ``transformer_layer`` (``mtp_model_layer`` in Megatron-LM's ``checkpoint_inspector`` output);
  ``_extra_state`` dropped (``preprocess_fsdp_dtensor_state_dict``).  The model weights are
  Megatron-FSDP's main (fp32) parameters; the distributed optimizer saves per parameter
  ``optimizer.state.<wrappers><key>.{exp_avg,exp_avg_sq}`` and
  ``optimizer.param_to_group_meta.<wrappers><key>.*``.

On disk nothing tells the two apart (Megatron-LM decides by its own ``--use-megatron-fsdp``):
the checkpoint's ``args`` do (:func:`format_from_args`).
"""

from __future__ import annotations

import re
from typing import Any

FORMATS = ("torch_dcp", "fsdp_dtensor")
MODEL = "model."  # the model's state dict
WRAPPER = "module."  # one per module wrapper around the model (Megatron-FSDP, Float16Module)
OPTIMIZER_STATE = "optimizer.state."
# the prefixes fsdp_dtensor output gets: Megatron-LM's checkpoint_inspector's (its defaults), the
# names Megatron-FSDP's GPTModel (FullyShardedDataParallel > MegatronFSDP > model) saves
WRITE_MODEL = "model.module."
WRITE_STATE = "optimizer.state.module.module.module."
WRITE_STATES = ("exp_avg", "exp_avg_sq")  # Adam's moments; the fp32 masters are the model weights
# SwiGLU's fc1 halves: <fc1 key>_w is the gate, <fc1 key>_v the up projection
_HALF = re.compile(r"^(.*\.linear_fc1\.(?:weight|bias)\d*)_([wv])$")
HALVES = ("w", "v")


def format_from_args(args: dict[str, Any]) -> str | None:
    """Which of the two formats a run saved, from its args (``ckpt_format``, else whether it ran
    Megatron-FSDP or torch FSDP2); None when the args do not say."""
    if args.get("ckpt_format") in FORMATS:
        return args["ckpt_format"]
    if args.get("use_megatron_fsdp") or args.get("use_custom_fsdp"):
        return "fsdp_dtensor"
    if args.get("use_torch_fsdp2"):
        return "torch_dcp"
    return None


def bare(key: str, prefix: str = MODEL) -> str | None:
    """``key`` below ``prefix`` and its module wrappers (``model.module.module.decoder.x`` ->
    ``decoder.x``), or None when ``key`` is not under ``prefix``."""
    if not key.startswith(prefix):
        return None
    key = key[len(prefix) :]
    while key.startswith(WRAPPER):
        key = key[len(WRAPPER) :]
    return key


def swiglu_half(key: str) -> tuple[str, str] | None:
    """(the fc1 key, ``w`` or ``v``) of one SwiGLU half's key, else None."""
    m = _HALF.match(key)
    return (m.group(1), m.group(2)) if m else None


_FC1 = re.compile(r"(^|\.)linear_fc1\.(weight|bias)\d*$")  # an fc1 weight or bias (grouped: weight<e>)


def is_fc1(key: str) -> bool:
    """Whether ``key`` is an MLP's fc1 weight or bias (a dense MLP's, an expert's, TEGroupedMLP's)."""
    return _FC1.search(key) is not None


def halves(key: str) -> tuple[str, str]:
    """The two keys SwiGLU's fc1 ``key`` is saved under: the gate's and the up projection's."""
    return f"{key}_w", f"{key}_v"
