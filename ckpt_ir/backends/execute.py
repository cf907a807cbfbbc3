"""Stream a Plan to disk: evaluate each tensor, write its bytes, drop it.  Output goes to a
temporary sibling directory that is renamed into place only when every file is complete."""

from __future__ import annotations

import os
import shutil
import sys
import time

from ckpt_ir.backends.plan import OutputFile, Plan
from ckpt_ir.errors import CkptIrError
from ckpt_ir.io import atomic
from ckpt_ir.ir import expr as E


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
            sys.stderr.write(f"\r  {self.done / 1e9:7.2f}/{self.total / 1e9:.2f} GB  files {self.done_files}/"
                             f"{self.files}  {rate / 1e9:5.2f} GB/s  ETA {eta:5.0f}s ")
            if self.done_files == self.files:
                sys.stderr.write("\n")
            sys.stderr.flush()


def tensor_bytes(expr: E.Expr, reader: E.Reader) -> memoryview:
    arr = E.evaluate_raw(expr, reader, scratch=True)
    if tuple(arr.shape) != expr.shape:
        raise CkptIrError(f"internal: evaluated shape {tuple(arr.shape)} != planned {expr.shape}")
    return memoryview(arr.reshape(-1).view("u1"))


class TensorWriter:
    """Writes one tensor at a file offset: file-to-file in the kernel when its bytes are source
    byte ranges (most of a conversion), else evaluated into a reused buffer and written."""

    def __init__(self, reader: E.Reader, progress: Progress) -> None:
        from ckpt_ir.io.ranges import Copier

        self.reader, self.progress, self.copier = reader, progress, Copier()

    def __call__(self, expr: E.Expr, fd: int, pos: int) -> int:
        """Write ``expr`` at ``pos``; returns the bytes written."""
        from ckpt_ir.io.ranges import byte_ranges
        from ckpt_ir.io.safetensors import write_at

        ranges = byte_ranges(expr)
        if ranges is not None:
            n = self.copier.copy(ranges, fd, pos)
            self.reader.bytes_read += n
        elif isinstance(expr, E.Concat) and expr.dim == 0:
            # rows are contiguous in the output: write part by part (a flat optimizer buffer, a row
            # gather) instead of building the whole tensor
            return sum(self(part, fd, pos + sum(p.nbytes for p in expr.xs[:i])) for i, part in enumerate(expr.xs))
        else:
            n = write_at(fd, tensor_bytes(expr, self.reader), pos)
        self.progress.advance(n)
        return n

    def close(self) -> None:
        self.copier.close()


