"""Megatron-Core backend: one ``model_optim_rng.pt`` per (TP rank, PP stage, EP rank), streamed.

Expert ``e`` goes to EP rank ``e // (E/EP)`` as local expert ``e % (E/EP)``; with grouped GEMM the
local experts of a layer become ``mlp.experts.weight1`` / ``weight2``, raw memory views in
Megatron's layout: ``weight1`` is (E_loc, H, 2F/T) viewed as [H, E_loc*2F/T] with block e the
transpose of expert e's fc1 shard, ``weight2`` is (E_loc, F/T, H) viewed as [E_loc*F/T, H].
"""

from __future__ import annotations

import copy
import io
from collections import defaultdict

from ckpt_ir.backends.plan import OutputFile, Plan
from ckpt_ir.errors import VerifyError, setting
from ckpt_ir.families import by_name
from ckpt_ir.io import torchzip
from ckpt_ir.io.safe_pickle import TorchDtype
from ckpt_ir.io.side_files import side_file_name
from ckpt_ir.io.torchzip import Tensor
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.dtypes import torch_name
from ckpt_ir.ir.layout import MINDSPEED_MM_KEYS, expert_owner, expert_rank_files, has_gdn_modules, num_chunks
from ckpt_ir.megatron import args as megatron_args
from ckpt_ir.megatron import distopt
from ckpt_ir.megatron import keys as M
from ckpt_ir.megatron.ranks import Entry, entry_expr, rank_content


def plan(
    ckpt: Checkpoint,
    *,
    iteration: int | None = None,
    shared_copies: str = "check",
    dp: int | None = None,
    megatron_version: tuple[int, ...] | None = None,
) -> Plan:
    """``ckpt.states`` (optimizer state) becomes ``distrib_optim.pt`` beside each rank file, laid
    out for data-parallel size ``dp`` (default: the source's), plus the training entries.
    ``megatron_version``: the Megatron-Core release whose own multi-token-prediction names the rank
    files get (default: the source's naming, MindSpeed-LLM's for a source without one)."""
    spec, layout = ckpt.spec, ckpt.layout
    # MindSpeed-MM's canonical layout keeps the language model's q / k / v and gate / up apart
    apart = spec.vision is not None and layout.mm_keys == "mindspeed-canonical"
    if apart and (layout.fused_qkv or layout.fused_gate_up):
        raise VerifyError(
            f"MindSpeed-MM's canonical layout ({setting('mm_keys', 'mindspeed-canonical')}) keeps q/k/v and "
            f"gate/up apart; the pipeline must run unfuse-qkv and unfuse-gate-up"
        )
    if not apart and not (layout.fused_qkv and layout.fused_gate_up):
        raise VerifyError(
            "Megatron output needs fused QKV and gate/up; the pipeline must run fuse-qkv and fuse-gate-up"
        )
    content, where = rank_content(ckpt, mtp_naming(ckpt, megatron_version))
    chunks = num_chunks(spec, layout)
    family = by_name(spec.family)
    training = TrainingOutput(ckpt)
    args = megatron_args.build_args(
        spec,
        layout,
        ckpt.hf_config,
        family.mindspeed_names[0] if family.mindspeed_names else spec.family,
        source=training.source_args,
        hf_naming=ckpt.meta.get("hf_naming"),
    )
    it = iteration if iteration is not None else ckpt.meta.get("iteration", 1)
    # MindSpeed-MM's rank files (hf_to_mm.py save_by_vpp): the model and checkpoint_version only,
    # under release/; its loader reads nothing else
    mm = spec.vision is not None and layout.mm_keys in MINDSPEED_MM_KEYS
    if mm:
        it = "release"
        if ckpt.states:
            raise VerifyError(
                f"MindSpeed-MM's rank files ({setting('mm_keys', 'mindspeed')}) hold no optimizer state; pass "
                f"{setting('optimizer', False)} to leave it out"
            )
    optim = OptimizerOutput(ckpt, dp) if ckpt.states else None
    if optim is not None:
        args = optim.args(args)
    files: list[OutputFile] = []
    etp = layout.expert_tp
    extra = ExtraState(ckpt)
    for stage in range(layout.pp):
        # each rank file's entries (shared ones and its EP rank's experts), found once per stage
        # rather than by scanning every expert of the stage for each of the TP x EP rank files
        of_ep = {
            (chunk, ep): [e for e in content[(stage, chunk)] if e.ep is None or e.ep == ep]
            for chunk in range(chunks)
            for ep in range(layout.ep)
        }
        for rank, ep in expert_rank_files(layout):
            tensors: list[tuple[str, E.Expr]] = []
            models = {}
            for chunk in range(chunks):
                model_key = "model" if chunks == 1 else f"model{chunk}"  # the rank file's key
                sd = {}
                for entry in of_ep[(chunk, ep)]:
                    expr = entry_expr(ckpt.tensors, entry, _shard_rank(entry, rank, etp), layout.tp)
                    uid = f"{model_key}/{entry.key}"
                    tensors.append((uid, expr))
                    sd[entry.key] = Tensor(uid, expr.dtype, expr.shape)
                sd.update(
                    extra.entries(
                        stage, chunk, rank, ep, chunk == chunks - 1 and stage == layout.pp - 1, where, tensors
                    )
                )
                models[model_key] = sd
            obj = {"args": args, "checkpoint_version": 3.0, "iteration": it, **models}
            rank_dir = f"{M.iter_dir(it)}/{M.rank_dir(rank, stage, layout, ep, layout.ep)}"
            if mm:
                obj = {**models, "checkpoint_version": 3.0}
            else:
                obj.update(training.entries((rank, stage, ep), tensors))
            if optim is not None:
                obj.update(optim.training_entries(tensors))
                chunk_entries = [of_ep[(c, ep)] for c in range(chunks)]
                files.append(optim.file(f"{rank_dir}/{M.DISTOPT_FILE}", chunk_entries, stage, rank, ep))
            files.append(OutputFile(f"{rank_dir}/{M.RANK_FILE}", "torch", tuple(tensors), obj=obj))
    files.append(OutputFile(M.TRACKER, "text", text=str(it)))

    files.extend(hf_folder(ckpt))
    copies = tuple(_shared_copies(ckpt))
    dropped = {**ckpt.dropped, **training.dropped}
    dropped.update(extra.dropped)
    if optim is not None:
        dropped.update(optim.dropped)
    if shared_copies == "drop":  # MindSpeed-LLM's behaviour: Megatron's shared tensor is kept
        dropped.update(
            {
                name: f"stored once in Megatron (shared with {other}); not compared"
                for name, other, _, _ in copies
            }
        )
        copies = ()
    fixed = tuple(M.fixed_checks(spec, ckpt.tensors))
    dropped.update({name: f"not stored in Megatron: {what} (checked)" for name, what, _, _ in fixed})
    return Plan(tuple(files), dropped, checks=copies + fixed)


