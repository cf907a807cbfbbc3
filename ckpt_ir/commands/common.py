"""What the ``ckpt-ir`` commands share: argument types, the pipeline/debugging flags, and running a
conversion through :func:`ckpt_ir.api.convert` with the CLI's reporting.  A leaf module: the
command modules (``cli``, ``mindspeed``) import it, never each other."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import attrs

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
        "e.g. 'gather,unfuse-qkv,cast{dtype=bf16}' (a value with spaces or braces in double quotes: "
        'attach-lora{path="my adapter"}); target flags given with it are checked against its result',
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
        help="write the IR before the first pass and after each pass, one numbered file per pass, into DIR "
        "(an existing non-empty DIR is replaced only with --overwrite, and only when it holds such a dump)",
    )
    g.add_argument(
        "--pass-stats", action="store_true", help="print per-pass statistics (tensors, bytes, time)"
    )
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


def iteration(text: str) -> int | str:
    """``--iteration``: a Megatron iteration number or ``release``."""
    if text == "release":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an iteration number or 'release', got {text!r}")
    return value


def add_iteration_flag(p: argparse.ArgumentParser, which: str = "the source") -> None:
    p.add_argument(
        "--iteration",
        type=iteration,
        metavar="N",
        help=f"Megatron save directory as {which}: read iteration N (its iter_N directory) or release "
        "instead of the latest (latest_checkpointed_iteration.txt); an iter_* or release directory "
        "given as the path is read as that iteration. MindSpeed-LLM FSDP2 run: its global_step_N",
    )


def add_source_format_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source-ckpt-format",
        choices=("torch_dcp", "fsdp_dtensor"),
        default=None,
        help="a Megatron DCP checkpoint (iter_N/ holding .metadata and *.distcp, no metadata.json) "
        "whose args do not say which it is: torch_dcp (--use-torch-fsdp2) or fsdp_dtensor "
        "(Megatron-FSDP); default: from its args",
    )


def add_overflow_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-overflow",
        action="store_true",
        help="write tensors whose cast to a narrower dtype (bf16 or fp32 to fp16, fp32 to bf16) turns "
        "finite values into inf, with a warning naming each; by default such a conversion is refused "
        "(every overflowing tensor named) and nothing is written",
    )


def load_plugins(args: argparse.Namespace) -> None:
    from ckpt_ir.passes.manager import load_plugin

    for module in getattr(args, "plugin", None) or ():
        load_plugin(module)


@attrs.frozen
class RunOptions:
    """How a conversion command runs and reports, independent of what it converts: where it writes,
    the pipeline and debugging flags, and the executor's knobs.  Built from parsed arguments by
    :meth:`from_args` (a command's own choices as keywords); the arguments are never changed."""

    dst: str
    overwrite: bool = False
    dry_run: bool = False
    print_pipeline: bool = False
    pipeline: str | None = None
    print_ir_before: tuple[str, ...] = ()
    print_ir_after: tuple[str, ...] = ()
    print_ir_after_all: bool = False
    ir_format: str = "text"
    dump_ir: str | None = None
    pass_stats: bool = False
    quiet: bool = False
    progress: bool | None = None  # None: when stderr is a terminal and not quiet
    workers: int | None = None
    max_memory: int | None = None
    allow_overflow: bool = False  # write casts that overflow to inf (with a warning each)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **chosen: Any) -> RunOptions:
        """The options the shared flags give; ``chosen`` overrides (e.g. the command's own ``dst``)."""
        given = {f.name: getattr(args, f.name) for f in attrs.fields(cls) if hasattr(args, f.name)}
        for key in ("print_ir_before", "print_ir_after"):
            if key in given:
                given[key] = tuple(given[key] or ())
        return cls(**{**given, **chosen})


def resolve_sources(
    opts: RunOptions,
    sources: dict[str, str | None],
    configs: tuple[str, ...] = (),
    inside: tuple[str, ...] = (),
) -> dict[str, str | None]:
    """The sources of a conversion (flag -> path or Hub id) as local paths, after the checks that
    must come first: no source overlaps the destination, and the destination may be written
    (before anything is downloaded or read).  ``configs`` name the sources of which only the
    config is needed (no weights are downloaded); ``inside`` those allowed inside the destination."""
    import ckpt_ir.api as ck
    from ckpt_ir.frontends import check_replaceable
    from ckpt_ir.io.atomic import check_apart, check_destination
    from ckpt_ir.io.hub import resolve

    def apart(paths: dict[str, str | None]) -> None:
        check_apart(opts.dst, {flag: p for flag, p in paths.items() if flag not in inside})

    if opts.pipeline is not None:
        ck.as_pipeline(opts.pipeline)  # a bad --pipeline stops before anything is downloaded or read
    apart(sources)
    if not (opts.dry_run or opts.print_pipeline):
        check_destination(
            opts.dst, opts.overwrite, check_replaceable
        )  # fail fast, before a download or lifting the source
    if opts.dump_ir and not opts.print_pipeline:  # a dry run dumps the IR too
        from ckpt_ir.passes.manager import check_dump_replaceable

        check_destination(opts.dump_ir, opts.overwrite, check_dump_replaceable)
    resolved = {flag: p and resolve(p, weights=flag not in configs) for flag, p in sources.items()}
    apart(resolved)  # a Hub id's snapshot too
    return resolved


def run_conversion(
    src: Any,
    target: Any,
    opts: RunOptions,
    load_options: dict[str, Any],
    check_source: Callable[[Any], None] | None = None,
) -> int:
    """Convert ``src`` (a path: see :func:`resolve_sources`) to ``opts.dst`` for ``target`` with the
    shared flags (pipeline, printing, dry run, workers, progress) and report on stderr;
    ``check_source`` sees the lifted source before anything runs."""
    import ckpt_ir.api as ck
    from ckpt_ir.backends.execute import distributed_world
    from ckpt_ir.passes.manager import Instrumentation

    quiet = opts.quiet or distributed_world()[0] != 0
    # a bad --pipeline (syntax, pass, option value) stops before the source is read
    pipeline = None if opts.pipeline is None else ck.as_pipeline(opts.pipeline)
    src = ck.load(src, **{"optimizer": target.carries_optimizer and not target.lora_load, **load_options})
    ck.check_family(src, target)
    if src.meta.get("family_from_args") and not quiet:
        print(f"ckpt-ir: {src.meta['family_from_args']}", file=sys.stderr)
    if check_source is not None:
        check_source(src)
    if opts.print_pipeline:
        print(pipeline if pipeline is not None else ck.derive_pipeline(src, target))
        return 0
    progress = opts.progress if opts.progress is not None else (sys.stderr.isatty() and not quiet)
    with dump_dir(opts.dump_ir, opts.overwrite) as dump:
        inst = Instrumentation(
            print_before=opts.print_ir_before,
            print_after=opts.print_ir_after,
            print_after_all=opts.print_ir_after_all,
            dump_dir=dump,
            stats=opts.pass_stats,
            ir_format=opts.ir_format,
            stream=sys.stdout,
        )
        result = ck.convert(
            src,
            opts.dst,
            target,
            pipeline=pipeline,
            instrumentation=inst,
            dry_run=opts.dry_run,
            overwrite=opts.overwrite,
            progress=progress,
            workers=opts.workers,
            max_memory=opts.max_memory,
            announce=None
            if quiet or opts.dry_run
            else lambda p: print(pipeline_line(p, target), file=sys.stderr),
            allow_overflow=opts.allow_overflow,
        )
    if opts.dry_run:
        print_plan(result.plan, pipeline_line(result.pipeline, target), opts.workers, opts.max_memory)
        return 0
    if not quiet:
        stats = result.stats or {}
        gb = stats["bytes_written"] / 1e9
        print(
            f"wrote {opts.dst}: {len(result.plan.files)} files, {gb:.3f} GB in {stats['seconds']:.1f}s "
            f"({gb / max(stats['seconds'], 1e-9):.2f} GB/s)",
            file=sys.stderr,
        )
        for line in ck.summarize_dropped(result.plan.dropped):  # what the output lacks, and why
            print(line, file=sys.stderr)
        for o in stats["overflows"]:  # written as inf on purpose (--allow-overflow)
            print(f"warning: overflow to inf: {o}", file=sys.stderr)
        from ckpt_ir.io.side_files import NOTES_FILE

        for note in result.output.meta.get("notes", ()):
            print(f"note: {note} (recorded in {NOTES_FILE})", file=sys.stderr)
    return 0


@contextlib.contextmanager
def dump_dir(path: str | None, overwrite: bool) -> Iterator[str | None]:
    """Where the passes dump the IR for ``--dump-ir PATH``: a temporary sibling of PATH, published
    as PATH when the block ends, under the rules of the conversion's output (claimed, an existing
    PATH replaced only with ``overwrite`` and only when it holds a dump).  Also when a pass fails:
    the IR up to that pass is what a dump is for."""
    if path is None:
        yield None
        return
    from ckpt_ir.io.atomic import claim, prepare, publish, writing
    from ckpt_ir.passes.manager import check_dump_replaceable

    with claim(path, overwrite, check_dump_replaceable) as dump:
        with writing(path):
            tmp = prepare(dump)
        try:
            yield tmp
        except BaseException:
            with contextlib.suppress(Exception):
                publish(tmp, dump)
            shutil.rmtree(tmp, ignore_errors=True)  # gone once published
            raise
        with writing(tmp):
            publish(tmp, dump)


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
