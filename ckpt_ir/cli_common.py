"""What the ``ckpt-ir`` commands share: argument types, the pipeline/debugging flags, and running a
conversion through :func:`ckpt_ir.api.convert` with the CLI's reporting.  A leaf module: the
command modules (``cli``, ``mindspeed``) import it, never each other."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ckpt_ir.errors import UsageError

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num) :]
    try:
        value = float(num) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2GiB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(value)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", ",").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit 2 with a one-line message
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: {message}")


def add_plugin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin",
        metavar="MODULE",
        action="append",
        default=[],
        help="import MODULE to register user passes or model families (repeatable)",
    )


def add_ir_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline and debugging")
    g.add_argument(
        "--pipeline",
        metavar="TEXT",
        help="run this pass pipeline instead of the derived one, "
        "e.g. 'gather,unfuse-qkv,cast{dtype=bf16}'; target flags given with it are checked against "
        "its result",
    )
    g.add_argument(
        "--print-pipeline",
        action="store_true",
        help="print the pipeline that would run and exit (paste it into --pipeline to edit it)",
    )
    g.add_argument(
        "--print-ir-before", metavar="PASS", action="append", default=[], help="print the IR before PASS"
    )
    g.add_argument(
        "--print-ir-after", metavar="PASS", action="append", default=[], help="print the IR after PASS"
    )
    g.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass")
    g.add_argument(
        "--ir-format", choices=("text", "json", "dot"), default="text", help="format of IR prints/dumps"
    )
    g.add_argument(
        "--dump-ir",
        metavar="DIR",
        help="write the IR before the first pass and after each pass, one numbered file per pass",
    )
    g.add_argument(
        "--pass-stats", action="store_true", help="print per-pass statistics (tensors, bytes, time)"
    )
    add_plugin_flag(g)  # type: ignore[arg-type]
    g.add_argument(
        "--allow-unused",
        metavar="PATTERN",
        action="append",
        default=[],
        help="drop source tensors matching this glob on purpose instead of failing (repeatable)",
    )
    add_replicas_flag(g)  # type: ignore[arg-type]


def add_replicas_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--replicas",
        choices=("check", "check-all", "take-rank0"),
        default="check",
        help="Megatron source: compare the rank files' copies of replicated tensors (norms, routers, "
        "biases; an error names a tensor whose copies differ): check those up to 1 MiB (default), "
        "check-all (also large ones, e.g. dense weights repeated in every EP rank's file), or "
        "take-rank0: keep the first rank's copy without comparing (recorded in the output's notes)",
    )


def load_plugins(args: argparse.Namespace) -> None:
    from ckpt_ir.passes.manager import load_plugin

    for module in getattr(args, "plugin", None) or ():
        load_plugin(module)


def run_conversion(src: Any, target: Any, args: argparse.Namespace, load_options: dict[str, Any]) -> int:
    """Convert ``src`` (a path, or a lifted Checkpoint) to ``args.dst`` for ``target`` with the shared flags (pipeline, printing,
    dry run, workers, progress) and report on stderr."""
    import ckpt_ir.api as ck
    from ckpt_ir.backends.execute import distributed_world
    from ckpt_ir.passes.manager import Instrumentation

    quiet = getattr(args, "quiet", False) or distributed_world()[0] != 0
    if not isinstance(src, ck.Checkpoint):
        if not (args.dry_run or args.print_pipeline):
            from ckpt_ir.io.atomic import check_destination

            check_destination(args.dst, args.overwrite)  # fail fast, before lifting the source
        src = ck.load(src, **{"optimizer": target.carries_optimizer and not target.lora_load, **load_options})
        ck.check_family(src, target)
        if src.meta.get("family_from_args") and not quiet:
            print(f"ckpt-ir: {src.meta['family_from_args']}", file=sys.stderr)
    if args.print_pipeline:
        print(ck.as_pipeline(args.pipeline) if args.pipeline else ck.derive_pipeline(src, target))
        return 0
    inst = Instrumentation(
        print_before=tuple(args.print_ir_before),
        print_after=tuple(args.print_ir_after),
        print_after_all=args.print_ir_after_all,
        dump_dir=args.dump_ir,
        stats=args.pass_stats,
        ir_format=args.ir_format,
        stream=sys.stdout,
    )
    progress = (
        args.progress if getattr(args, "progress", None) is not None else (sys.stderr.isatty() and not quiet)
    )
    result = ck.convert(
        src,
        args.dst,
        target,
        pipeline=args.pipeline,
        instrumentation=inst,
        dry_run=args.dry_run,
        overwrite=args.overwrite,
        progress=progress,
        workers=getattr(args, "workers", None),
        max_memory=getattr(args, "max_memory", None),
        announce=None
        if quiet or args.dry_run
        else lambda p: print(pipeline_line(p, target), file=sys.stderr),
    )
    if args.dry_run:
        print_plan(
            result.plan,
            pipeline_line(result.pipeline, target),
            getattr(args, "workers", None),
            getattr(args, "max_memory", None),
        )
        return 0
    if not quiet:
        stats = result.stats or {}
        gb = stats["bytes_written"] / 1e9
        print(
            f"wrote {args.dst}: {len(result.plan.files)} files, {gb:.3f} GB in {stats['seconds']:.1f}s "
            f"({gb / max(stats['seconds'], 1e-9):.2f} GB/s)",
            file=sys.stderr,
        )
        for line in ck.summarize_dropped(result.plan.dropped):  # what the output lacks, and why
            print(line, file=sys.stderr)
        from ckpt_ir.backends.plan import NOTES_FILE

        for note in result.output.meta.get("notes", ()):
            print(f"note: {note} (recorded in {NOTES_FILE})", file=sys.stderr)
    return 0


def pipeline_line(pipeline: Any, target: Any) -> str:
    """The ``pipeline:`` line of ``convert`` and ``plan``: the passes that run (or that none does),
    and the quantization the HF writer adds (``--quantize`` is the backend's, not a pass)."""
    line = f"pipeline: {str(pipeline) or '(no passes)'}"
    if target.quantize:
        b = target.quant_block_size
        line += f"; then the writer quantizes to {target.quantize} ({b}x{b} blocks, {target.quant_scale_fmt} scales)"
    return line


def print_plan(plan: Any, line: str, workers: int | None = None, max_memory: int | None = None) -> None:
    """``--dry-run``'s report; ``line`` is the :func:`pipeline_line`."""
    from ckpt_ir.backends.execute import bytes_read, memory_plan
    from ckpt_ir.ir.printer import describe

    print(line)
    for f in plan.files:
        print(f"{f.path}  ({f.kind}, {f.nbytes} bytes)")
        for name, e in f.tensors:
            print(f"    {name}  {'x'.join(map(str, e.shape))} {e.dtype}  {e.nbytes} B  <- {describe(e)}")
    for key, why in plan.dropped.items():
        print(f"dropped: {key}: {why}")
    writers, block, need = memory_plan(plan, workers, max_memory)
    print(
        f"total: {plan.nbytes} bytes to write, {bytes_read(plan, writers, block)} bytes to read, "
        f"estimated peak memory {need * writers} bytes ({writers} writer{'s' * (writers > 1)} of at most {need} "
        f"bytes each; computed tensors in row blocks of {block} bytes)"
    )