def hf_folder(ckpt: Checkpoint) -> list[OutputFile]:
    """The copies of ``ckpt``'s HF side files (tokenizer, generation config, chat template, remote
    code, config.json) in the ``hf/`` folder at the checkpoint's root, beside
    ``latest_checkpointed_iteration.txt``, in either format: Megatron reads only the tracker and
    the iteration directories, so it ignores the folder; an HF export restores them."""
    return [OutputFile(f"{M.MCORE_HF_DIR}/{side_file_name(f)}", "copy", source=f) for f in ckpt.aux_files]


class ExtraState:
    """Transformer Engine's ``_extra_state`` (FP8 scaling state of one module shard), carried into
    the module's new place (layer renumbered by the new PP/VPP split, expert by the new EP split)
    when that module shard is the same: same layers, (expert) TP size, expert storage and module
    types.  Otherwise listed as dropped: Transformer Engine starts its FP8 scaling afresh."""

    def __init__(self, ckpt: Checkpoint) -> None:
        info = ckpt.meta.get("extra_state") or {}
        self.ckpt, self.entries_by_layer = ckpt, defaultdict(list)
        self.dropped: dict[str, str] = {}
        if not info:
            return
        now = M.extra_state_layout(ckpt.spec, ckpt.layout)
        if info["layout"] != now:
            names = ("layers", "MTP layers", "TP", "expert TP", "grouped GEMM", "norm naming", "MLA keys")
            what = ", ".join(f"{n} {a} -> {b}" for n, a, b in zip(names, info["layout"], now) if a != b)
            self.dropped["*._extra_state"] = (
                f"Transformer-Engine _extra_state (FP8 metadata) of another module "
                f"layout ({what}); Transformer Engine starts it afresh"
            )
            return
        for (layer, key, expert, slot), value in info["entries"].items():
            self.entries_by_layer[layer].append((key, expert, slot, value))

    def entries(
        self,
        stage: int,
        chunk: int,
        rank: int,
        ep: int,
        last: bool,
        where: dict,
        tensors: list[tuple[str, E.Expr]],
    ) -> dict:
        """The ``_extra_state`` keys of one model chunk of one rank file (their tensors appended to ``tensors``)."""
        out = {}
        spec, layout = self.ckpt.spec, self.ckpt.layout
        places = [
            (layer, f"{M.LAYERS}{s.local}.")
            for layer, s in where.items()
            if (s.stage, s.chunk) == (stage, chunk)
        ]
        if (stage, chunk) == (0, 0) or last:
            places.append((None, ""))
        for layer, prefix in places:
            for key, expert, slot, value in self.entries_by_layer.get(layer, ()):
                if layer is None and not ((stage, chunk) == (0, 0) if key.startswith("embedding.") else last):
                    continue
                if expert is not None:
                    owner, local = expert_owner(spec, layout, expert)
                    if owner != ep:
                        continue
                    key = key.format(e=local)
                if slot != (0 if expert is not None and layout.expert_tp == 1 else rank):
                    continue
                full = prefix + key
                if not _writable(value) and not isinstance(value, io.BytesIO):
                    self.dropped[full] = (
                        "Transformer-Engine _extra_state holding objects ckpt-ir cannot write back"
                    )
                    continue
                out[full] = placeholders(value, f"extra/{stage}/{chunk}/{rank}/{ep}/{full}", tensors)
        return out


