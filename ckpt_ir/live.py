"""Live weights: a training job's Megatron-Core model chunks as HF tensors in memory, and back,
without writing files (the weight sync of reinforcement-learning frameworks: Megatron training
ranks feed an inference engine that takes HF names and whole tensors)::

    from ckpt_ir.live import export_hf, load_hf

    load_hf(models, "Qwen2.5-0.5B")              # start-up: HF weights into the Megatron chunks
    for name, tensor in export_hf(models):       # on every rank: every HF tensor, whole
        engine.load_weights([(name, tensor)])

``models`` are the model chunks a megatron-core job holds on this rank (one per virtual pipeline
stage, ``GPTModel`` however built, wrappers such as ``DistributedDataParallel`` allowed).  Both
functions are collective: every rank of the job calls them, and consumes ``export_hf``'s iterator
to the end.  Communication uses the model's own groups from megatron-core's ``parallel_state``
(one ``all_gather_object`` of the parameters' names and shapes over the default group, then
broadcasts within the tensor-, expert- and pipeline-parallel groups), on the model's device: gloo
on CPU, NCCL on GPU, where tensors stay until the caller moves them.

The mappings are the file conversions' own: the job's chunks are lifted as the Megatron frontend
lifts rank files (every rank's tensors, each a lazy leaf "TP rank t, stage p, EP rank e, chunk v,
key k"), the same passes and HF backend name and shape the HF tensors, and only the leaves a
tensor needs are fetched (see docs/live.md).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from ckpt_ir import api
from ckpt_ir.errors import CkptIrError, CoverageError, FormatError, UsageError, setting
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.dtypes import from_torch, itemsize, to_torch
from ckpt_ir.ir.layout import Layout, expert_rank_files
from ckpt_ir.megatron import keys as M
from ckpt_ir.megatron import model as MM

__all__ = ["export_hf", "load_hf"]

DEFAULT_BUCKET = 1 << 29  # bytes of gathered tensors alive at a time (512 MiB)
WHERE = "the model chunks"  # how errors name the model given to export_hf / load_hf
_LEAF = "live:"  # path prefix of the leaves that stand for the job's tensors


def export_hf(
    models: Any,
    hf_config: str | dict[str, Any] | None = None,
    *,
    bucket_bytes: int = DEFAULT_BUCKET,
    dtype: str | None = None,
    merge_lora: bool = True,
    lora_alpha: float | None = None,
) -> Iterator[tuple[str, Any]]:
    """Every HF tensor of the model the job's chunks hold, as ``(HF name, tensor)`` on every rank,
    in the order of the HF checkpoint ckpt-ir would write (canonical order), each whole: gathered
    over the tensor- and expert-parallel groups, broadcast from the pipeline stage that holds it.

    ``models``: this rank's model chunks (a list, one per virtual pipeline stage, or one model).
    ``hf_config``: an HF config directory or dict naming the family and the vocabulary (without
    padding), where the model's ``TransformerConfig`` is not enough (it is read like a
    Megatron-LM run's args; family inference as in ``convert``).  ``bucket_bytes``: at most this
    many bytes of gathered tensors are alive at a time (or one tensor's parts, when they are
    more); tensors are fetched a bucket at a time.  ``dtype``: cast floating tensors to ``"bf16"``,
    ``"fp16"`` or ``"fp32"`` (None keeps the model's).  LoRA adapters in the model
    (``X.lora_A.default.weight`` / ``X.lora_B.default.weight`` beside ``X.weight``) are merged
    when ``merge_lora`` (fp32, rounded once; ``lora_alpha`` gives their alpha), else only the
    adapter is yielded, under PEFT's names.

    A yielded tensor is on the model's device and may share memory with a parameter: read it or
    copy it, do not modify it.  Every rank must consume the iterator to the end (the ranks meet
    in collectives along the way)."""
    if bucket_bytes < 1:
        raise UsageError(f"bucket_bytes={bucket_bytes!r}: give a positive number of bytes")
    job = _Job.of(models)
    ckpt = job.lift(_config(hf_config), lora_alpha)
    to = "hf" if merge_lora or ckpt.spec.lora_rank is None else "peft"
    target = api.Target(to=to, dtype=dtype, lora_alpha=lora_alpha)
    out = api.run(ckpt, api.derive_pipeline(ckpt, target))
    plan = api.plan(out, target)
    tensors = [t for f in plan.files if f.kind == "safetensors" for t in f.tensors]
    return job.stream(tensors, bucket_bytes)


def load_hf(
    models: Any,
    source: str | os.PathLike | Iterable[tuple[str, Any]],
    hf_config: str | dict[str, Any] | None = None,
) -> None:
    """Fill this rank's shards of the model chunks ``models`` (as for :func:`export_hf`) from an HF
    checkpoint: ``source`` is its directory or Hub id (lifted lazily: each rank reads only the
    tensors its shards need, only their rows where a shard is a range of rows) or an iterable of
    ``(HF name, tensor)`` pairs (each rank keeps a pair only while a shard it owns still waits
    for another; any order).  ``hf_config``: the HF config (a directory or dict) describing the
    model instead of the directory's own, or of the pairs (default for pairs: the model's
    ``TransformerConfig``, read as for :func:`export_hf`).  Every parameter and persistent buffer
    of the chunks is written (cast to its dtype, as ``load_state_dict`` does); a chunk key the HF
    model has no tensor for, a missing HF tensor or a shape that differs is an error naming it."""
    job = _Job.of(models)
    if isinstance(source, (str, os.PathLike)):
        src = api.load(os.fspath(source), hf_config=_config(hf_config))
        pairs = None
    else:
        src, pairs = job.symbolic_hf(_config(hf_config)), iter(source)
    target = job.target(src)
    out = api.run(src, api.derive_pipeline(src, target))
    api.check_target(out, target)
    wanted = job.local_exprs(out)
    if pairs is None:
        with E.Reader() as reader:
            for (v, key), expr in wanted.items():
                job.fill(v, key, E.evaluate(expr, reader))
    else:
        job.fill_from_pairs(wanted, src, pairs)


def _config(hf_config: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if hf_config is None or isinstance(hf_config, dict):
        return hf_config
    from ckpt_ir.frontends.hf import read_config

    return read_config(os.fspath(hf_config))


@attrs.frozen
class _Leaf:
    """Where a leaf's tensor lives: TP rank, stage, EP rank and chunk of the job."""

    tp: int
    pp: int
    ep: int
    chunk: int


