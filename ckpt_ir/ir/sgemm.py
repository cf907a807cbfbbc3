"""fp32 matrix products from the BLAS routine torch's CPU build calls, without importing torch.

A LoRA merge needs one rank-r product per weight, and its result must be torch's bit for bit
(``torch.mm`` on fp32 CPU tensors is the reference every test holds the merge to).  Importing
torch costs about 3 CPU-seconds and 200 MB before the first byte moves; on a 4 GB merge that was a
third of the time the disk needs.  torch's x86 wheels link Intel MKL into ``libtorch_cpu`` and
call its ``sgemm_`` for every fp32 ``mm`` (``at::native::cpublas::gemm``).  Loading that library
with ctypes takes about 0.4 s, and calling ``sgemm_`` with the arguments torch passes gives torch's
bits: the same code on the same CPU.  The rest of the merge (scale, add, rounding) is elementwise
IEEE arithmetic that numpy performs identically (:func:`ckpt_ir.ir.expr.numpy_merge`).

Only used where the library is torch's MKL build (it exports ``mkl_serv_get_version``); anywhere
else (aarch64 and macOS wheels use other BLAS libraries) :func:`available` is False and the merge
imports torch.  ``CKPT_IR_MATMUL=torch`` forces torch (the tests compare the two paths).
``tests/test_sgemm.py`` compares this with ``torch.mm`` on many shapes, ranks and thread counts.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from typing import Any

INT_MAX = 2**31 - 1  # the LP64 BLAS interface takes 32-bit dimensions


@functools.cache
def library() -> Any:
    """torch's ``libtorch_cpu`` with MKL's ``sgemm_``, loaded (not imported), or None."""
    if os.environ.get("CKPT_IR_MATMUL", "") == "torch" or not sys.platform.startswith("linux"):
        return None
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        for symbol in ("sgemm_", "mkl_serv_get_version", "mkl_set_num_threads_local"):
            getattr(lib, symbol)
    except (OSError, AttributeError):
        return None
    lib.mkl_set_num_threads_local.restype = ctypes.c_int
    return lib


def available() -> bool:
    return library() is not None


def loaded() -> bool:
    """Whether this process has loaded the library (its unloading at exit is slow: see cli.run)."""
    return library.cache_info().currsize > 0 and library() is not None


# sgemm_'s constant arguments (Fortran passes every argument by reference); MKL never writes them
_NO_TRANS = ctypes.c_char(b"N")
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)
_SINGLE = ctypes.c_int(1)


def _address(x) -> int:
    return x.__array_interface__["data"][0]


def matmul(b, a, out) -> None:
    """``out = b @ a`` for C-contiguous 2-D float32 numpy arrays, as ``torch.mm(b, a, out=out)``.

    torch sees row-major matrices as column-major transposes and computes ``out^T = a^T b^T``:
    ``sgemm_('N', 'N', n, m, k, 1, a, n, b, k, 0, out, n)``.  MKL runs single-threaded here (the
    writers already use every core); its sum over ``k`` does not depend on the thread count."""
    lib = library()
    m, k = b.shape
    n = a.shape[1]
    assert a.shape[0] == k and out.shape == (m, n) and max(m, n, k) <= INT_MAX
    assert all(x.dtype.char == "f" and x.flags.c_contiguous for x in (a, b, out))
    if not m or not n:
        return
    dims = (ctypes.c_int * 5)(n, m, k, max(n, 1), max(k, 1))
    ref = ctypes.byref
    previous = ctypes.c_int(lib.mkl_set_num_threads_local(ref(_SINGLE)))
    try:
        lib.sgemm_(
            ref(_NO_TRANS),
            ref(_NO_TRANS),
            ref(dims, 0),
            ref(dims, 4),
            ref(dims, 8),
            ref(_ONE),
            ctypes.c_void_p(_address(a)),
            ref(dims, 12),
            ctypes.c_void_p(_address(b)),
            ref(dims, 16),
            ref(_ZERO),
            ctypes.c_void_p(_address(out)),
            ref(dims, 12),
        )
    finally:
        lib.mkl_set_num_threads_local(ref(previous))