def rank_state_dicts(ckpt: Checkpoint, stage: int, rank: int, ep: int) -> list[dict[str, E.Expr]]:
    """The model chunks of the rank file :func:`plan` writes for TP rank ``rank``, pipeline stage
    ``stage`` and EP rank ``ep``: one state dict (key -> expression) per chunk, in writing order,
    without Transformer Engine's ``_extra_state``."""
    content, _ = rank_content(ckpt, mtp_naming(ckpt))
    layout = ckpt.layout
    return [
        {
            entry.key: entry_expr(ckpt.tensors, entry, _shard_rank(entry, rank, layout.expert_tp), layout.tp)
            for entry in content[(stage, chunk)]
            if entry.ep is None or entry.ep == ep
        }
        for chunk in range(num_chunks(ckpt.spec, layout))
    ]


def mtp_naming(ckpt: Checkpoint, megatron_version: tuple[int, ...] | None = None) -> M.MtpNames:
    """The multi-token-prediction names of the output: Megatron-Core release ``megatron_version``'s
    when given, else the source's naming (megatron-core's own with ``--mla-keys mcore`` or
    ``--gdn-keys mcore``, whose modules only megatron-core's names load with), else MindSpeed-LLM's."""
    if megatron_version is not None:
        return M.mtp_names(megatron_version)
    names = M.MTP_NAMES[ckpt.meta.get("mtp_names", M.MTP_MINDSPEED.name)]
    mcore = ckpt.layout.mla_keys == "mcore" or (
        ckpt.layout.gdn_keys == "mcore" and has_gdn_modules(ckpt.spec)
    )
    if mcore and names is M.MTP_MINDSPEED:
        return M.MTP_MCORE
    return names


