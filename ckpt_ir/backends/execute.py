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


def write_file(out: OutputFile, root: str, reader: E.Reader, progress: Progress) -> None:
    from ckpt_ir.io import safetensors as st
    from ckpt_ir.io import torchzip

    path = os.path.join(root, out.path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    exprs = dict(out.tensors)
    if out.kind == "safetensors":
        entries = [(n, e.shape, e.dtype) for n, e in out.tensors]

        def produce(name: str) -> memoryview:
            buf = tensor_bytes(exprs[name], reader)
            progress.advance(len(buf))
            return buf

        st.write(path, entries, produce, out.metadata)
    elif out.kind == "torch":
        def produce_t(t: torchzip.Tensor) -> memoryview:
            buf = tensor_bytes(exprs[t.key], reader)
            progress.advance(len(buf))
            return buf

        torchzip.write(path, out.obj, produce_t)
    elif out.kind == "text":
        with open(path, "w") as f:
            f.write(out.text)
            f.flush()
            os.fsync(f.fileno())
    elif out.kind == "copy":
        shutil.copyfile(out.source, path)
    else:  # pragma: no cover
        raise AssertionError(out.kind)
    progress.advance(files=1)


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


def _worker(files: list[OutputFile], root: str, queue) -> None:
    """Body of a worker process: write ``files``, report bytes, then done or the error."""
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
    workers = max(1, min(workers, len(tensor_files)))
    if workers == 1:
        with E.Reader() as reader:
            for f in files:
                write_file(f, root, reader, bar)
            return reader.bytes_read
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(share, root, queue), daemon=True)
             for share in assign(tensor_files, workers)]
    for p in procs:
        p.start()
    read, running, error = 0, len(procs), None
    try:
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
                error = error or CkptIrError(b)
                error.exit_code = a
                running -= 1
                for p in procs:
                    p.terminate()
                break
    finally:
        for p in procs:
            p.join()
    if error:
        raise error
    with E.Reader() as reader:  # small text files and copies, after the data
        for f in files:
            if f.kind not in ("safetensors", "torch"):
                write_file(f, root, reader, bar)
    return read


def execute(plan: Plan, dst: str, *, overwrite: bool = False, progress: bool = False,
            workers: int | None = None) -> dict[str, float]:
    """Write ``plan`` to ``dst`` atomically; returns simple statistics."""
    atomic.check_destination(dst, overwrite)
    atomic.check_free_space(dst, plan.nbytes)
    bar = Progress(sum(f.nbytes for f in plan.files if f.kind in ("safetensors", "torch")), len(plan.files), progress)
    t0 = time.monotonic()
    with atomic.atomic_dir(dst, overwrite) as tmp:
        read = write_files(list(plan.files), tmp, bar, workers or default_workers())
    return {"seconds": time.monotonic() - t0, "bytes_written": plan.nbytes, "bytes_read": read}
