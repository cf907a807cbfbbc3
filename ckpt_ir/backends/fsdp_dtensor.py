"""Megatron-FSDP's ``fsdp_dtensor`` backend (``--to mcore --ckpt-format fsdp_dtensor``): the
checkpoint Megatron-LM loads with ``--use-megatron-fsdp --ckpt-format fsdp_dtensor``, at any
data-parallel (and TP / EP) size.

Written as Megatron-LM's own save and its ``checkpoint_inspector convert-torch-dist-to-fsdp-
dtensor`` lay it out (:mod:`ckpt_ir.megatron.fsdp`)::

    latest_checkpointed_iteration.txt
    iter_N/__0_K.distcp     one torch.save blob per entry (a whole tensor, or a value)
    iter_N/.metadata        torch.distributed.checkpoint Metadata naming each entry's file, written last

Model entries ``model.module.<key>``: the keys of the model's own state dict (module names: the
norms as the layer spec the args name builds them, ``local`` or Transformer Engine's), one per
layer (``decoder.layers.<i>.``), experts at global indices (SequentialMLP's
``mlp.experts.local_experts.<e>.*``; TEGroupedMLP's ``mlp.experts.linear_fc1.weight<e>`` with
``--moe-grouped-gemm``), the SwiGLU fc1 (``args.swiglu``) as its halves ``linear_fc1.weight_w``
(gate) and ``weight_v`` (up), multi-latent attention with Megatron-Core's own modules, an MTP
layer's transformer layer under ``mtp.layers.<k>.transformer_layer.`` (the name on disk that
Megatron-LM's fsdp_dtensor save and load map the module ``mtp_model_layer`` to), no
``_extra_state``.  Beside them, as bytes entries: ``args``, ``checkpoint_version``
(3.0), ``iteration``, and a Megatron source's ``opt_param_scheduler.*`` and
``num_floating_point_operations_so_far``.  Each tensor is one whole chunk (DCP reshards on
load); each entry is a file of its own, written in parallel and streamed.
"""

from __future__ import annotations

from ckpt_ir.backends.mcore import hf_folder
from ckpt_ir.backends.plan import OutputFile, Plan
from ckpt_ir.backends.torch_dist import check_whole, layer_entries, output_args
from ckpt_ir.errors import VerifyError, setting
from ckpt_ir.io.dcp import METADATA_FILE
from ckpt_ir.io.torchzip import Tensor
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.blocks import is_hybrid
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.layout import has_gdn_modules
from ckpt_ir.ir.names import split_layer
from ckpt_ir.megatron import fsdp
from ckpt_ir.megatron import keys as M


def plan(ckpt: Checkpoint, *, iteration: int | None = None) -> Plan:
    check_whole(ckpt, "fsdp_dtensor")
    if is_hybrid(ckpt.spec) or has_gdn_modules(ckpt.spec):
        kind = "hybrid (Mamba)" if is_hybrid(ckpt.spec) else "gated-delta-net"
        raise VerifyError(
            f"fsdp_dtensor output of a {kind} model ({ckpt.spec.family}) is not supported yet; "
            f"write {setting('ckpt_format', 'torch_dist')} or {setting('ckpt_format', 'torch')}"
        )
    if ckpt.states:
        raise VerifyError(
            "fsdp_dtensor output does not carry optimizer state yet; convert the weights only "
            f"({setting('optimizer', False)})"
        )
    args = output_args(ckpt, "fsdp_dtensor")
    stored = model_entries(ckpt, bool(getattr(args, "swiglu", False)))
    it = iteration if iteration is not None else ckpt.meta.get("iteration", 1)
    training = ckpt.meta.get("training") or {}
    values: list[tuple[str, object]] = [("args", args), ("checkpoint_version", 3.0), ("iteration", it)]
    values += [
        (f"opt_param_scheduler.{k}", v) for k, v in (training.get("opt_param_scheduler") or {}).items()
    ]
    flops = training.get("num_floating_point_operations_so_far")
    if flops is not None:
        values.append(("num_floating_point_operations_so_far", flops))
    d = M.iter_dir(it)
    files: list[OutputFile] = []
    entries: list[tuple[str, str, str, tuple[int, ...], str]] = []  # (key, kind, dtype, shape, data file)
    for key, expr in stored:
        data = f"__0_{len(entries)}.distcp"
        files.append(
            OutputFile(f"{d}/{data}", "torch", ((key, expr),), obj=Tensor(key, expr.dtype, expr.shape))
        )
        entries.append((key, "tensor", expr.dtype, expr.shape, data))
    for key, value in values:  # DCP saves a value as its torch.save blob
        data = f"__0_{len(entries)}.distcp"
        files.append(OutputFile(f"{d}/{data}", "torch", (), obj=value))
        entries.append((key, "bytes", "", (), data))
    files.append(OutputFile(f"{d}/{METADATA_FILE}", "dcp-metadata", obj=tuple(entries)))
    files.append(OutputFile(M.TRACKER, "text", text=str(it)))
    files.extend(hf_folder(ckpt))  # every side file, as the torch format keeps them
    dropped = dict(ckpt.dropped)
    if ckpt.meta.get("extra_state"):
        dropped["*._extra_state"] = "Transformer-Engine _extra_state: fsdp_dtensor checkpoints hold none"
    if any(v is not None for v in (training.get("rng_state") or {}).values()):
        dropped["rng_state"] = "per-rank random-number state: fsdp_dtensor output leaves it out"
    return Plan(tuple(files), dropped)


