"""Stream a Plan to disk: evaluate each tensor, write its bytes, drop it.  Output goes to a
temporary sibling directory that is renamed into place only when every file is complete."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any

import attrs

from ckpt_ir.backends.plan import BLOCK_BYTES, MIN_BLOCK_BYTES, OutputFile, Plan, row_blocks
from ckpt_ir.errors import CkptIrError, setting
from ckpt_ir.frontends import check_replaceable
from ckpt_ir.io import atomic
from ckpt_ir.io.atomic import stop_point
from ckpt_ir.ir import expr as E

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor


class Progress:
    """Bytes/files progress with rate and ETA on stderr; silent unless enabled."""

    def __init__(self, total_bytes: int, total_files: int, enabled: bool) -> None:
        self.total, self.files, self.enabled = total_bytes, total_files, enabled
        self.done = self.done_files = 0
        self.start = self.last = time.monotonic()

    def advance(self, nbytes: int = 0, files: int = 0) -> None:
        self.done += nbytes
        self.done_files += files
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.5 or self.done_files == self.files):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0
            sys.stderr.write(
                f"\r  {self.done / 1e9:7.2f}/{self.total / 1e9:.2f} GB  files {self.done_files}/"
                f"{self.files}  {rate / 1e9:5.2f} GB/s  ETA {eta:5.0f}s "
            )
            if self.done_files == self.files:
                sys.stderr.write("\n")
            sys.stderr.flush()


@attrs.frozen
class Overflowed:
    """A tensor in which a cast to a narrower dtype turned finite values into infinities."""

    file: str
    tensor: str
    dtype: str
    count: int
    max_abs: float

    def __str__(self) -> str:
        return (
            f"{self.tensor} in {self.file} ({self.count} element(s) up to |x| = {self.max_abs:.6g} "
            f"-> inf in {self.dtype})"
        )


def check_overflow(overflows: list[Overflowed], allow: bool) -> None:
    """Refuse an output in which casts overflowed to infinity, naming every such tensor, unless
    ``allow``."""
    if overflows and not allow:
        raise CkptIrError(
            f"{len(overflows)} tensor(s) overflow to inf when cast: {'; '.join(map(str, overflows))}; "
            f"nothing was written: cast to a wider dtype, or pass --allow-overflow to write them as inf"
        )


def tensor_bytes(expr: E.Expr, reader: E.Reader, slot: str = "out") -> memoryview:
    arr = E.evaluate_raw(expr, reader, scratch=slot)
    if tuple(arr.shape) != expr.shape:
        raise CkptIrError(f"internal: evaluated shape {tuple(arr.shape)} != planned {expr.shape}")
    return memoryview(arr.reshape(-1).view("u1"))


class TensorWriter:
    """Writes one tensor at a file offset: file-to-file in the kernel when its bytes are source
    byte ranges (most of a conversion), else evaluated in row blocks of bounded memory into reused
    buffers and written as produced, the next block computed on a helper thread (torch and numpy
    release the GIL) while this one is written."""

    def __init__(self, reader: E.Reader, progress: Progress, block_bytes: int = BLOCK_BYTES) -> None:
        from ckpt_ir.io.ranges import Copier

        self.reader, self.progress, self.copier = reader, progress, Copier()
        self.block_bytes = block_bytes
        self.writeback = atomic.Writeback()
        self._compute: ThreadPoolExecutor | None = None
        self._torch_started = False
        self.overflows: list[Overflowed] = []

    def tensor(self, file: str, name: str, expr: E.Expr, fd: int, pos: int) -> int:
        """Write the tensor ``name`` of ``file`` at ``pos``; returns the bytes written.  If its casts
        overflowed (counted by the reader while its blocks were computed), it joins ``overflows``."""
        self.reader.overflow = E.Overflow()
        n = self(expr, fd, pos)
        if self.reader.overflow.count:
            o = self.reader.overflow
            self.overflows.append(Overflowed(file, name, expr.dtype, o.count, o.max_abs))
        return n

    def __call__(self, expr: E.Expr, fd: int, pos: int) -> int:
        """Write ``expr`` at ``pos``; returns the bytes written."""
        from ckpt_ir.io.ranges import byte_ranges

        ranges = byte_ranges(expr)
        if ranges is not None:
            n = self.copier.copy(ranges, fd, pos)
            self.reader.ranges_read.update(ranges)
            self._wrote(fd, pos, n)
            return n
        if isinstance(expr, E.Concat) and expr.dim == 0:
            # rows are contiguous in the output: write part by part (a flat optimizer buffer, a row
            # gather) instead of building the whole tensor
            return sum(
                self(part, fd, pos + sum(p.nbytes for p in expr.xs[:i])) for i, part in enumerate(expr.xs)
            )
        return self._write_blocks(row_blocks(expr, self.block_bytes), fd, pos)

    def _write_blocks(self, blocks: tuple[E.Expr, ...], fd: int, pos: int) -> int:
        from ckpt_ir.io.ranges import byte_ranges
        from ckpt_ir.io.safetensors import write_at

        if len(blocks) == 1:  # nothing to overlap: no hand-off to the helper thread
            n = write_at(fd, tensor_bytes(blocks[0], self.reader), pos)
            self._wrote(fd, pos, n)
            return n
        if self._compute is None:
            from concurrent.futures import ThreadPoolExecutor

            self._compute = ThreadPoolExecutor(1, thread_name_prefix="compute")
        if not self._torch_started and E.needs_torch(blocks[0]):
            E.start_torch()
            self._torch_started = True

        def produce(i: int):  # two result buffers: block i is written while block i + 1 is computed
            ranges = byte_ranges(blocks[i])
            return ranges if ranges is not None else tensor_bytes(blocks[i], self.reader, f"block{i % 2}")

        pending: Future | None
        copied: list = []  # source ranges copied in the kernel
        start, pending = pos, self._compute.submit(produce, 0)
        try:
            for i in range(len(blocks)):
                assert pending is not None  # block i was submitted (None only after the last one)
                data = pending.result()
                pending = self._compute.submit(produce, i + 1) if i + 1 < len(blocks) else None
                if isinstance(data, list):
                    n = self.copier.copy(data, fd, pos)
                    copied += data
                else:
                    n = write_at(fd, data, pos)
                self._wrote(fd, pos, n)
                pos += n
        finally:
            if pending is not None:  # an error: let the helper finish before the buffers go away
                pending.cancel() or pending.exception()
        self.reader.ranges_read.update(copied)  # the helper is idle now: no race on the count
        return pos - start

    def _wrote(self, fd: int, pos: int, nbytes: int) -> None:
        self.progress.advance(nbytes)
        self.writeback.wrote(fd, pos, nbytes)

    def close(self) -> None:
        self.copier.close()
        if self._compute is not None:
            self._compute.shutdown(wait=True)


def write_file(
    out: OutputFile, root: str, reader: E.Reader, progress: Progress, block_bytes: int = BLOCK_BYTES
) -> list[Overflowed]:
    """Write ``out`` under ``root``; returns its tensors whose casts overflowed.  An OSError (a full
    disk) becomes an error naming the file."""
    path = os.path.join(root, out.path)
    with atomic.writing(path):
        overflows = _write_file(out, path, reader, progress, block_bytes)
    progress.advance(files=0 if out.part and out.part[0] > 0 else 1)
    return overflows


def _write_file(
    out: OutputFile, path: str, reader: E.Reader, progress: Progress, block_bytes: int
) -> list[Overflowed]:
    from ckpt_ir.io import safetensors as st
    from ckpt_ir.io import torchzip

    os.makedirs(os.path.dirname(path), exist_ok=True)
    exprs = dict(out.tensors)
    overflows: list[Overflowed] = []
    if out.kind in ("safetensors", "torch"):
        writer = TensorWriter(reader, progress, block_bytes)
        try:
            entries = [(n, e.shape, e.dtype) for n, e in out.tensors]
            emit = lambda name, fd, pos: writer.tensor(out.path, name, exprs[name], fd, pos)  # noqa: E731
            if out.kind == "safetensors" and out.part is not None:
                st.write_part(path, entries, *out.part, emit, out.metadata)
            elif out.kind == "safetensors":
                st.write(path, entries, emit, out.metadata)
            else:
                torchzip.write(
                    path,
                    out.obj,
                    lambda t, fd, pos: emit(t.key, fd, pos),
                    lambda t: _copied_crc(exprs[t.key]),
                )
        finally:
            writer.close()
        overflows = writer.overflows
    elif out.kind == "text":
        with open(path, "w") as f:
            f.write(out.text)
    elif out.kind == "copy":
        shutil.copyfile(out.source, path)
    elif out.kind == "dcp-metadata":  # after the data files it describes (small files are written last)
        from ckpt_ir.backends.torch_dist import write_dcp_metadata

        write_dcp_metadata(path, out.obj, os.path.dirname(path))
    elif out.kind == "integrity":  # the plan's last file of its directory: hashes those before it
        from ckpt_ir.megatron.integrity import write_manifest

        write_manifest(os.path.dirname(path))
    else:  # pragma: no cover
        raise AssertionError(out.kind)
    return overflows


def _copied_crc(expr: E.Expr) -> int | None:
    """The stored CRC-32 of a source zip record when ``expr`` is exactly that record's bytes."""
    from ckpt_ir.io.ranges import byte_ranges
    from ckpt_ir.io.torchzip import record_crc

    if not isinstance(expr, E.Load) or expr.fmt != "torch":
        return None
    ranges = byte_ranges(expr)
    return record_crc(*ranges[0]) if ranges and len(ranges) == 1 else None


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def assign(files: list[OutputFile], workers: int) -> list[list[OutputFile]]:
    """Largest files first, each to the least-loaded worker (balanced bytes per worker)."""
    loads: list[tuple[int, int]] = [(0, w) for w in range(workers)]
    out: list[list[OutputFile]] = [[] for _ in range(workers)]
    for f in sorted(files, key=lambda f: -f.nbytes):
        size, w = min(loads)
        out[w].append(f)
        loads[w] = (size + f.nbytes, w)
    return out


