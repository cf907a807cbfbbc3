"""``ckpt-ir plan``: the plan of a conversion from a model's config alone.

The config gives the ModelSpec; the spec gives every canonical tensor and its shape
(:func:`~ckpt_ir.ir.shapes.expected_names` / ``expected_shape``).  Each becomes a shape-only
placeholder load, and the Checkpoint so built goes through the same derived pipeline and backend
plan as ``convert``: every layout rule and divisibility check runs exactly as in ``--dry-run``,
and for a real checkpoint's config the files, tensors, shapes and bytes are the ones ``--dry-run``
prints.  Nothing is read but config.json, so a 671B model plans in seconds.
"""

from __future__ import annotations

import os
import time
from typing import Any

import attrs

# convert's flags that describe the output layout; plan takes exactly these (same help, defaults)
LAYOUT_FLAGS = (
    "--dtype",
    "--max-shard-size",
    "--tp",
    "--pp",
    "--num-layer-list",
    "--vpp-layers",
    "--noop-layers",
    "--make-vocab-size-divisible-by",
    "--ep",
    "--etp",
    "--moe-grouped-gemm",
    "--norm-names",
    "--mla-keys",
    "--gdn-keys",
    "--quantize",
    "--quant-block-size",
    "--quant-scale-fmt",
)
# convert's flags that decide how many writer processes read the source; plan takes these too
WRITER_FLAGS = ("--workers", "--max-memory")
PLACEHOLDER = "<config>"  # the "file" placeholder loads read from; never opened
PROBE_BYTES = 64 << 20
# tensors a checkpoint stores in another dtype than the model's: transformers keeps DeepSeek's router
# score-correction bias (a buffer) in fp32, and the released checkpoints store it so
FP32_ROLES = ("layers.{i}.mlp.router.bias",)


def checkpoint_from_config(config_dir: str):
    """A Checkpoint in HF layout whose tensors are shape-only placeholders for the model that
    ``config_dir/config.json`` describes (MTP layers as ``num_nextn_predict_layers`` says)."""
    from ckpt_ir.families import for_hf_config
    from ckpt_ir.frontends.hf import read_config
    from ckpt_ir.io.side_files import side_files
    from ckpt_ir.ir import expr as E
    from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode
    from ckpt_ir.ir.layout import Layout
    from ckpt_ir.ir.names import role_of
    from ckpt_ir.ir.roles import canonical_order, expected_names, expected_shape
    from ckpt_ir.quant import fp8_by_default, fp8_placeholder, quant_config, quant_method

    cfg = read_config(config_dir)
    where = os.path.join(config_dir, "config.json")
    family = for_hf_config(cfg, where)
    spec = family.spec_from_config(cfg, where=where)
    layout = Layout(format="hf")
    tensors = {}
    offset = 0  # the tensors lie one after another, as in a weight file
    for name in sorted(expected_names(spec, layout), key=canonical_order):
        shape = expected_shape(spec, layout, name)
        assert shape is not None, name  # expected_names only yields roles expected_shape knows
        dtype = "F32" if role_of(name) in FP32_ROLES else spec.dtype
        expr: E.Expr = E.Load(PLACEHOLDER, name, shape, dtype, offset, "placeholder")
        if quant_method(cfg) == "fp8" and fp8_by_default(name, shape, canonical=True):
            expr = fp8_placeholder(expr, quant_config(cfg) or {}, where)  # fp8 values + scales
        tensors[name] = TensorNode.whole(name, expr)
        offset += E.bytes_read(expr)
    return Checkpoint(
        spec=spec,
        layout=layout,
        tensors=tensors,
        hf_config=cfg,
        aux_files=side_files(config_dir, config=True),
        source=config_dir,
    )


def plan_from_config(config_dir: str, target) -> Any:
    """``convert --dry-run`` of the model of ``config_dir``: the conversion driver itself runs on
    the placeholder checkpoint (pipeline, target checks, backend plan) and writes nothing."""
    import ckpt_ir.api as ck

    return ck.convert(checkpoint_from_config(config_dir), "", target, dry_run=True)