@attrs.frozen(kw_only=True)
class _Job:
    """This rank's part of a megatron-core job: its chunks' tensors, its coordinates and groups,
    and (from every rank) the names, shapes and dtypes of all tensors and the layers of every
    (stage, chunk)."""

    chunks: list[Any]
    states: list[dict[str, Any]]  # this rank's state dict per chunk (tensors sharing the model's memory)
    rank: dict[str, int]  # this rank's coordinate in each group (tp, pp, ep, etp)
    size: dict[str, int]
    groups: dict[str, Any]
    device: Any
    tensors: dict[tuple[int, int, int], list[dict[str, tuple[tuple[int, ...], str]]]]
    layers: dict[tuple[int, int], list[int]]

    @classmethod
    def of(cls, models: Any) -> _Job:
        chunks = [MM.unwrap(m) for m in (models if isinstance(models, (list, tuple)) else [models])]
        if not chunks or not all(hasattr(c, "config") and hasattr(c, "state_dict") for c in chunks):
            raise UsageError(
                f"models: give this rank's megatron-core model chunks (a list of "
                f"GPTModel, one per virtual pipeline stage), got {type(models).__name__}"
            )
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        states = [
            {
                k: v
                for k, v in c.state_dict().items()
                if isinstance(v, torch.Tensor) and not k.endswith(M.EXTRA_STATE)
            }
            for c in chunks
        ]
        groups = {
            "tp": ps.get_tensor_model_parallel_group(),
            "pp": ps.get_pipeline_model_parallel_group(),
            "ep": ps.get_expert_model_parallel_group(),
            "etp": ps.get_expert_tensor_parallel_group(),
        }
        rank = {k: dist.get_rank(g) for k, g in groups.items()}
        size = {k: dist.get_world_size(g) for k, g in groups.items()}
        vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
        if vpp != len(chunks):
            raise UsageError(
                f"models: {len(chunks)} model chunk(s) given, but the virtual "
                f"pipeline size is {vpp}; give every chunk of this rank, in order"
            )
        device = next((v.device for sd in states for v in sd.values()), torch.device("cpu"))
        mine = {
            "at": (rank["tp"], rank["pp"], rank["ep"]),
            "tensors": [{k: (tuple(v.shape), from_torch(v.dtype)) for k, v in sd.items()} for sd in states],
            "layers": [MM.chunk_layers(c) for c in chunks],
        }
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        tensors: dict[tuple[int, int, int], Any] = {}
        layers: dict[tuple[int, int], list[int]] = {}
        for other in every:
            tensors.setdefault(tuple(other["at"]), other["tensors"])
            for v, held in enumerate(other["layers"]):
                layers[(other["at"][1], v)] = held
        return cls(
            chunks=chunks,
            states=states,
            rank=rank,
            size=size,
            groups=groups,
            device=device,
            tensors=tensors,
            layers=layers,
        )

    # -- the model --------------------------------------------------------------------------

    def layout(self) -> Layout:
        """The job's Megatron layout: parallel sizes from ``parallel_state``, layer placement from
        the chunks' layers, grouped-GEMM experts from the keys."""
        tp, pp = self.size["tp"], self.size["pp"]
        grouped = any(M.GROUPED_KEY.match(k) for sds in self.tensors.values() for sd in sds for k in sd)
        layout = Layout(
            format="mcore",
            tp=tp,
            pp=pp,
            ep=self.size["ep"],
            etp=None if self.size["etp"] == tp else self.size["etp"],
            fused_qkv=True,
            fused_gate_up=True,
            grouped_gemm=grouped,
            **MM.placement(self.layers, pp, len(self.chunks)),
        )
        want = {(t, p, e) for p in range(pp) for t, e in expert_rank_files(layout)}
        if set(self.tensors) != want:
            raise FormatError(
                f"{WHERE}: the ranks hold (TP, stage, EP) = {sorted(self.tensors)}, but TP={tp}, PP={pp}, "
                f"EP={layout.ep} with expert TP {layout.expert_tp} lays out {sorted(want)}"
            )
        return layout

    def spec(self, hf_config: dict[str, Any] | None, lora_alpha: float | None = None):
        """(ModelSpec, HF config, args, why) of the model, from its config read as Megatron-LM args
        (``why``: the family inferred from them, and why; None when ``hf_config`` names it)."""
        from ckpt_ir.megatron.lift import spec_from_args

        args = MM.args_from_model(self.chunks[0])
        if lora_alpha is not None:
            args["lora_alpha"] = lora_alpha
        where = f"{WHERE} (their TransformerConfig)"
        spec, cfg, why = spec_from_args(args, hf_config, where, config_name=setting("hf_config"))
        return spec, cfg, args, why

    def lift(self, hf_config: dict[str, Any] | None, lora_alpha: float | None) -> Checkpoint:
        """Every rank's tensors as a Megatron Checkpoint whose leaves are the job's tensors."""
        from ckpt_ir.frontends.mcore import lift_state_dicts

        spec, cfg, args, why = self.spec(hf_config, lora_alpha)
        if spec.vision is not None:
            raise UsageError(
                f"{setting('hf_config')}: {spec.family} is a vision-language model, whose live weights this "
                f"version does not map (its files do: ckpt-ir convert); give a text model's config"
            )
        ranks: dict[tuple[int, int, int], list[dict[str, E.Expr]]] = {
            at: [
                {
                    key: E.Load(f"{_LEAF}{at[0]}/{at[1]}/{at[2]}/{v}", key, shape, dtype, 0, "memory")
                    for key, (shape, dtype) in sd.items()
                }
                for v, sd in enumerate(chunks)
            ]
            for at, chunks in self.tensors.items()
        }
        meta = {"family_from_args": why} if why else {}
        return lift_state_dicts(
            MM.fuse_mla(ranks, spec), spec, self.layout(), where=WHERE, args=args, cfg=cfg, meta=meta
        )

    # -- export -----------------------------------------------------------------------------

    def stream(self, tensors: list[tuple[str, E.Expr]], bucket_bytes: int) -> Iterator[tuple[str, Any]]:
        """Evaluate ``tensors`` a bucket at a time: fetch the bucket's leaves (the same ones, in
        the same order, on every rank), compute and yield each tensor, drop the leaves."""
        replicated = _replicated(tensors)
        for bucket in _buckets(tensors, bucket_bytes):
            leaves = {(ld.path, ld.key): ld for _, expr in bucket for ld in E.loads(expr)}
            got = {at: self.fetch(ld, replicated) for at, ld in leaves.items()}
            for name, expr in bucket:
                overflow = E.Overflow()
                value = E.evaluate_tensor(
                    expr, lambda ld, got=got: got[(ld.path, ld.key)], overflow
                ).contiguous()
                if overflow.count:
                    raise FormatError(
                        f"{name}: {overflow.count} value(s) up to {overflow.max_abs:g} overflow {expr.dtype} "
                        f"(they would be infinite); export without {setting('dtype')}"
                    )
                yield name, value
                del value  # the next tensor is computed without this one (the caller's is the caller's)
            got.clear()  # the bucket's gathered tensors go (a yielded view keeps its own)

    def fetch(self, ld: E.Load, replicated: set[tuple[int, int, str, int | None]]) -> Any:
        """The tensor of leaf ``ld`` on this rank: on its stage, broadcast from the EP rank and the
        (expert) TP rank holding it (a replicated tensor is this rank's own copy); then broadcast
        from its stage over the pipeline group."""
        at = _where(ld)
        expert = MM.is_expert_key(ld.key)
        x = None
        if self.rank["pp"] == at.pp:
            x = self.states[at.chunk][ld.key]
            key = (at.pp, at.chunk, ld.key, at.ep if expert else None)
            if expert:
                x = self._broadcast(x, ld, "ep", at.ep)
            if key not in replicated:
                x = self._broadcast(x, ld, "etp" if expert else "tp", at.tp)
        return self._broadcast(x, ld, "pp", at.pp)

    def _broadcast(self, x: Any, ld: E.Load, group: str, src: int) -> Any:
        import torch
        import torch.distributed as dist

        if self.size[group] == 1:
            return x
        if self.rank[group] != src:
            x = torch.empty(ld.full_shape, dtype=to_torch(ld.dtype), device=self.device)
        g = self.groups[group]
        dist.broadcast(x, src=dist.get_global_rank(g, src), group=g)
        return x

    # -- load -------------------------------------------------------------------------------

    def target(self, src: Checkpoint) -> api.Target:
        """The Target that lays ``src`` out as the job holds it."""
        lay = self.layout()
        rows = self.chunks[0].vocab_size
        tp = lay.tp
        return api.Target(
            to="mcore",
            tp=tp,
            pp=lay.pp,
            vpp_layers=lay.vpp_layers,
            num_layer_list=lay.num_layer_list,
            ep=lay.ep,
            etp=lay.etp,
            grouped_gemm=lay.grouped_gemm,
            norm_names=_norm_names(self.tensors),
            # Megatron pads the vocabulary to a multiple of (divisor x TP): one that gives these rows
            vocab_divisible_by=rows // tp if rows != src.spec.vocab_size and rows % tp == 0 else None,
        )

    def local_exprs(self, out: Checkpoint) -> dict[tuple[int, str], E.Expr]:
        """(chunk, key) -> expression of every tensor of this rank's chunks in the laid-out
        ``out``; keys the chunks have and ``out`` lacks (or the reverse), or shapes that differ,
        are an error naming the first."""
        from ckpt_ir.backends.mcore import rank_state_dicts

        sds = rank_state_dicts(out, self.rank["pp"], self.rank["tp"], self.rank["ep"])
        wanted = {}
        for v, (sd, have) in enumerate(zip(sds, self.states)):
            shapes = {k: tuple(x.shape) for k, x in have.items()}
            sd = MM.split_mla(sd, out.spec, shapes, self.size["tp"], self.rank["tp"])
            missing = sorted(set(have) - set(sd))
            extra = sorted(set(sd) - set(have))
            if missing or extra:
                what = (
                    f"model key {missing[0]} has no tensor in the HF checkpoint"
                    if missing
                    else f"the HF checkpoint gives {extra[0]}, which the model lacks"
                )
                more = len(missing) + len(extra) - 1
                raise FormatError(
                    f"{WHERE}: chunk {v} does not match the HF model ({out.spec.family}): {what}"
                    + (f" (+{more} more)" if more else "")
                    + "; build the model from the checkpoint's config (or pass the right hf_config)"
                )
            for k, expr in sd.items():
                if expr.shape != shapes[k]:
                    raise FormatError(
                        f"{WHERE}: chunk {v} key {k} is {list(shapes[k])} but the HF checkpoint gives "
                        f"{list(expr.shape)}; build the model from the checkpoint's config"
                    )
                wanted[(v, k)] = expr
        return wanted

    def fill(self, chunk: int, key: str, value: Any) -> None:
        import torch

        with torch.no_grad():
            self.states[chunk][key].copy_(value)

    def symbolic_hf(self, hf_config: dict[str, Any] | None) -> Checkpoint:
        """The HF checkpoint of the model the chunks describe (``hf_config`` overriding), every
        canonical tensor a leaf named after itself, to be filled from pairs."""
        from ckpt_ir.ir.checkpoint import TensorNode
        from ckpt_ir.ir.roles import canonical_order, expected_names, expected_shape

        spec, cfg, _, _ = self.spec(hf_config)
        layout = Layout(format="hf")
        names = sorted(expected_names(spec, layout), key=canonical_order)
        tensors = {}
        for n in names:
            shape = expected_shape(spec, layout, n)
            assert shape is not None  # every expected name has a role with a shape
            tensors[n] = TensorNode.whole(n, E.Load(f"{_LEAF}hf", n, shape, spec.dtype, 0, "memory"))
        return Checkpoint(spec=spec, layout=layout, tensors=tensors, hf_config=cfg, source=WHERE)

    def fill_from_pairs(
        self, wanted: dict[tuple[int, str], E.Expr], hf: Checkpoint, pairs: Iterator[tuple[str, Any]]
    ) -> None:
        """Fill ``wanted`` (expressions over canonical leaves) as the pairs arrive: each HF tensor
        becomes its canonical tensors through the family's table; one is kept while a shard
        waiting for it remains, and a shard is computed once all its leaves are there."""
        from ckpt_ir.families import by_name
        from ckpt_ir.frontends.hf import map_tensors

        family = by_name(hf.spec.family)
        needs = {k: {ld.key for ld in E.loads(x)} for k, x in wanted.items()}
        users: dict[str, set[tuple[int, str]]] = defaultdict(set)
        for k, leaves in needs.items():
            for c in leaves:
                users[c].add(k)
        have: dict[str, Any] = {}
        seen: set[str] = set()
        for hf_name, tensor in pairs:
            if hf_name in seen:
                raise FormatError(f"{hf_name}: the pairs give this HF tensor twice")
            seen.add(hf_name)
            leaf = E.Load(f"{_LEAF}pair", hf_name, tuple(tensor.shape), from_torch(tensor.dtype), 0, "memory")
            key = family.table_key(hf_name, hf.spec, False)  # as the family's table names it
            try:
                nodes, _ = map_tensors(family, hf.spec, {key: leaf}, (), {key: hf_name})
            except CoverageError:
                raise FormatError(
                    f"{hf_name}: no tensor of a {family.name} model has this HF name; give the names its "
                    f"checkpoint files hold"
                ) from None
            for canon, node in nodes.items():
                if canon not in users:
                    continue
                if node.shape != hf.tensors[canon].shape:
                    raise FormatError(
                        f"{hf_name}: shape {list(tensor.shape)} does not fit {canon} "
                        f"{list(hf.tensors[canon].shape)} of the model; the pairs are of another model"
                    )
                have[canon] = E.evaluate_tensor(node.expr, lambda ld, t=tensor: t)
                for k in sorted(users[canon]):
                    if needs[k] <= have.keys():
                        self.fill(k[0], k[1], E.evaluate_tensor(wanted[k], lambda ld: have[ld.key]))
                        for c in needs.pop(k):
                            users[c].discard(k)
                            if not users[c]:
                                del users[c]
                                have.pop(c, None)
        if needs:
            (v, key), leaves = next(iter(needs.items()))
            lacking = [_hf_name(family, hf.spec, c) for c in sorted(leaves - have.keys())]
            raise FormatError(
                f"{WHERE}: chunk {v} key {key} needs {', '.join(lacking[:3])}, which the pairs did not give"
                + (f" (+{len(needs) - 1} more keys waiting)" if len(needs) > 1 else "")
                + "; pass every tensor of the HF checkpoint"
            )