def shares(files: list[OutputFile], workers: int) -> list[list[OutputFile]]:
    """The tensor files (or parts of them) each of up to ``workers`` writer processes writes;
    one share for a single process."""
    tensor_files = [f for f in files if f.kind in ("safetensors", "torch")]
    if 1 < workers and len(tensor_files) < workers:
        tensor_files = split_files(tensor_files, workers)
    return assign(tensor_files, max(1, min(workers, len(tensor_files))))


def split_files(files: list[OutputFile], workers: int) -> list[OutputFile]:
    """Fewer files than workers (e.g. one large HF shard): split safetensors files into parts of
    about equal bytes, written concurrently at their planned offsets into a pre-created file
    (:func:`create_parts`)."""
    import attrs

    out: list[OutputFile] = []
    for f in files:
        if f.kind != "safetensors" or len(f.tensors) < 2:
            out.append(f)
            continue
        target, lo, acc = f.nbytes / workers, 0, 0
        for i, (_, e) in enumerate(f.tensors):
            acc += e.nbytes
            if acc >= target and i + 1 < len(f.tensors):
                out.append(attrs.evolve(f, part=(lo, i + 1)))
                lo, acc = i + 1, 0
        out.append(attrs.evolve(f, part=(lo, len(f.tensors))))
    return out