def probe_disk(directory: str) -> float:
    """Write speed of ``directory``'s filesystem in GB/s: 64 MiB written, synced and removed."""
    import tempfile

    block = os.urandom(1 << 20)
    fd, path = tempfile.mkstemp(prefix=".ckpt-ir-probe-", dir=directory)
    try:
        t0 = time.perf_counter()
        for _ in range(PROBE_BYTES // len(block)):
            os.write(fd, block)
        os.fsync(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return PROBE_BYTES / max(seconds, 1e-9) / 1e9


def summary(
    plan,
    pipeline,
    out,
    target,
    disk_gbps: float,
    disk_source: str,
    with_tensors: bool,
    workers: int | None = None,
    max_memory: int | None = None,
) -> dict[str, Any]:
    """The plan as data: per file its tensors and bytes, then totals.  ``total_bytes`` counts every
    tensor of the model once (as laid out: padded vocabulary included); ``bytes_written`` counts
    the files, where Megatron repeats replicated tensors (norms, routers, the dense part under EP)
    in every rank file that holds them; ``bytes_read`` the source bytes the ``writers`` processes
    (as ``convert`` runs them with ``workers`` and ``max_memory``) read, each byte once per
    process.  ``layout`` describes the output (``target``'s format); ``expected_seconds`` is the
    time to read and write those bytes at ``disk_gbps``."""
    from ckpt_ir.backends.execute import bytes_read, memory_plan
    from ckpt_ir.ir.roles import expected_shape

    files = []
    largest = ("", (), "", 0)
    for f in plan.files:
        entry: dict[str, Any] = {"path": f.path, "kind": f.kind, "tensors": len(f.tensors), "bytes": f.nbytes}
        if with_tensors:
            entry["tensor_list"] = [
                {"name": n, "shape": list(e.shape), "dtype": e.dtype, "bytes": e.nbytes} for n, e in f.tensors
            ]
        files.append(entry)
        for name, e in f.tensors:
            if e.nbytes > largest[3]:
                largest = (f"{f.path}:{name}", e.shape, e.dtype, e.nbytes)
    spec, layout = out.spec, out.layout
    padding = 0
    if layout.padded_vocab:  # rows the vocabulary padding adds (embedding, output layer, MTP copies)
        unpadded_layout = attrs.evolve(layout, padded_vocab=None)
        for name, t in out.tensors.items():
            want = expected_shape(spec, unpadded_layout, name)
            if want is not None and want[0] != t.shape[0]:
                padding += t.nbytes // t.shape[0] * (t.shape[0] - want[0])
    written = plan.nbytes
    writers, block, _ = memory_plan(plan, workers, max_memory)
    read = bytes_read(plan, writers, block)
    return {
        "pipeline": str(pipeline),
        "layout": attrs.evolve(layout, format=target.to).describe(),
        "files": files,
        "file_count": len(files),
        "total_bytes": out.nbytes,
        "vocab_padding_bytes": padding,
        "padded_vocab": layout.padded_vocab,
        "bytes_written": written,
        "bytes_read": read,
        "writers": writers,
        "largest_tensor": {
            "name": largest[0],
            "shape": list(largest[1]),
            "dtype": largest[2],
            "bytes": largest[3],
        },
        "peak_memory_per_writer": plan.peak_memory(),
        "disk_gbps": disk_gbps,
        "disk_gbps_source": disk_source,
        "expected_seconds": (read + written) / (disk_gbps * 1e9),
        "dropped": dict(plan.dropped),
    }


def format_text(s: dict[str, Any], with_tensors: bool, pipeline_line: str) -> str:
    """:func:`summary` for a person; ``pipeline_line`` from :func:`~ckpt_ir.commands.common.pipeline_line`."""
    lines = [pipeline_line, f"layout: {s['layout']}"]
    for f in s["files"]:
        lines.append(f"{f['path']}  ({f['kind']}, {f['tensors']} tensors, {f['bytes']} bytes)")
        for t in f.get("tensor_list", ()) if with_tensors else ():
            lines.append(f"    {t['name']}  {'x'.join(map(str, t['shape']))} {t['dtype']}  {t['bytes']} B")
    for key, why in s["dropped"].items():
        lines.append(f"dropped: {key}: {why}")
    big = s["largest_tensor"]
    lines += [
        f"files: {s['file_count']}",
        f"model bytes: {s['total_bytes']} ({s['total_bytes'] / 1e9:.3f} GB, each tensor once"
        + (
            f"; vocab padded to {s['padded_vocab']}: {s['vocab_padding_bytes']} bytes of padding"
            if s["padded_vocab"]
            else ""
        )
        + ")",
        f"bytes written: {s['bytes_written']} ({s['bytes_written'] / 1e9:.3f} GB, replicated tensors in every rank "
        f"file that holds them)",
        f"bytes read: {s['bytes_read']} ({s['bytes_read'] / 1e9:.3f} GB of source tensors, each byte once by each "
        f"of {s['writers']} writer process{'es' * (s['writers'] > 1)} that needs it; the stored form, quantized "
        f"for an FP8 release)",
        f"largest tensor: {big['name']} {'x'.join(map(str, big['shape']))} {big['dtype']} ({big['bytes']} bytes)",
        f"peak memory per writer: {s['peak_memory_per_writer']} bytes",
        f"expected time: {s['expected_seconds']:.1f}s to read and write these bytes at {s['disk_gbps']:.2f} GB/s "
        f"({s['disk_gbps_source']})",
    ]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="plan a conversion from a config alone: files, tensors, bytes, memory, time",
        description="Plan converting the model that --hf-config describes, without its weights: "
        "the same pipeline, layout checks and backend plan as `convert --dry-run`, from config.json "
        "alone. Prints per output file its tensors and bytes, the totals (bytes written; source "
        "bytes read, each once by each writer process that needs it), the largest tensor, the "
        "peak memory per writer and the expected time to read and write at --disk-gbps.",
    )
    p.add_argument(
        "--hf-config",
        metavar="DIR",
        required=True,
        help="directory holding the model's config.json, or a Hub id org/name[@revision] (only its "
        "config and side files are downloaded)",
    )
    p.add_argument("--to", required=True, choices=("hf", "mcore"), help="output format")
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="json: for scripts (top-level total_bytes)"
    )
    p.add_argument(
        "--tensors",
        action="store_true",
        help="also list every tensor of every file (name, shape, dtype, bytes)",
    )
    p.add_argument(
        "--disk-gbps",
        type=float,
        help="read and write speed in GB/s for the time estimate (default: "
        "measured by writing 64 MiB to --output-dir)",
    )
    p.add_argument(
        "--output-dir",
        metavar="DIR",
        default=".",
        help="where the output would go: the filesystem the "
        "speed probe measures (default: the current directory)",
    )
    convert = sub.choices["convert"]
    g = p.add_argument_group("output layout (as for convert)")
    for action in convert._actions:  # share convert's layout flags, so both accept exactly the same
        if action.option_strings and action.option_strings[0] in LAYOUT_FLAGS:
            g._add_action(action)
    w = p.add_argument_group("writer processes (as for convert; they decide the bytes read)")
    for action in convert._actions:
        if action.option_strings and action.option_strings[0] in WRITER_FLAGS:
            w._add_action(action)