class TrainingOutput:
    """What a resumed run needs besides weights and optimizer state, carried from a Megatron source
    whether or not the optimizer state is: its ``args`` (see ``build_args``), the LR scheduler,
    the FLOP counter, and each rank's RNG state when the (TP, PP, EP) grid is unchanged."""

    def __init__(self, ckpt: Checkpoint) -> None:
        meta = ckpt.meta.get("training") or ckpt.meta.get("optimizer") or {}  # torch_dist: with the optimizer
        self.meta, self.dropped = meta, {}
        args = meta.get("args") if "training" in ckpt.meta else None
        self.source_args = None if args is None else {k: v for k, v in args.items() if torchzip.writable(v)}
        for k in set(args or ()) - set(self.source_args or ()):
            self.dropped[f"args.{k}"] = "holds objects ckpt-ir cannot write back"
        same_ranks = meta.get("source_layout") == (ckpt.layout.tp, ckpt.layout.pp, ckpt.layout.ep)
        rng = meta.get("rng_state") or {}
        self.rng = rng if same_ranks else {}
        if not same_ranks and any(v is not None for v in rng.values()):
            self.dropped["rng_state"] = (
                "per-rank random-number state of another parallel layout: resume with --no-load-rng"
            )

    def entries(self, rank: tuple[int, int, int], tensors: list[tuple[str, E.Expr]]) -> dict:
        values = {
            "opt_param_scheduler": self.meta.get("opt_param_scheduler"),
            "rng_state": self.rng.get(rank),
            "num_floating_point_operations_so_far": self.meta.get("num_floating_point_operations_so_far"),
        }
        return _training_entries(values, tensors, self.dropped)


def _training_entries(values: dict, tensors: list[tuple[str, E.Expr]], dropped: dict[str, str]) -> dict:
    """Entries of ``model_optim_rng.pt`` besides the model; their tensors are appended to ``tensors``."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        if not _writable(value):
            dropped[key] = "holds objects ckpt-ir cannot write back"
            continue
        out[key] = placeholders(value, key, tensors)
    return out


class OptimizerOutput:
    """Distributed-optimizer state for the target layout: one ``distrib_optim.pt`` per rank
    directory (what data-parallel rank 0 saves: the whole buffers, coalesced over buckets), and
    the ``optimizer`` entry of ``model_optim_rng.pt``."""

    def __init__(self, ckpt: Checkpoint, dp: int | None) -> None:
        meta = ckpt.meta.get("optimizer") or {}
        self.ckpt, self.meta = ckpt, meta
        self.resume = dict(meta.get("args") or {})
        self.dp = dp or self.resume.get("data_parallel_size") or 1
        if ckpt.spec.mla and ckpt.layout.mla_keys != "mcore":
            # MindSpeed-LLM's fused linear_qkv is no module of megatron-core's: its place in the
            # buffers (the registration order) is unknown
            raise VerifyError(
                f"optimizer state of multi-latent attention is written only with megatron-core's own MLA "
                f"modules: pass {setting('mla_keys', 'mcore')}, or {setting('optimizer', False)} to leave it out"
            )
        missing = [k for k in distopt.STATE_KEYS if k not in ckpt.states]
        if missing:
            raise VerifyError(
                f"optimizer state lacks {', '.join(missing)}; Megatron's distributed optimizer needs "
                f"{', '.join(distopt.STATE_KEYS)}"
            )
        grad = (meta.get("dtype_key") or (None, TorchDtype("float32")))[1]
        self.dtype_key = (TorchDtype(torch_name(ckpt.spec.dtype)), grad)
        self.dropped: dict[str, str] = {}

    def args(self, args):
        args = copy.copy(args)
        old_dp = getattr(args, "data_parallel_size", None)
        for k, v in self.resume.items():
            setattr(args, k, v)
        if isinstance(getattr(args, "world_size", None), int) and isinstance(old_dp, int) and old_dp > 0:
            args.world_size = args.world_size // old_dp * self.dp
        args.data_parallel_size = self.dp
        args.use_distributed_optimizer = True
        return args

    def training_entries(self, tensors: list[tuple[str, E.Expr]]) -> dict:
        """The ``optimizer`` entry of ``model_optim_rng.pt`` (param groups, grad scaler)."""
        return _training_entries({"optimizer": self.meta.get("optimizer")}, tensors, self.dropped)

    def file(self, path: str, chunk_entries: list[list[Entry]], stage: int, rank: int, ep: int) -> OutputFile:
        """``distrib_optim.pt`` of one rank directory.  With experts it holds ``[dense, expert]``
        (two optimizers, each with its own buffers and data-parallel size), the dense entry None
        where the saving process is not dense-DP rank 0."""
        tensors: list[tuple[str, E.Expr]] = []
        if not self.ckpt.spec.num_experts:
            obj: object = self._state(chunk_entries, stage, rank, self.dp, False, "", tensors)
        else:
            layout = self.ckpt.layout
            ep_dp = distopt.expert_dp(
                {
                    "tensor_model_parallel_size": layout.tp,
                    "expert_model_parallel_size": layout.ep,
                    "expert_tensor_parallel_size": layout.expert_tp,
                },
                self.dp,
            )
            # the directory is saved by the process with expert-DP rank 0 of (TP rank, EP rank);
            # it also saves the dense state if it is dense-DP rank 0 (Megatron orders ranks TP
            # fastest, then EP / DP): process rank = expert-TP rank + expert TP x EP rank < TP
            writer = rank % layout.expert_tp + layout.expert_tp * ep
            dense = (
                self._state(chunk_entries, stage, rank, self.dp, False, "dense/", tensors)
                if writer < layout.tp
                else None
            )
            obj = [dense, self._state(chunk_entries, stage, rank, ep_dp, True, "expert/", tensors)]
        return OutputFile(path, "torch", tuple(tensors), obj=obj)

    def _state(
        self,
        chunk_entries: list[list[Entry]],
        stage: int,
        rank: int,
        dp: int,
        experts: bool,
        prefix: str,
        tensors: list[tuple[str, E.Expr]],
    ) -> dict:
        layout = self.ckpt.layout
        obj: dict = {"buckets_coalesced": True}
        for chunk, entries in enumerate(chunk_entries):
            bucket = distopt.bucket_size_for(self.resume, stage, chunk, dp)
            shared = (
                frozenset()
                if experts
                else distopt.shared_params(
                    self.ckpt.spec.tied_embeddings, stage, layout.pp, chunk, len(chunk_entries)
                )
            )
            mine = [
                e
                for e in entries
                if distopt.is_expert_param(e.key) == experts and not distopt.is_buffer(e.key)
            ]
            group: dict = {}
            for which in distopt.STATE_KEYS:
                params = [
                    (
                        e.key,
                        entry_expr(
                            self.ckpt.states[which], e, _shard_rank(e, rank, layout.expert_tp), layout.tp
                        ),
                    )
                    for e in mine
                ]
                flat = distopt.flat_state(params, bucket, dp, shared)
                uid = f"{prefix}{chunk}/{which}"
                tensors.append((uid, flat))
                group[which] = Tensor(uid, flat.dtype, flat.shape)
            group["numel_unpadded"] = group["param"].shape[0]
            obj[chunk] = {self.dtype_key: group}
        return obj


def _shard_rank(entry: Entry, rank: int, expert_tp: int) -> int:
    """The TP shard a rank holds: experts with expert TP = 1 are whole (shard 0)."""
    return rank if entry.ep is None or expert_tp > 1 else 0


def _writable(obj) -> bool:
    """Values ckpt-ir's writer can put back (plain values, Megatron stubs, tensors, numpy arrays)."""
    return torchzip.writable(obj, lambda v: isinstance(v, E.Expr))