def model_entries(ckpt: Checkpoint, swiglu: bool) -> list[tuple[str, E.Expr]]:
    """(DCP key, expression) of every model tensor, in the model's registration order (embedding,
    decoder layers, final norm, MTP layers, output layer)."""
    spec, layout, nodes = ckpt.spec, ckpt.layout, ckpt.tensors
    te = layout.norm_names != "local"  # the layer spec the written args name (transformer_impl)
    table = M.spec_layer_table("te" if te else "local", spec)
    used: set[str] = set()
    out: list[tuple[str, E.Expr]] = []

    def add(prefix: str, entries) -> None:
        for key, x in entries:
            if isinstance(x, list):  # routed experts, at global indices
                rest = key[len("mlp.experts.experts.") :]
                for e, expr in enumerate(x):
                    if layout.grouped_gemm:  # TEGroupedMLP: linear_fc1.weight<e>
                        out.extend(_halves(f"{prefix}mlp.experts.{rest}{e}", expr, swiglu))
                    else:
                        out.extend(_halves(f"{prefix}mlp.experts.local_experts.{e}.{rest}", expr, swiglu))
            else:
                out.extend(_halves(prefix + key, x, swiglu))

    for key, name in M.PRE_LAYERS[:2]:  # the word and position embeddings
        if name in nodes:
            out.append((key, nodes[name].expr))
    for i in range(spec.num_layers):
        add(f"{M.LAYERS}{i}.", layer_entries(nodes, spec, i, table, used, te))
    out += [
        (f"{M.FINAL_NORM}{w}", nodes[f"final_norm.{w}"].expr)
        for w in ("weight", "bias")
        if f"final_norm.{w}" in nodes
    ]
    for k in range(spec.mtp_layers):
        layer = spec.num_layers + k
        out += [(m.format(k=k), nodes[f"layers.{layer}.{c}"].expr) for m, c in M.MTP_KEYS[:3]]
        add(M.MTP_PREFIX.format(k=k), layer_entries(nodes, spec, layer, table, used, te))
        out.append((M.MTP_MCORE.norm.format(k=k), nodes[f"layers.{layer}.mtp.norm.weight"].expr))
        # the MTP block's own embedding and head are the main model's (shared in Megatron)
        used.update(
            f"layers.{layer}.{c}"
            for c in (*(c for _, c in M.MTP_KEYS), "mtp.embed.weight", "mtp.head.weight")
        )
    out += [
        (f"{M.OUTPUT_LAYER}{w}", nodes[f"lm_head.{w}"].expr)
        for w in ("weight", "bias")
        if f"lm_head.{w}" in nodes
    ]
    left = sorted(n for n in nodes if split_layer(n)[0] is not None and n not in used)
    if left:
        raise VerifyError(f"no fsdp_dtensor key for {left[0]}")
    return [(fsdp.WRITE_MODEL + key, E.simplify(expr)) for key, expr in out]


def _halves(key: str, expr: E.Expr, swiglu: bool) -> list[tuple[str, E.Expr]]:
    """A SwiGLU fc1 ``[gate; up]`` as Megatron-FSDP saves it, its two halves; any other tensor whole."""
    if not (swiglu and fsdp.is_fc1(key)):
        return [(key, expr)]
    n = expr.shape[0] // 2
    w, v = fsdp.halves(key)
    return [(w, E.Slice(expr, 0, 0, n)), (v, E.Slice(expr, 0, n, 2 * n))]
