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
import re
from typing import Any

import attrs

from ckpt_ir.errors import FormatError, VerifyError, setting
from ckpt_ir.io.safe_pickle import TensorRef, TorchDtype
from ckpt_ir.io.torchzip import TorchZip, iter_tensors
from ckpt_ir.ir import expr as E

ALIGN = 64

# Megatron-Core's parameter registration order (named_parameters(), which DDP walks backwards)
# within a transformer layer, for the local and Transformer-Engine specs.  It is not the key
# order of every rank file (MindSpeed-LLM and ckpt-ir write linear_qkv before linear_proj), so
# the layout is built from this order, not from the file.
_NORM = ("weight", "bias")
_TE_LINEAR = ("layer_norm_weight", "layer_norm_bias", "weight", "bias")  # TE's fused norm comes first
_ATTENTION = (
    ("self_attention.linear_proj", ("weight", "bias")),
    ("self_attention.linear_qkv", _TE_LINEAR),
    ("self_attention.q_layernorm", _NORM),
    ("self_attention.k_layernorm", _NORM),
)
# megatron-core's MLASelfAttention (multi_latent_attention.py): MultiLatentAttention registers
# linear_proj, then the projections q (or q_down, q_up), kv_down, kv_up, then the q / kv norms
# (IdentityOp with TE, whose up-projections carry them as layer_norm_weight).  MindSpeed-LLM's
# fused linear_qkv is not in it: its modules' order is not known here.
_MLA_ATTENTION = (
    ("self_attention.linear_proj", ("weight", "bias")),
    ("self_attention.linear_q_proj", ("weight",)),
    ("self_attention.linear_q_down_proj", ("weight",)),
    ("self_attention.linear_q_up_proj", _TE_LINEAR),
    ("self_attention.linear_kv_down_proj", ("weight",)),
    ("self_attention.linear_kv_up_proj", _TE_LINEAR),
    ("self_attention.q_layernorm", _NORM),
    ("self_attention.kv_layernorm", _NORM),
)
_MLP = (
    ("pre_mlp_layernorm", _NORM),
    ("mlp.linear_fc1", _TE_LINEAR),
    ("mlp.linear_fc2", ("weight", "bias")),
    # MoE layer: router, experts (grouped weight1/weight2, or local_experts.{j}), shared experts
    ("mlp.router", ("weight", "bias")),
    ("mlp.experts", ("weight1", "weight2")),
    (
        "mlp.experts.local_experts.*",
        ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias"),
    ),
    (
        "mlp.shared_experts",
        ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias", "gate_weight"),
    ),
)


def _order(modules) -> dict[str, int]:
    keys = [f"{m}.{p}" for m, ps in (("input_layernorm", _NORM), *modules) for p in ps]
    return {k: i for i, k in enumerate(keys)}


_LAYER_RANK = _order(_ATTENTION + _MLP)
_MLA_LAYER_RANK = _order(_MLA_ATTENTION + _MLP)
_MLA_ONLY = {k for k in _MLA_LAYER_RANK if k not in _LAYER_RANK}
# GPTModel registers embedding, decoder (layers, final norm), mtp, output_layer
_TOP_RANK = {
    "embedding.word_embeddings.weight": (0,),
    "embedding.position_embeddings.weight": (0, 1),  # LanguageModelEmbedding registers it second
    "decoder.final_layernorm.weight": (2,),
    "decoder.final_layernorm.bias": (3,),
    "output_layer.weight": (5,),
}
# megatron-core's MultiTokenPredictionLayer (mtp.layers.<k>.): enorm, hnorm, eh_proj, its
# transformer_layer, final_layernorm (MindSpeed-LLM's mtp.final_layernorms.<k> is not in it)
_MTP_RANK = {"enorm.weight": 0, "hnorm.weight": 1, "eh_proj.weight": 2, "final_layernorm.weight": 4}
_MTP_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def is_buffer(key: str) -> bool:
    """State-dict entries that are not parameters (no optimizer state): TE's ``_extra_state`` and
    the router's ``expert_bias`` (a buffer updated from token counts)."""
    return key.endswith(("._extra_state", ".router.expert_bias"))


