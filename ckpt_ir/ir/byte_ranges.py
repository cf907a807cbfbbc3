"""Sets of byte ranges of files, overlaps counted once: what a conversion reads of its sources."""

from __future__ import annotations

from collections.abc import Iterable

Range = tuple[str, int, int]  # (path, offset, length)


class RangeSet:
    """Byte ranges of files with overlaps counted once: the source bytes a process has read.
    Each file's ranges are kept merged, sorted and disjoint (reads of whole tensors, mostly
    adjacent, merge into few), so it stays small however many times a byte is read."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[list[int], list[int]]] = {}  # path -> (starts, ends)
        self.nbytes = 0

    def add(self, path: str, start: int, length: int) -> None:
        if length <= 0:
            return
        from bisect import bisect_left, bisect_right

        end = start + length
        starts, ends = self._files.setdefault(path, ([], []))
        within = bisect_right(starts, start) - 1
        if within >= 0 and end <= ends[within]:  # read before (a replicated tensor, say)
            return
        lo = bisect_left(ends, start)  # the first range ending at or after ``start`` (touching merges)
        hi = bisect_right(starts, end)  # past the last range starting at or before ``end``
        if lo < hi:
            start, end = min(start, starts[lo]), max(end, ends[hi - 1])
            self.nbytes -= sum(ends[i] - starts[i] for i in range(lo, hi))
        starts[lo:hi], ends[lo:hi] = [start], [end]
        self.nbytes += end - start

    def update(self, ranges: Iterable[Range]) -> None:
        for path, start, length in ranges:
            self.add(path, start, length)