def write_file(out: OutputFile, root: str, reader: E.Reader, progress: Progress) -> None:
    from ckpt_ir.io import safetensors as st
    from ckpt_ir.io import torchzip

    path = os.path.join(root, out.path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    exprs = dict(out.tensors)
    if out.kind in ("safetensors", "torch"):
        writer = TensorWriter(reader, progress)
        try:
            entries = [(n, e.shape, e.dtype) for n, e in out.tensors]
            emit = lambda name, fd, pos: writer(exprs[name], fd, pos)  # noqa: E731
            if out.kind == "safetensors" and out.part is not None:
                st.write_part(path, entries, *out.part, emit, out.metadata)
            elif out.kind == "safetensors":
                st.write(path, entries, emit, out.metadata)
            else:
                torchzip.write(path, out.obj, lambda t, fd, pos: writer(exprs[t.key], fd, pos))
        finally:
            writer.close()
    elif out.kind == "text":
        with open(path, "w") as f:
            f.write(out.text)
    elif out.kind == "copy":
        shutil.copyfile(out.source, path)
    else:  # pragma: no cover
        raise AssertionError(out.kind)
    progress.advance(files=0 if out.part and out.part[0] > 0 else 1)


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


def _split_files(files: list[OutputFile], root: str, workers: int) -> list[OutputFile]:
    """Fewer files than workers (e.g. one large HF shard): split safetensors files into parts of
    about equal bytes, written concurrently at their planned offsets into a pre-created file."""
    import attrs

    from ckpt_ir.io import safetensors as st

    out: list[OutputFile] = []
    for f in files:
        if f.kind != "safetensors" or len(f.tensors) < 2:
            out.append(f)
            continue
        path = os.path.join(root, f.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        st.create(path, [(n, e.shape, e.dtype) for n, e in f.tensors], f.metadata)
        target, lo, acc = f.nbytes / workers, 0, 0
        for i, (_, e) in enumerate(f.tensors):
            acc += e.nbytes
            if acc >= target and i + 1 < len(f.tensors):
                out.append(attrs.evolve(f, part=(lo, i + 1)))
                lo, acc = i + 1, 0
        out.append(attrs.evolve(f, part=(lo, len(f.tensors))))
    return out


def _worker(files: list[OutputFile], root: str, queue) -> None:
    """Body of a worker process: write ``files``, report bytes, then done or the error.
    Ctrl-C is the parent's to handle: it terminates the workers and removes the output."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    class Relay(Progress):
        def advance(self, nbytes: int = 0, files: int = 0) -> None:
            queue.put(("advance", nbytes, files))

    try:
        with E.Reader() as reader:
            for f in files:
                write_file(f, root, reader, Relay(0, 0, False))
        queue.put(("done", reader.bytes_read, 0))
    except CkptIrError as e:
        queue.put(("error", e.exit_code, str(e)))
    except BaseException as e:  # report anything; the parent raises it
        queue.put(("error", 1, f"{type(e).__name__}: {e}"))


def write_files(files: list[OutputFile], root: str, bar: Progress, workers: int) -> int:
    """Write ``files`` under ``root`` with up to ``workers`` processes; returns bytes read."""
    tensor_files = [f for f in files if f.kind in ("safetensors", "torch")]
    if 1 < workers and len(tensor_files) < workers:
        tensor_files = _split_files(tensor_files, root, workers)
    workers = max(1, min(workers, len(tensor_files)))
    if workers == 1:
        with E.Reader() as reader:
            for f in files:
                write_file(f, root, reader, bar)
            return reader.bytes_read
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    import signal

    procs = [ctx.Process(target=_worker, args=(share, root, queue), daemon=True)
             for share in assign(tensor_files, workers)]
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
                    raise CkptIrError("a worker process died (out of memory?); rerun with --workers 1") from None
                continue
            if kind == "advance":
                bar.advance(a, b)
            elif kind == "done":
                read += a
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
    return read


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


def workers_for_budget(plan: Plan, workers: int, max_memory: int) -> int:
    """How many writers fit in ``max_memory``; a CkptIrError if not even one does."""
    name, need = plan.largest_tensor()
    if need > max_memory:
        raise CkptIrError(f"tensor {name} needs about {human_bytes(need)} to produce but the memory budget is "
                          f"{human_bytes(max_memory)}; raise --max-memory")
    return max(1, min(workers, max_memory // max(need, 1)))


def run_checks(plan: Plan) -> None:
    """Tensors the output stores once must really be equal (compared before anything is written)."""
    import numpy as np

    with E.Reader() as reader:
        for name, other, a, b in plan.checks:
            if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(E.evaluate_raw(a, reader),
                                                                              E.evaluate_raw(b, reader)):
                raise CkptIrError(f"{name} differs from {other}, but the target format stores them once; "
                                  f"converting would lose it")


def execute(plan: Plan, dst: str, *, overwrite: bool = False, progress: bool = False,
            workers: int | None = None, max_memory: int | None = None) -> dict[str, float]:
    """Write ``plan`` to ``dst`` atomically; returns simple statistics.  ``max_memory`` bounds
    the tensor data held at once (it limits the number of parallel writers).  Under torchrun
    the tensor files are split between the ranks (each rank may also use local workers)."""
    workers = workers_for_budget(plan, workers or default_workers(), max_memory or default_max_memory())
    run_checks(plan)
    rank, world = distributed_world()
    if world > 1:
        return _execute_distributed(plan, dst, overwrite, progress and rank == 0, 1, rank, world)
    atomic.check_destination(dst, overwrite)
    atomic.check_free_space(dst, plan.nbytes)
    bar = Progress(_tensor_bytes(plan.files), len(plan.files), progress)
    t0 = time.monotonic()
    with atomic.atomic_dir(dst, overwrite) as tmp:
        read = write_files(list(plan.files), tmp, bar, workers)
    return {"seconds": time.monotonic() - t0, "bytes_written": plan.nbytes, "bytes_read": read}


def _tensor_bytes(files) -> int:
    return sum(f.nbytes for f in files if f.kind in ("safetensors", "torch"))


def _execute_distributed(plan: Plan, dst: str, overwrite: bool, progress: bool, workers: int, rank: int,
                         world: int) -> dict[str, float]:
    """torchrun: rank 0 prepares a shared temporary directory, every rank writes its share of the
    tensor files into it, and rank 0 writes the small files last and renames the directory."""
    import torch.distributed as dist

    t0 = time.monotonic()
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    try:
        tag = "dist-" + os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("MASTER_PORT", "0"))
        tmp = atomic.temp_path(dst, tag)
        status: list = [None]
        if rank == 0:
            try:
                atomic.check_free_space(dst, plan.nbytes)
                atomic.prepare(dst, overwrite, tag)
            except CkptIrError as e:
                status = [(e.exit_code, str(e))]
        dist.broadcast_object_list(status, src=0)
        if status[0]:
            raise _error(status[0])
        tensor_files = [f for f in plan.files if f.kind in ("safetensors", "torch")]
        mine = assign(tensor_files, world)[rank] if tensor_files else []
        bar = Progress(_tensor_bytes(mine), len(mine), progress)
        mine_status, read = None, 0
        try:
            read = write_files(mine, tmp, bar, workers)
        except CkptIrError as e:
            mine_status = (e.exit_code, str(e))
        statuses: list = [None] * world
        dist.all_gather_object(statuses, mine_status)
        failed = [s for s in statuses if s]
        if rank == 0:
            if failed:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                try:
                    with E.Reader() as reader:
                        for f in plan.files:
                            if f.kind not in ("safetensors", "torch"):
                                write_file(f, tmp, reader, Progress(0, 0, False))
                    atomic.commit(tmp, dst)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        dist.barrier()
        if failed:
            raise _error(failed[0])
        totals = [0] * world
        dist.all_gather_object(totals, read)
        return {"seconds": time.monotonic() - t0, "bytes_written": plan.nbytes, "bytes_read": sum(totals)}
    finally:
        if owns_group:
            dist.destroy_process_group()


def _error(status: tuple[int, str]) -> CkptIrError:
    err = CkptIrError(status[1])
    err.exit_code = status[0]
    return err
