"""Floating-point casts in numpy, bit for bit as torch's (``Tensor.to``), NaNs included.

A cast is the one computation of most conversions, so it runs without torch: importing torch alone
costs about 200 MB of resident memory, more than the row blocks a cast streams through.
``tests/test_blockwise.py`` compares every supported pair with torch on all 16-bit values and on
random 32-bit patterns (normals, subnormals, infinities, overflow, NaN payloads).  A cast to a
narrower range also counts the finite values it turned into infinities, in the same pass (two
reductions per chunk; the elements are looked at again only in a chunk that holds such a value).
"""

from __future__ import annotations

import numpy as np

from ckpt_ir.ir.dtypes import OVERFLOW_AT

FLOATS = ("F32", "BF16", "F16")


def supported(src: str, dst: str) -> bool:
    return src in FLOATS and dst in FLOATS and src != dst


# elements per step: each step is several numpy passes, which run twice as fast on data that
# stays in the CPU's cache (measured) and keep the temporaries small
CHUNK = 1 << 18


def cast(raw: np.ndarray, src: str, dst: str, out: np.ndarray) -> tuple[int, float]:
    """Cast the raw items ``raw`` (numpy integers of ``src``'s width) to ``dst`` into ``out``
    (raw items of ``dst``'s width, same shape).  Returns the overflow: how many finite values
    became infinite (``dst``'s range is smaller) and the largest |x| of them, (0, 0.0) if none."""
    flat, flat_out = raw.reshape(-1), out.reshape(-1)
    count, max_abs = 0, 0.0
    for i in range(0, flat.size, CHUNK):
        n, m = _cast(flat[i : i + CHUNK], src, dst, flat_out[i : i + CHUNK])
        count, max_abs = count + n, max(max_abs, m)
    return count, max_abs


def _cast(raw: np.ndarray, src: str, dst: str, out: np.ndarray) -> tuple[int, float]:
    if src == "F32":
        return from_f32(raw.view(np.uint32), dst, out)
    if dst == "F32":  # exact: every bf16 and fp16 value is an fp32 value
        to_f32(raw, src, out.view(np.float32))
        return 0, 0.0
    # bf16 <-> fp16 goes through fp32 (exact), as torch's does; but fp16 -> bf16 writes a NaN as 0x7FC0
    wide = np.empty(raw.shape, np.float32)
    to_f32(raw, src, wide)
    return from_f32(wide.view(np.uint32), dst, out, bf16_nan=0x7FC0)


def to_f32(raw: np.ndarray, src: str, out: np.ndarray) -> None:
    """One chunk of :func:`cast` to fp32: ``raw`` (1-D, ``src``'s width) into the fp32 ``out``."""
    if src == "BF16":  # the top half of an fp32: exact
        np.left_shift(raw.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = raw.view(np.float16)
        nan = np.isnan(out)
        if nan.any():  # torch keeps the payload and sets the quiet bit
            bits = raw.view(np.uint16)[nan].astype(np.uint32)
            out.view(np.uint32)[nan] = ((bits & 0x8000) << 16) | 0x7FC00000 | ((bits & 0x3FF) << 13)


def from_f32(
    u: np.ndarray, dst: str, out: np.ndarray, bf16_nan: int = 0xFFFF, scratch: np.ndarray | None = None
) -> tuple[int, float]:
    """One chunk of :func:`cast` from fp32: the bits ``u`` (1-D uint32) into ``out`` (``dst``'s
    width); ``scratch`` (uint32, ``u``'s size) spares an allocation.  Returns the overflow as
    :func:`cast` does."""
    out16 = out.view(np.uint16)
    if dst == "BF16":  # round to nearest even on the upper half; torch writes an fp32 NaN as 0xFFFF
        bias = np.right_shift(u, 16, out=scratch)
        np.bitwise_and(bias, 1, out=bias)
        bias += 0x7FFF
        bias += u
        np.right_shift(bias, 16, out=out16, casting="unsafe")  # the upper half: fits 16 bits
    else:
        with np.errstate(over="ignore"):  # overflow to infinity is the cast's meaning
            out16[...] = u.view(np.float32).astype(np.float16).view(np.uint16)
    if not u.size:
        return 0, 0.0
    f = u.view(np.float32)
    # two reductions (a NaN propagates through both) tell whether the chunk needs a second look
    hi, lo, limit = np.maximum.reduce(f), np.minimum.reduce(f), OVERFLOW_AT[dst]
    if -limit < lo and hi < limit:
        return 0, 0.0
    if np.isnan(hi) or np.isnan(lo):
        nan = np.isnan(f)
        if dst == "BF16":
            out16[nan] = bf16_nan
        else:  # quiet NaN keeping the sign and the payload's top bits
            bits = u[nan]
            out16[nan] = (((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)).astype(np.uint16)
    magnitude = np.abs(f)
    overflow = (magnitude >= limit) & (magnitude != np.inf)  # an infinity of the source stays one
    count = int(np.count_nonzero(overflow))
    return count, float(magnitude[overflow].max()) if count else 0.0