def create_parts(files: list[OutputFile], root: str) -> None:
    """Create each file that :func:`split_files` split, its tensors' bytes still to be written."""
    from ckpt_ir.io import safetensors as st

    for f in files:
        if f.part is not None and f.part[0] == 0:
            path = os.path.join(root, f.path)
            with atomic.writing(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                st.create(path, [(n, e.shape, e.dtype) for n, e in f.tensors], f.metadata)


def _worker(files: list[OutputFile], root: str, queue, block_bytes: int, threads: int) -> None:
    """Body of a worker process: write ``files``, report bytes, then done or the error.
    Ctrl-C is the parent's to handle: it terminates the workers and removes the output.
    ``threads``: torch's compute threads, the worker's share of the cores (oversubscribed
    OpenMP threads spin against each other)."""
    import signal

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    class Relay(Progress):
        def advance(self, nbytes: int = 0, files: int = 0) -> None:
            queue.put(("advance", nbytes, files))

    try:
        overflows = []
        with E.Reader() as reader:
            for f in files:
                overflows += write_file(f, root, reader, Relay(0, 0, False), block_bytes)
        queue.put(("done", reader.bytes_read, overflows))
    except CkptIrError as e:
        queue.put(("error", e.exit_code, str(e)))
    except BaseException as e:  # report anything; the parent raises it
        queue.put(("error", 1, f"{type(e).__name__}: {e}"))


def write_files(
    files: list[OutputFile], root: str, bar: Progress, workers: int, block_bytes: int = BLOCK_BYTES
) -> tuple[int, list[Overflowed]]:
    """Write ``files`` under ``root`` with up to ``workers`` processes (:func:`shares`), computed
    tensors in row blocks of about ``block_bytes``; returns the source bytes read (each byte once
    per process, as :func:`bytes_read` plans them) and the tensors whose casts overflowed."""
    split = shares(files, workers)
    overflows: list[Overflowed] = []
    if len(split) == 1:
        with E.Reader() as reader:
            for f in files:
                overflows += write_file(f, root, reader, bar, block_bytes)
                stop_point("written")
            return reader.bytes_read, overflows
    create_parts([f for share in split for f in share], root)
    tensor_files = [f for share in split for f in share]
    if any(E.needs_torch(e) for f in tensor_files for _, e in f.tensors):
        import torch  # noqa: F401  once, here: the forked workers share it (an import costs seconds of CPU)
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    import signal

    threads = max(1, default_workers() // len(split))
    procs = [
        ctx.Process(target=_worker, args=(share, root, queue, block_bytes, threads), daemon=True)
        for share in split
    ]
    read, running, error = 0, len(procs), None
    finished = False
    try:
        # workers start with SIGINT blocked, so a Ctrl-C reaches only this process
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for p in procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        while running:
            try:
                kind, a, b = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: check nobody died without a word
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise CkptIrError(
                        f"a worker process died (out of memory?); rerun with {setting('workers', 1)}"
                    ) from None
                continue
            if kind == "advance":
                bar.advance(a, b)
            elif kind == "done":
                read += a
                overflows += b
                running -= 1
            else:
                error = error or _error((a, b))
                running -= 1
                break
        finished = error is None
    finally:
        for p in procs:
            if not finished and p.is_alive():
                p.terminate()  # an error or Ctrl-C: stop writing now, the output will be removed
            if p.pid is not None:
                p.join()
    if error:
        raise error
    with E.Reader() as reader:  # small text files and copies, after the data
        for f in files:
            if f.kind not in ("safetensors", "torch"):
                write_file(f, root, reader, bar)
    return read, in_plan_order(overflows, files)


def in_plan_order(overflows: list[Overflowed], files: list[OutputFile]) -> list[Overflowed]:
    """``overflows`` (gathered from parallel writers) in the order of the plan's files and tensors."""
    at = {(f.path, name): i for i, (f, name) in enumerate((f, n) for f in files for n, _ in f.tensors)}
    return sorted(overflows, key=lambda o: at.get((o.file, o.tensor), len(at)))


def distributed_world() -> tuple[int, int]:
    """(rank, world size) when launched by torchrun with more than one process, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), world
    return 0, 1


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def default_max_memory() -> int:
    return available_memory() // 2


def human_bytes(n: int) -> str:
    """``1000`` -> ``1 KB``, ``1536000`` -> ``1.54 MB``: three significant digits, decimal units as
    --max-memory takes them."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def block_size(max_memory: int, workers: int) -> int:
    """Row-block size for computed tensors: each writer holds about two blocks (one computed,
    one written), so ``workers`` writers fit in ``max_memory``; never above BLOCK_BYTES, never
    below MIN_BLOCK_BYTES (per-block costs would dominate)."""
    return max(MIN_BLOCK_BYTES, min(BLOCK_BYTES, max_memory // (2 * max(workers, 1))))


def memory_plan(plan: Plan, workers: int | None, max_memory: int | None) -> tuple[int, int, int]:
    """(writers, row-block bytes, peak bytes per writer) for ``plan`` within ``max_memory``; a
    CkptIrError if not even one writer fits."""
    workers, max_memory = workers or default_workers(), max_memory or default_max_memory()
    block = block_size(max_memory, workers)
    name, need = plan.largest_tensor(block)
    if need > max_memory:
        raise CkptIrError(
            f"tensor {name} needs about {human_bytes(need)} to produce but the memory budget is "
            f"{human_bytes(max_memory)}; raise {setting('max_memory')}"
        )
    return max(1, min(workers, max_memory // max(need, 1))), block, need


def run_checks(plan: Plan) -> int:
    """Tensors the output stores once must really be equal (compared before anything is written);
    returns the source bytes read."""
    import numpy as np

    from ckpt_ir.backends.plan import row_ranges

    def equal(a: E.Expr, b: E.Expr, reader: E.Reader) -> bool:  # row block by row block
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.shape:
            return np.array_equal(E.evaluate_raw(a, reader), E.evaluate_raw(b, reader))
        return all(
            np.array_equal(
                E.evaluate_raw(E.simplify(E.Slice(a, 0, lo, hi)), reader),
                E.evaluate_raw(E.simplify(E.Slice(b, 0, lo, hi)), reader),
            )
            for lo, hi in row_ranges(a, BLOCK_BYTES)
        )

    with E.Reader() as reader:
        for name, other, a, b in plan.checks:
            if not equal(a, b, reader):
                raise CkptIrError(
                    f"{name} differs from {other}, but the target format does not store it apart; "
                    f"converting would lose it"
                )
        return reader.bytes_read


def bytes_read(plan: Plan, writers: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Source bytes :func:`execute` reads for ``plan`` with ``writers`` processes: each process
    reads each byte that its share of the files (:func:`shares`) needs once, however many of its
    tensors repeat it (the page cache serves the repeats), and :func:`run_checks` reads what it
    compares once.  Reading the source's headers when it is lifted is not counted."""
    from ckpt_ir.backends.plan import SourceReads
    from ckpt_ir.ir.byte_ranges import RangeSet

    total, reads = 0, SourceReads(block_bytes)
    for share in shares(list(plan.files), writers):
        seen, done = RangeSet(), set()
        for f in share:
            lo, hi = f.part or (0, len(f.tensors))
            for _, e in f.tensors[lo:hi]:
                if id(e) not in done:  # a replicated tensor: one expression in every rank file
                    done.add(id(e))
                    seen.update(reads(e))
        total += seen.nbytes
    checked = RangeSet()
    for _, _, a, b in plan.checks:
        checked.update(E.reads(E.simplify(a)))
        checked.update(E.reads(E.simplify(b)))
    return total + checked.nbytes


def execute(
    plan: Plan,
    dst: str,
    *,
    overwrite: bool = False,
    progress: bool = False,
    workers: int | None = None,
    max_memory: int | None = None,
    allow_overflow: bool = False,
) -> dict[str, Any]:
    """Write ``plan`` to ``dst`` atomically; returns simple statistics (``overflows``: the tensors
    whose casts overflowed to infinity, written only with ``allow_overflow``; else nothing is
    written).  ``max_memory`` bounds the tensor data held at once (it limits the number of
    parallel writers).  Under torchrun the tensor files are split between the ranks (each rank
    may also use local workers)."""
    workers, block, _ = memory_plan(plan, workers, max_memory)
    checked = run_checks(plan)
    rank, world = distributed_world()
    if world > 1:
        return _execute_distributed(
            plan, dst, overwrite, progress and rank == 0, 1, rank, world, block, allow_overflow
        )
    t0 = time.monotonic()
    with atomic.claim(
        dst, overwrite, check_replaceable
    ) as claim:  # held until DST is published: a rival fails now
        stop_point("claimed")
        atomic.check_free_space(dst, plan.nbytes)
        bar = Progress(_tensor_bytes(plan.files), len(plan.files), progress)
        with atomic.output_dir(claim) as tmp:
            read, overflows = write_files(list(plan.files), tmp, bar, workers, block)
            check_overflow(overflows, allow_overflow)  # before publishing: a refusal removes tmp
    return {
        "seconds": time.monotonic() - t0,
        "bytes_written": plan.nbytes,
        "bytes_read": checked + read,
        "overflows": overflows,
    }


def _tensor_bytes(files) -> int:
    return sum(f.nbytes for f in files if f.kind in ("safetensors", "torch"))


def _execute_distributed(
    plan: Plan,
    dst: str,
    overwrite: bool,
    progress: bool,
    workers: int,
    rank: int,
    world: int,
    block_bytes: int,
    allow_overflow: bool,
) -> dict[str, Any]:
    """torchrun: rank 0 claims DST and prepares a shared temporary directory, every rank writes its
    share of the tensor files into it, and rank 0 writes the small files last and publishes the
    directory.  Rank 0 decides each step and broadcasts the outcome, so all ranks agree on it."""
    import contextlib

    import torch.distributed as dist

    t0 = time.monotonic()
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    try:
        tag = "dist-" + os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("MASTER_PORT", "0"))
        tmp = atomic.temp_path(dst, tag)
        with contextlib.ExitStack() as held:  # rank 0 holds DST's claim until it is published
            status: list = [None]
            if rank == 0:
                try:
                    claim = held.enter_context(atomic.claim(dst, overwrite, check_replaceable))
                    stop_point("claimed")
                    atomic.check_free_space(dst, plan.nbytes)
                    with atomic.writing(tmp):
                        atomic.prepare(claim, tag)
                except (CkptIrError, OSError) as e:
                    status = [_status(e)]
            dist.broadcast_object_list(status, src=0)
            if status[0]:
                raise _error(status[0])
            tensor_files = [f for f in plan.files if f.kind in ("safetensors", "torch")]
            mine = assign(tensor_files, world)[rank] if tensor_files else []
            bar = Progress(_tensor_bytes(mine), len(mine), progress)
            mine_status, read = None, 0
            mine_overflows: list[Overflowed] = []
            try:
                read, mine_overflows = write_files(mine, tmp, bar, workers, block_bytes)
            except CkptIrError as e:
                mine_status = _status(e)
            statuses: list = [None] * world
            dist.all_gather_object(statuses, (mine_status, mine_overflows))
            overflows = in_plan_order([o for _, some in statuses for o in some], list(plan.files))
            outcome = [next((s for s, _ in statuses if s), None)]
            if outcome[0] is None:
                try:
                    check_overflow(overflows, allow_overflow)
                except CkptIrError as e:
                    outcome = [_status(e)]
            if rank == 0:
                try:
                    if outcome[0] is None:
                        with E.Reader() as reader:
                            for f in plan.files:
                                if f.kind not in ("safetensors", "torch"):
                                    write_file(f, tmp, reader, Progress(0, 0, False))
                        with atomic.writing(tmp):
                            atomic.publish(tmp, claim)
                except (CkptIrError, OSError) as e:
                    outcome = [_status(e)]
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)  # gone after a publish; after a failure, removed
            dist.broadcast_object_list(outcome, src=0)
        if outcome[0]:
            raise _error(outcome[0])
        totals = [0] * world
        dist.all_gather_object(totals, read)
        return {
            "seconds": time.monotonic() - t0,
            "bytes_written": plan.nbytes,
            "bytes_read": sum(totals),
            "overflows": overflows,
        }
    finally:
        if owns_group:
            dist.destroy_process_group()


def _status(e: CkptIrError | OSError) -> tuple[int, str]:
    """An error as (exit code, one-line message) for another rank."""
    if isinstance(e, CkptIrError):
        return e.exit_code, str(e)
    return 1, f"{e.filename or ''}: {e.strerror}"


def _error(status: tuple[int, str]) -> CkptIrError:
    err = CkptIrError(status[1])
    err.exit_code = status[0]
    return err
