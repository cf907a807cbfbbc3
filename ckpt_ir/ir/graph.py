"""A networkx view of a checkpoint's expression DAG: source files -> loads -> ops -> tensors.
Used for DOT dumps and for ordering work so each source file is read once, in order."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import networkx as nx

from ckpt_ir.ir import expr as E

if TYPE_CHECKING:
    from ckpt_ir.ir.checkpoint import Checkpoint


def expression_graph(ckpt: Checkpoint) -> nx.DiGraph:
    g = nx.DiGraph()
    ids: dict[int, str] = {}

    def node(e: E.Expr) -> str:
        key = id(e)
        if key in ids:
            return ids[key]
        nid = f"n{len(ids)}"
        ids[key] = nid
        if isinstance(e, E.Load):
            fid = "file:" + os.path.basename(e.path)
            g.add_node(fid, label=os.path.basename(e.path), kind="file")
            rows = f"[{e.rows[0]}:{e.rows[1]}]" if e.rows else ""
            g.add_node(nid, label=f"load {e.key}{rows}", kind="load")
            g.add_edge(fid, nid)
        else:
            g.add_node(nid, label=f"{type(e).__name__.lower()} {list(e.shape)}", kind="op")
            for c in e.children:
                g.add_edge(node(c), nid)
        return nid

    for name, t in ckpt.tensors.items():
        g.add_node(name, label=f"{name} {list(t.shape)} {t.dtype}", kind="tensor")
        for s in t.shards:
            g.add_edge(node(s), name)
    return g
