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
    import torch

    t = E.evaluate(expr, reader)
    if tuple(t.shape) != expr.shape:
        raise CkptIrError(f"internal: evaluated shape {tuple(t.shape)} != planned {expr.shape}")
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


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


def execute(plan: Plan, dst: str, *, overwrite: bool = False, progress: bool = False) -> dict[str, float]:
    """Write ``plan`` to ``dst`` atomically; returns simple statistics."""
    atomic.check_destination(dst, overwrite)
    atomic.check_free_space(dst, plan.nbytes)
    bar = Progress(sum(f.nbytes for f in plan.files if f.kind in ("safetensors", "torch")), len(plan.files), progress)
    t0 = time.monotonic()
    with atomic.atomic_dir(dst, overwrite) as tmp, E.Reader() as reader:
        for f in plan.files:
            write_file(f, tmp, reader, bar)
        read = reader.bytes_read
    return {"seconds": time.monotonic() - t0, "bytes_written": plan.nbytes, "bytes_read": read}
