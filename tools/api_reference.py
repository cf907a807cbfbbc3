"""Write docs/api.md, the Python API reference, from the docstrings of what ``ckpt_ir.api`` and
``ckpt_ir.live`` export (``__all__``) and of the errors they raise.

    python tools/api_reference.py            # rewrite docs/api.md
    python tools/api_reference.py --check    # exit 1 when docs/api.md is not what this writes

tests/test_api.py fails when docs/api.md is stale: change a docstring, rerun this.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "api.md"
ROLE = re.compile(r":(?:func|class|meth|attr|mod|data):`~?(?:[\w.]+\.)?(\w+)`")  # :func:`~a.b.name` -> `name`


def markdown(doc: str) -> str:
    """A docstring (reStructuredText roles and literals) as Markdown."""
    return ROLE.sub(r"`\1`", doc).replace("``", "`")


def signature(name: str, obj: object) -> str:
    """``name(param: annotation = default, ...) -> annotation`` (``param=default`` without an
    annotation, as PEP 8 spaces it), as the source writes the annotations (the same text on every
    Python version)."""
    sig = inspect.signature(obj)  # type: ignore[arg-type]
    parts, keyword_only = [], False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        text = p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)}"
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + (
                "..." if repr(p.default) == "NOTHING" else repr(p.default)
            )  # an attrs factory
        parts.append(text)
    ret = sig.return_annotation
    arrow = "" if ret in (sig.empty, None, "None") or inspect.isclass(obj) else f" -> {ret}"
    return f"{name}({', '.join(parts)}){arrow}"


def members(cls: type) -> list[tuple[str, object]]:
    """The public methods and properties ``cls`` itself defines with a docstring."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        target = value.fget if isinstance(value, property) else getattr(value, "func", value)
        if (inspect.isfunction(target) or isinstance(value, property)) and inspect.getdoc(value):
            out.append((name, value))
    return out


def entry(name: str, obj: object) -> list[str]:
    kind = "class " if inspect.isclass(obj) else ""
    lines = [f"## {kind}`{name}`", ""]
    if callable(obj) and not (inspect.isclass(obj) and issubclass(obj, Exception)):
        lines += ["```python", signature(name, obj), "```", ""]
    lines += [markdown(inspect.getdoc(obj) or "(no docstring)"), ""]
    if inspect.isclass(obj) and not issubclass(obj, Exception):
        for member, value in members(obj):
            title = (
                f"{name}.{member}" if isinstance(value, property) else signature(f"{name}.{member}", value)
            )
            lines += [f"### `{title}`", "", markdown(inspect.getdoc(value) or ""), ""]
    return lines


def reference() -> str:
    """The text of docs/api.md."""
    import ckpt_ir
    import ckpt_ir.api as api

    lines = [
        "# Python API reference",
        "",
        "<!-- generated from the docstrings by tools/api_reference.py; edit those and rerun it -->",
        "",
        markdown(inspect.getdoc(api) or ""),
        "",
    ]
    for name in api.__all__:
        lines += entry(name, getattr(api, name))
    import ckpt_ir.live as live

    lines += ["# Live weights: `ckpt_ir.live`", "", markdown(inspect.getdoc(live) or ""), ""]
    for name in live.__all__:
        lines += entry(name, getattr(live, name))
    lines += [
        "# Errors",
        "",
        markdown(inspect.getdoc(ckpt_ir.errors) or ""),
        "",
    ]
    for name in ckpt_ir.__all__:
        obj = getattr(ckpt_ir, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            lines += entry(name, obj)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale, write nothing")
    args = p.parse_args(argv)
    text = reference()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT}: stale; run python tools/api_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