def _hf_name(family: Any, spec: Any, canonical: str) -> str:
    """The HF name of a canonical tensor for messages (the canonical name when it has none)."""
    name = family.names.from_canonical(canonical)
    try:
        return family.table_key(name, spec, True) if name else canonical
    except CkptIrError:  # outside the HF layout: the canonical name says it
        return canonical


def _where(ld: E.Load) -> _Leaf:
    t, p, e, v = (int(x) for x in ld.path[len(_LEAF) :].split("/"))
    return _Leaf(t, p, e, v)


def _replicated(tensors: list[tuple[str, E.Expr]]) -> set[tuple[int, int, str, int | None]]:
    """(stage, chunk, key, EP rank of an expert key) of the tensors every (expert) TP rank holds
    a copy of: those whose leaves come from one TP rank only (a tensor split over TP takes a
    leaf from each)."""
    ranks: dict[tuple[int, int, str, int | None], set[int]] = defaultdict(set)
    for _, expr in tensors:
        for ld in E.loads(expr):
            at = _where(ld)
            ranks[(at.pp, at.chunk, ld.key, at.ep if MM.is_expert_key(ld.key) else None)].add(at.tp)
    return {k for k, ts in ranks.items() if len(ts) == 1}


def _buckets(tensors: list[tuple[str, E.Expr]], bucket_bytes: int) -> Iterator[list[tuple[str, E.Expr]]]:
    """Consecutive tensors whose leaves (whole, each counted once) fit ``bucket_bytes``; a tensor
    whose leaves alone exceed it starts a bucket of its own, which the tensors after it join while
    they need no other leaf (gate and up from one fused fc1)."""
    bucket: list[tuple[str, E.Expr]] = []
    leaves: set[tuple[str, str]] = set()
    size = 0
    for name, expr in tensors:
        mine = {(ld.path, ld.key): math.prod(ld.full_shape) * itemsize(ld.dtype) for ld in E.loads(expr)}
        more = sum(n for at, n in mine.items() if at not in leaves)
        if bucket and more and size + more > bucket_bytes:
            yield bucket
            bucket, leaves, size = [], set(), 0
            more = sum(mine.values())
        bucket.append((name, expr))
        leaves |= mine.keys()
        size += more
    if bucket:
        yield bucket


def _norm_names(tensors: dict[tuple[int, int, int], list[dict[str, Any]]]) -> str:
    from ckpt_ir.megatron.lift import norm_names

    keys = [k for sds in tensors.values() for sd in sds for k in sd]
    return norm_names(
        any(k.endswith(M.TE_QKV_NORM) for k in keys), any(k.endswith(M.TE_FC1_NORM) for k in keys)
    )
