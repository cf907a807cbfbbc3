"""Megatron distributed-optimizer state (``distrib_optim.pt`` beside each rank's
``model_optim_rng.pt``): where each parameter's fp32 master copy and Adam moments sit in the flat
per-rank buffers.

The file holds, per model chunk and dtype group, 1-D fp32 tensors ``param``, ``exp_avg`` and
``exp_avg_sq`` (Megatron-Core >= 0.7, ``buckets_coalesced``): the concatenation over DDP buckets
of each bucket without its end padding.  The file does not say which parameter is where; the
layout is rebuilt from the model state dict:

* parameters are laid out in *reverse* registration order (state-dict order, ``_extra_state``
  skipped), each starting on a multiple of 64 elements;
* a bucket closes once it holds at least ``bucket_size`` elements (no bucketing on PP stages > 0,
  on VPP chunks > 0, or without overlapped gradient reduction); the next bucket starts on a
  multiple of lcm(DP, 128);
* with tied embeddings and PP > 1, the embedding (first stage) / output layer (last stage) gets a
  bucket of its own.

The rebuilt total must equal the file's ``numel_unpadded``: that checks order, bucket size and
alignment at once, and any mismatch is an error rather than silently shifted state.
"""

from __future__ import annotations

import math
import os
from typing import Any

from ckpt_ir.errors import FormatError
from ckpt_ir.io.safe_pickle import TensorRef, TorchDtype
from ckpt_ir.io.torchzip import TorchZip, iter_tensors
from ckpt_ir.ir import expr as E

ALIGN = 64


def param_offsets(params: list[tuple[str, int]], bucket_size: int | None, dp: int,
                  shared: frozenset[str] = frozenset()) -> tuple[dict[str, int], int]:
    """Offset of each parameter in the coalesced buffers, and the total (``numel_unpadded``)."""
    def round_up(n: int, m: int) -> int:
        return -(-n // m) * m

    bucket_align = math.lcm(dp, 128)
    offsets: dict[str, int] = {}
    base = bucket_start = cursor = 0
    open_bucket = False
    end = 0
    for name, numel in reversed(params):
        start = round_up(cursor, ALIGN)
        if name in shared and open_bucket:  # the shared parameter starts a bucket of its own
            base += start - bucket_start
            bucket_start = start = round_up(start, bucket_align)
        end = start + numel
        offsets[name] = base + start - bucket_start
        open_bucket = True
        if name in shared or (bucket_size is not None and end - bucket_start >= bucket_size):
            base += end - bucket_start
            bucket_start = cursor = round_up(end, bucket_align)
            open_bucket = False
        else:
            cursor = end
    if open_bucket:
        base += end - bucket_start
    return offsets, base


def bucket_size_for(args: dict[str, Any], stage: int, chunk: int, dp: int) -> int | None:
    """DDP's bucket size on one stage / chunk (Megatron disables bucketing beyond the first)."""
    if stage > 0 or chunk > 0 or not args.get("overlap_grad_reduce"):
        return None
    size = args.get("ddp_bucket_size")
    return int(size) if size else max(40_000_000, 1_000_000 * dp)


def state_exprs(rank_file: str, z: TorchZip, args: dict[str, Any], stage: int, pp: int, which: str,
                dp: int | None = None) -> dict[tuple[str, str], E.Expr]:
    """(model chunk key, tensor key) -> expression of its fp32 ``which`` state (TP-local shape)."""
    path = os.path.join(os.path.dirname(rank_file), "distrib_optim.pt")
    if not os.path.isfile(path):
        raise FormatError(f"{os.path.dirname(rank_file)}: no distrib_optim.pt; the checkpoint has no "
                          f"distributed-optimizer state (use the model weights instead)")
    opt = TorchZip(path)
    state = opt.obj
    if isinstance(state, list):
        raise FormatError(f"{path}: separate dense/expert optimizer states are not supported yet")
    if not isinstance(state, dict) or not state.get("buckets_coalesced"):
        raise FormatError(f"{path}: an older (per-bucket, Megatron-Core < 0.7) optimizer layout; re-save it with a "
                          f"current Megatron-Core")
    dp = dp or args.get("data_parallel_size")
    if not isinstance(dp, int) or dp < 1:
        raise FormatError(f"{rank_file}: args do not record data_parallel_size; pass --dp")
    tied = not args.get("untie_embeddings_and_output_weights", True)
    chunk_keys = sorted(k for k in z.obj if k == "model" or (k.startswith("model") and k[5:].isdigit()))
    out: dict[tuple[str, str], E.Expr] = {}
    for index, ck in enumerate(chunk_keys):
        groups = state.get(index)
        if not isinstance(groups, dict) or len(groups) != 1:
            raise FormatError(f"{path}: expected one dtype group for model chunk {index}, found "
                              f"{len(groups) if isinstance(groups, dict) else 0}")
        (dtypes, entry), = groups.items()
        if not all(isinstance(d, TorchDtype) for d in dtypes):
            raise FormatError(f"{path}: unexpected dtype key {dtypes!r}")
        params = [(k, math.prod(ref.shape)) for k, ref in iter_tensors(z.obj[ck]) if not k.endswith("._extra_state")]
        shapes = {k: ref.shape for k, ref in iter_tensors(z.obj[ck])}
        shared = set()
        if tied and pp > 1:
            if stage == 0 and index == 0:
                shared.add("embedding.word_embeddings.weight")
            if stage == pp - 1 and index == len(chunk_keys) - 1:
                shared.add("output_layer.weight")
        size = bucket_size_for(args, stage, index, dp)
        offsets, total = param_offsets(params, size, dp, frozenset(shared))
        if total != entry.get("numel_unpadded"):
            raise FormatError(f"{path}: the rebuilt parameter layout holds {total} elements but the file says "
                              f"{entry.get('numel_unpadded')} (chunk {index}); bucket size {size}, DP {dp} or the "
                              f"parameter order do not match how it was saved")
        ref = entry.get(which)
        if not isinstance(ref, TensorRef) or ref.dtype != "F32":
            raise FormatError(f"{path}: no fp32 {which!r} state in chunk {index}")
        flat = opt.load_expr(ref, f"{index}.{which}")
        if flat.shape[0] < total:
            raise FormatError(f"{path}: {which} holds {flat.shape[0]} elements, fewer than the layout's {total}")
        for key, numel in params:
            off = offsets[key]
            out[(ck, key)] = E.simplify(E.Reshape(E.Slice(flat, 0, off, off + numel), shapes[key]))
    return out
