"""IR dumps: text (one tensor per line, aligned), JSON, and Graphviz DOT of the expression graph."""

from __future__ import annotations

import json
from typing import Any

from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, to_text
from ckpt_ir.ir.expr import describe

__all__ = ["describe", "render", "to_text", "to_json", "to_dot"]


def expr_json(e: E.Expr) -> dict[str, Any]:
    d: dict[str, Any] = {"op": type(e).__name__.lower(), "shape": list(e.shape), "dtype": e.dtype}
    if isinstance(e, E.Load):
        d.update(path=e.path, key=e.key, offset=e.offset, rows=list(e.rows) if e.rows else None)
    elif isinstance(e, E.Slice):
        d.update(dim=e.dim, start=e.start, stop=e.stop)
    elif isinstance(e, E.Concat):
        d.update(dim=e.dim)
    elif isinstance(e, E.Cast):
        d.update(to=e.to)
    elif isinstance(e, E.PadRows):
        d.update(rows=e.rows, zero=e.zero)
    elif isinstance(e, E.Transpose):
        d.update(dims=[e.dim0, e.dim1])
    elif isinstance(e, E.Scale):
        d.update(factor=e.factor)
    elif isinstance(e, (E.Offset, E.Fill)):
        d.update(value=e.value)
    if e.children:
        d["inputs"] = [expr_json(c) for c in e.children]
    return d


def to_json(ckpt: Checkpoint) -> str:
    def tensor_list(tensors) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "split": None
                if t.split is None or t.tp == 1
                else {
                    "dim": t.split.dim,
                    "blocks": t.split.blocks,
                    **({"sizes": list(t.split.sizes)} if t.split.sizes else {}),
                    "tp": t.tp,
                },
                "shards": [expr_json(s) for s in t.shards],
            }
            for name, t in tensors.items()
        ]

    doc = {
        "source": ckpt.source,
        "spec": ckpt.spec.summary(),
        "layout": {k: (list(v) if isinstance(v, tuple) else v) for k, v in _layout_dict(ckpt).items()},
        "tensors": tensor_list(ckpt.tensors),
        "states": {k: tensor_list(v) for k, v in ckpt.states.items()},
        "dropped": ckpt.dropped,
    }
    return json.dumps(doc, indent=1)


def _layout_dict(ckpt: Checkpoint) -> dict[str, Any]:
    import attrs

    return attrs.asdict(ckpt.layout)


def to_dot(ckpt: Checkpoint) -> str:
    from ckpt_ir.ir.graph import expression_graph

    g = expression_graph(ckpt)
    lines = ["digraph ckpt {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    for n, data in g.nodes(data=True):
        label = data.get("label", str(n)).replace('"', "'")
        lines.append(f'  "{n}" [label="{label}"];')
    for a, b in g.edges():
        lines.append(f'  "{a}" -> "{b}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(ckpt: Checkpoint, fmt: str = "text") -> str:
    return {"text": to_text, "json": to_json, "dot": to_dot}[fmt](ckpt)