def run(args) -> int:
    """The ``plan`` command."""
    import json

    import ckpt_ir.api as ck
    from ckpt_ir.commands.common import pipeline_line
    from ckpt_ir.errors import UsageError

    target = ck.Target(
        to=args.to,
        dtype=args.dtype,
        tp=args.tp,
        pp=args.pp,
        vpp_layers=args.vpp_layers,
        num_layer_list=args.num_layer_list,
        noop_layers=args.noop_layers,
        vocab_divisible_by=args.make_vocab_size_divisible_by,
        norm_names=args.norm_names,
        mla_keys=args.mla_keys,
        gdn_keys=args.gdn_keys,
        max_shard_size=args.max_shard_size,
        ep=args.ep,
        etp=args.etp,
        grouped_gemm=args.moe_grouped_gemm,
        quantize=args.quantize,
        quant_block_size=args.quant_block_size,
        quant_scale_fmt=args.quant_scale_fmt,
    )
    from ckpt_ir.io.hub import resolve

    conversion = plan_from_config(resolve(args.hf_config, weights=False), target)
    if args.disk_gbps is not None:
        if args.disk_gbps <= 0:
            raise UsageError(f"--disk-gbps must be positive, got {args.disk_gbps}")
        gbps, source = args.disk_gbps, "given"
    else:
        if not os.path.isdir(args.output_dir):
            raise UsageError(
                f"--output-dir {args.output_dir}: no such directory (the speed probe writes there)"
            )
        gbps, source = probe_disk(args.output_dir), f"measured on {os.path.abspath(args.output_dir)}"
    s = summary(
        conversion.plan,
        conversion.pipeline,
        conversion.output,
        target,
        gbps,
        source,
        args.tensors,
        args.workers,
        args.max_memory,
    )
    if args.format == "json":
        print(json.dumps(s, indent=1))
    else:
        print(format_text(s, args.tensors, pipeline_line(conversion.pipeline, target)))
    return 0