def is_expert_param(key: str) -> bool:
    """Expert weights (DDP's ``allreduce=False``): their own buffers and optimizer."""
    return ".mlp.experts." in key


def registration_order(keys: list[str]) -> list[str] | None:
    """``keys`` (parameters of one model chunk) in Megatron-Core's registration order, or None when
    a key is not a GPT parameter whose place is known (:func:`unplaced`).  A layer with any of
    megatron-core's own multi-latent-attention modules is ordered as an MLA layer."""
    ranks, _ = _ranks(keys)
    return None if ranks is None else sorted(keys, key=lambda k: ranks[k])


def unplaced(keys: list[str]) -> str | None:
    """Why :func:`registration_order` cannot order ``keys``: the first key whose place is not
    known, and the MLA module that decided its layer's order when that made it unknown."""
    return _ranks(keys)[1]


def _ranks(keys: list[str]) -> tuple[dict[str, tuple] | None, str | None]:
    """(each key's rank in the registration order, None), or (None, why one key has none)."""
    ranks: dict[str, tuple] = {}
    layers: dict[tuple, list[tuple[str, str]]] = {}  # (top rank prefix) -> [(key, key in the layer)]
    for key in keys:
        if key in _TOP_RANK:
            ranks[key] = _TOP_RANK[key]
            continue
        parts = key.split(".", 3)
        m = _MTP_LAYER.match(key)
        if m:
            k, rest = int(m.group(1)), m.group(2)
            if rest in _MTP_RANK:
                ranks[key] = (4, k, _MTP_RANK[rest])
            elif rest.startswith("transformer_layer."):
                layers.setdefault((4, k, 3), []).append((key, rest[len("transformer_layer.") :]))
            else:
                return None, key
        elif len(parts) == 4 and parts[:2] == ["decoder", "layers"] and parts[2].isdigit():
            layers.setdefault((1, int(parts[2])), []).append((key, parts[3]))
        else:
            return None, key
    for prefix, members in layers.items():
        mla = next((key for key, r in members if r in _MLA_ONLY), None)
        table = _LAYER_RANK if mla is None else _MLA_LAYER_RANK
        for key, rest in members:
            expert = 0
            m = _LOCAL_EXPERT.match(rest)
            if m:
                rest, expert = f"mlp.experts.local_experts.*.{m.group(2)}", int(m.group(1))
            if rest not in table:
                return (
                    None,
                    key if mla is None else f"{key} (in a layer with megatron-core's MLA module {mla})",
                )
            # local experts come expert by expert (fc1, fc2 of expert 0, then of expert 1, ...)
            place = table["mlp.experts.local_experts.*.linear_fc1.weight"] if m else table[rest]
            ranks[key] = prefix + (place, expert, table[rest])
    return ranks, None


@attrs.frozen
class Generation:
    """How one generation of Megatron-Core laid out the buffers."""

    name: str
    align: int  # each parameter starts on a multiple of this many elements
    pad_128: bool  # buckets end on a multiple of lcm(DP, 128) (else of DP)
    coalesced: bool  # the file holds the buckets concatenated without end padding


CURRENT = Generation("Megatron-Core >= 0.8", ALIGN, True, True)
V07 = Generation("Megatron-Core 0.7", 1, True, True)
PER_BUCKET = Generation("Megatron-Core 0.5-0.6", 1, False, False)


@attrs.frozen
class BufferLayout:
    offsets: dict[str, int]  # where each parameter starts in the coalesced buffer
    total: int  # numel_unpadded of the coalesced buffer
    in_bucket: dict[str, tuple[int, int]]  # (bucket, offset in the bucket) of each parameter
    bucket_sizes: tuple[int, ...]  # per bucket, elements without the end padding


