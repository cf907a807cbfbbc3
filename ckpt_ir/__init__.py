"""ckpt-ir: a format-agnostic checkpoint IR with compiler-style passes.

Lift a checkpoint (HF safetensors, Megatron-Core rank directories) into a typed, lazy tensor IR,
transform it with an ordered pipeline of passes, and lower it to another format.  Nothing is read
from disk until a backend writes the bytes.

The heavy dependencies (torch, transformers) are imported only where a command needs them, so
``import ckpt_ir`` and ``ckpt-ir --help`` stay fast.
"""

__version__ = "0.1.0"

from ckpt_ir.errors import (  # noqa: E402
    CkptIrError,
    CoverageError,
    FormatError,
    LayoutError,
    UsageError,
    VerifyError,
)

__all__ = [
    "CkptIrError",
    "CoverageError",
    "FormatError",
    "LayoutError",
    "UsageError",
    "VerifyError",
    "__version__",
]