def placeholders(obj, uid: str, tensors: list[tuple[str, E.Expr]]):
    """``obj`` with each tensor expression replaced by a placeholder naming its entry in ``tensors``."""
    if isinstance(obj, E.Expr):
        tensors.append((uid, obj))
        return Tensor(uid, obj.dtype, obj.shape)
    if isinstance(obj, dict):
        return {k: placeholders(v, f"{uid}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(placeholders(v, f"{uid}.{i}", tensors) for i, v in enumerate(obj))
    return obj


def _shared_copies(ckpt: Checkpoint):
    """Megatron's MTP shares the main output layer (and, within one stage, the embedding), so the
    HF copies are not stored: the plan checks they really are copies before writing."""
    for k in range(ckpt.spec.mtp_layers):
        layer = ckpt.spec.num_layers + k
        pairs = [("mtp.head", "lm_head.weight")]
        if ckpt.layout.pp == 1:
            pairs.append(("mtp.embed", "embed.weight"))
        for own, main in pairs:
            name = f"layers.{layer}.{own}.weight"
            if name in ckpt.tensors and main in ckpt.tensors:
                a, b = ckpt.tensors[name], ckpt.tensors[main]
                for sa, sb in zip(a.shards, b.shards):
                    if sa != sb:
                        yield (name, main, sa, sb)