def param_offsets(
    params: list[tuple[str, int]],
    bucket_size: int | None,
    dp: int,
    shared: frozenset[str] = frozenset(),
    gen: Generation = CURRENT,
) -> BufferLayout:
    """Where each parameter (registration order, with its element count) sits in the buffers."""

    def round_up(n: int, m: int) -> int:
        return -(-n // m) * m

    bucket_align = math.lcm(dp, 128) if gen.pad_128 else dp
    offsets: dict[str, int] = {}
    in_bucket: dict[str, tuple[int, int]] = {}
    sizes: list[int] = []
    base = bucket_start = cursor = 0
    open_bucket = False
    end = 0
    for name, numel in reversed(params):
        start = round_up(cursor, gen.align)
        if name in shared and open_bucket:  # the shared parameter starts a bucket of its own
            sizes.append(start - bucket_start)  # (0.8-0.19 count the alignment gap in the last bucket)
            base += start - bucket_start
            bucket_start = start = round_up(start, bucket_align)
        end = start + numel
        offsets[name] = base + start - bucket_start
        in_bucket[name] = (len(sizes), start - bucket_start)
        open_bucket = True
        if name in shared or (bucket_size is not None and end - bucket_start >= bucket_size):
            sizes.append(end - bucket_start)
            base += end - bucket_start
            bucket_start = cursor = round_up(end, bucket_align)
            open_bucket = False
        else:
            cursor = end
    if open_bucket:
        sizes.append(end - bucket_start)
        base += end - bucket_start
    return BufferLayout(offsets, base, in_bucket, tuple(sizes))


def bucket_size_for(args: dict[str, Any], stage: int, chunk: int, dp: int) -> int | None:
    """DDP's bucket size on one stage / chunk (Megatron disables bucketing beyond the first)."""
    if stage > 0 or chunk > 0 or not args.get("overlap_grad_reduce"):
        return None
    size = args.get("ddp_bucket_size")
    return int(size) if size else max(40_000_000, 1_000_000 * dp)


STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def chunk_keys(obj: dict) -> list[str]:
    """``model`` or ``model0``, ``model1``, ... (one per virtual-pipeline chunk), in chunk order."""
    keys = [k for k in obj if k == "model" or (k.startswith("model") and k[5:].isdigit())]
    return sorted(keys, key=lambda k: -1 if k == "model" else int(k[5:]))


def shared_params(tied: bool, stage: int, pp: int, chunk: int, chunks: int) -> frozenset[str]:
    """The tied embedding / output layer that DDP puts in a bucket of its own (PP > 1 only)."""
    shared = set()
    if tied and pp > 1:
        if stage == 0 and chunk == 0:
            shared.add("embedding.word_embeddings.weight")
        if stage == pp - 1 and chunk == chunks - 1:
            shared.add("output_layer.weight")
    return frozenset(shared)


def read_state(
    rank_file: str,
    z: TorchZip,
    args: dict[str, Any],
    stage: int,
    pp: int,
    dp: int | None = None,
    align: int | None = None,
) -> tuple[dict[str, dict[tuple[str, str], E.Expr]], tuple]:
    """The fp32 optimizer state of one rank directory: {state key: {(model chunk key, tensor key):
    expression in the TP-local shape}}, and the buffers' (param dtype, grad dtype) key.

    With experts the file is a list ``[dense, expert]`` (two optimizers with their own buffers and
    data-parallel groups); an entry is None in directories whose rank did not save it (the dense
    state lives in the EP rank 0 directories only)."""
    path = os.path.join(os.path.dirname(rank_file), "distrib_optim.pt")
    if not os.path.isfile(path):
        raise FormatError(
            f"{os.path.dirname(rank_file)}: no distrib_optim.pt; the checkpoint has no "
            f"distributed-optimizer state (use the model weights instead, or {setting('optimizer', False)})"
        )
    opt = TorchZip(path)
    dp = dp or args.get("data_parallel_size")
    if not isinstance(dp, int) or dp < 1:
        raise FormatError(
            f"{rank_file}: args do not record data_parallel_size; the optimizer layout depends on it"
        )
    out: dict[str, dict[tuple[str, str], E.Expr]] = {k: {} for k in STATE_KEYS}
    groups: list[tuple[Any, int, bool | None]]  # (state, its DP size, experts only / dense only / all)
    if isinstance(opt.obj, list):
        if len(opt.obj) != 2:
            raise FormatError(
                f"{path}: {len(opt.obj)} optimizer states; expected [dense, expert] (a split first "
                f"chunk from --overlap-param-gather-with-optimizer-step is not supported)"
            )
        groups = [(opt.obj[0], dp, False), (opt.obj[1], expert_dp(args, dp), True)]
    else:
        groups = [(opt.obj, dp, None)]
    dtype_key: tuple = ()
    for state, group_dp, experts in groups:
        if state is not None:
            dtype_key = _read_group(path, opt, state, z, args, stage, pp, group_dp, experts, out, align)
    return out, dtype_key


def expert_dp(args: dict[str, Any], dp: int) -> int:
    """Data-parallel size of the expert optimizer: the ranks of one (TP x DP) group holding the
    same experts, i.e. TP * DP / (expert TP * EP)."""
    tp = args.get("tensor_model_parallel_size") or 1
    ep = args.get("expert_model_parallel_size") or 1
    etp = args.get("expert_tensor_parallel_size") or tp
    return max(1, tp * dp // (etp * ep))


def _read_group(
    path: str,
    opt: TorchZip,
    state: Any,
    z: TorchZip,
    args: dict[str, Any],
    stage: int,
    pp: int,
    dp: int,
    experts: bool | None,
    out: dict,
    align: int | None = None,
) -> tuple:
    """Read one optimizer's state (``experts``: only expert / only dense parameters; None: all)."""
    if not isinstance(state, dict) or not (state.get("buckets_coalesced") or "per_bucket_numel" in state):
        raise FormatError(
            f"{path}: not a distributed-optimizer state Megatron-Core wrote (neither the coalesced nor "
            f"the per-bucket layout)"
        )
    gens: tuple[Generation, ...] = (CURRENT, V07) if state.get("buckets_coalesced") else (PER_BUCKET,)
    if align is not None:  # the user knows the alignment: do not try the other generation
        gens = tuple(attrs.evolve(g, align=align) for g in gens[:1])
    tied = not args.get("untie_embeddings_and_output_weights", True)
    chunks = chunk_keys(z.obj)
    dtype_key: tuple = ()
    for index, ck in enumerate(chunks):
        groups = state.get(index)
        if not isinstance(groups, dict) or len(groups) != 1:
            raise FormatError(
                f"{path}: expected one dtype group for model chunk {index}, found "
                f"{len(groups) if isinstance(groups, dict) else 0}"
            )
        ((dtype_key, entry),) = groups.items()
        if isinstance(dtype_key, TorchDtype):  # Megatron-Core 0.5 keys the group by the gradient dtype alone
            dtype_key = (dtype_key, dtype_key)
        if not (isinstance(dtype_key, tuple) and all(isinstance(d, TorchDtype) for d in dtype_key)):
            raise FormatError(f"{path}: unexpected dtype key {dtype_key!r}")
        shapes = {
            k: ref.shape
            for k, ref in iter_tensors(z.obj[ck])
            if not is_buffer(k) and (experts is None or is_expert_param(k) == experts)
        }
        # a file Megatron wrote lists parameters in registration order; others may not
        order = registration_order(list(shapes)) or list(shapes)
        params = [(k, math.prod(shapes[k])) for k in order]
        size = bucket_size_for(args, stage, index, dp)
        shared = shared_params(tied, stage, pp, index, len(chunks)) if not experts else frozenset()
        if gens[0].coalesced:
            saved: Any = entry.get("numel_unpadded")
            layouts = [(g, param_offsets(params, size, dp, shared, g)) for g in gens]
            found = [(g, lay) for g, lay in layouts if lay.total == saved]
            rebuilt: int | list[int] = layouts[0][1].total
        else:
            per_bucket = state.get("per_bucket_numel_unpadded")
            saved = (
                list(next(iter(per_bucket[index].values())))
                if isinstance(per_bucket, list)
                and len(per_bucket) > index
                and isinstance(per_bucket[index], dict)
                and per_bucket[index]
                else None
            )
            lay = param_offsets(params, size, dp, shared, PER_BUCKET)
            found = [(PER_BUCKET, lay)] if list(lay.bucket_sizes) == saved else []
            rebuilt = list(lay.bucket_sizes)
        if not found:
            raise FormatError(
                f"{path}: the rebuilt parameter layout holds {rebuilt} elements but the file says "
                f"{saved} (chunk {index}); bucket size {size}, DP {dp} or the parameter order do not "
                f"match how it was saved (correct args with "
                + " / ".join(setting(f"optimizer_layout[{k!r}]") for k in ("dp", "bucket_size", "align"))
                + ")"
            )
        gen, lay = found[0]
        for which in STATE_KEYS:
            value = entry.get(which)
            buckets = value if isinstance(value, list) and not gen.coalesced else [value]
            if not all(isinstance(r, TensorRef) and r.dtype == "F32" for r in buckets):
                raise FormatError(f"{path}: no fp32 {which!r} state in chunk {index}")
            flats = [opt.load_expr(r, f"{index}.{which}.{b}") for b, r in enumerate(buckets)]
            want = [lay.total] if gen.coalesced else list(lay.bucket_sizes)
            if len(flats) != len(want) or any(
                f.shape[0] < n or len(f.shape) != 1 for f, n in zip(flats, want)
            ):
                raise FormatError(
                    f"{path}: {which} holds {[f.shape for f in flats]} elements, not the layout's {want}"
                )
            for key, numel in params:
                bucket, off = (0, lay.offsets[key]) if gen.coalesced else lay.in_bucket[key]
                piece = E.Slice(flats[bucket], 0, off, off + numel)
                out[which][(ck, key)] = E.simplify(E.Reshape(piece, shapes[key]))
    return dtype_key


def flat_state(
    params: list[tuple[str, E.Expr]], bucket_size: int | None, dp: int, shared: frozenset[str] = frozenset()
) -> E.Expr:
    """The coalesced 1-D buffer Megatron's distributed optimizer saves for one model chunk:
    ``params`` (Megatron keys, each with the state of that parameter) laid out by
    :func:`param_offsets` in registration order, alignment gaps zero.  A concatenation along
    dim 0, so it is written piece by piece."""
    if not params:
        raise VerifyError(
            "optimizer state: a model chunk without parameters for this optimizer (e.g. a pipeline "
            f"stage without MoE layers) is not supported; convert with {setting('optimizer', False)}"
        )
    order = registration_order([k for k, _ in params])
    if order is None:
        raise VerifyError(
            f"optimizer state: Megatron's parameter order for {unplaced([k for k, _ in params])} is not known to ckpt-ir, "
            f"so its place in distrib_optim.pt cannot be derived; convert with {setting('optimizer', False)}"
        )
    exprs = dict(params)
    params = [(k, exprs[k]) for k in order]
    lay = param_offsets([(k, e.numel) for k, e in params], bucket_size, dp, shared)
    offsets, total = lay.offsets, lay.total
    placed = sorted(((offsets[k], k, e) for k, e in params), key=lambda x: x[0])
    pieces = []
    for i, (off, _, e) in enumerate(placed):
        end = placed[i + 1][0] if i + 1 < len(placed) else total
        flat = E.Reshape(e, (e.numel,))
        pieces.append(E.simplify(E.PadRows(flat, end - off, zero=True) if end - off > e.numel else flat))
    return pieces[0] if len(pieces) == 1 else E.simplify(E.Concat(tuple(pieces), 0))


def apply_overrides(
    args: dict[str, Any], dp: int | None = None, bucket_size: int | None = None
) -> dict[str, Any]:
    """``args`` with the user's corrections of how the optimizer state was laid out: the source's
    data-parallel size, and its DDP bucket size (0: one bucket, i.e. no overlapped reduction)."""
    args = dict(args)
    if dp is not None:
        args["data_parallel_size"] = dp
    if bucket_size is not None:
        args["overlap_grad_reduce"] = bucket_size > 0
        args["ddp_bucket_size"] = bucket_size or None
    return args


# Megatron args that say how the optimizer state is laid out, or where training resumes
RESUME_ARGS = (
    "data_parallel_size",
    "overlap_grad_reduce",
    "ddp_bucket_size",
    "use_distributed_optimizer",
    "consumed_train_samples",
    "skipped_train_samples",
    "consumed_valid_samples",
    "train_iters",
    "train_samples",
    "global_batch_size",
    "micro_batch_size",
    "seed",
    "lr",
    "min_lr",
)


def training_args(args: dict[str, Any]) -> dict[str, Any]:
    """The source run's arguments that a resumed run needs, under ``"args"``."""
    return {"args": {k: args[k] for k in RESUME_ARGS if isinstance(args.get(k), (int, float, bool))}}
