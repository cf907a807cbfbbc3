"""Write what ``ckpt-ir models`` generates into the docs: the support matrix into
docs/families.md (between its two marker lines) and the transformers coverage report as
docs/coverage.md.

    python tools/family_docs.py            # rewrite both
    python tools/family_docs.py --check    # exit 1 when either is not what this writes

tests/test_support_matrix.py fails when they are stale: after changing a family's table (its
``tested`` claims, names, MindSpeed names) or the coverage reasons, or with another transformers,
rerun this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's ckpt_ir, whatever is installed
FAMILIES = REPO / "docs" / "families.md"
COVERAGE = REPO / "docs" / "coverage.md"
BEGIN = "<!-- begin: ckpt-ir models --format markdown -->"
END = "<!-- end: ckpt-ir models --format markdown -->"


def families_md(current: str) -> str:
    """docs/families.md with the matrix between the markers replaced by today's."""
    from ckpt_ir.commands.models import matrix_markdown

    head, sep, rest = current.partition(BEGIN + "\n")
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{FAMILIES}: the marker lines {BEGIN!r} and {END!r} are missing")
    return head + sep + matrix_markdown() + sep2 + tail


def coverage_md() -> str:
    from ckpt_ir.commands.models import coverage_markdown

    return coverage_markdown()


def outputs() -> dict[Path, str]:
    return {FAMILIES: families_md(FAMILIES.read_text()), COVERAGE: coverage_md()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a generated doc is stale, write nothing")
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if not path.is_file() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print(f"{', '.join(map(str, stale))}: stale; run python tools/family_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
