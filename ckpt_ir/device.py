"""Where arithmetic runs: ``--device cpu|cuda[:N]|npu[:N]`` for the passes that compute (casts,
LoRA merges) and for ``verify``'s forward.  Data movement never needs a device; only math does."""

from __future__ import annotations

from ckpt_ir.errors import UsageError


def resolve_device(name: str):
    """``cpu``, ``cuda[:N]`` or ``npu[:N]`` as a torch device; a missing device is a one-line error.
    ``npu`` imports torch_npu (Ascend) only when asked."""
    import torch

    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "npu") or index and not index.isdigit():
        raise UsageError(f"--device {name!r}: choose cpu, cuda[:N] or npu[:N]")
    if kind == "cpu":
        return torch.device(name)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device(name)
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            raise UsageError(
                f"--device {name}: torch_npu is not installed; pip install 'ckpt-ir[npu]' on an Ascend "
                f"machine, or use --device cpu"
            ) from None
        npu = getattr(torch, "npu", None)  # torch_npu registers torch.npu on import
        if npu is None or not npu.is_available():
            raise UsageError(f"--device {name}: torch_npu found no Ascend NPU; use --device cpu")
    return torch.device(name)
