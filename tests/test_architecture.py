"""The package's import structure, read from the code itself (every import, function-local ones
included): no import cycle between modules, and each layer imports only the layers below it.

    errors, device
    ir            the IR: spec, layout, roles, rules, expressions, checkpoint, printer, verifier
    io            file formats read byte-wise (safetensors, torch zip, DCP, pickles), atomic output
    families      declarative tables, one per model family
    quant         quantized HF storage (FP8, MXFP4)
    megatron      everything Megatron: keys, args, ranks, distributed optimizer, the shared lift
    frontends     read a format, lift it; never import each other, a backend, a pass or a command
    passes        transformations over the IR (a Megatron target's facts from megatron)
    backends      plan files from metadata, then stream
    api, live     the library's face
    commands      the CLI
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ckpt_ir"

# each layer with the layers it may import (besides itself); the package's __init__ re-exports
# the errors and may import nothing else
ALLOWED = {
    "errors": set(),
    "device": {"errors"},
    "ir": {"errors", "device"},
    "io": {"errors", "ir"},
    "families": {"errors", "ir"},
    "quant": {"errors", "ir", "io"},
    "megatron": {"errors", "ir", "io", "families"},
    "frontends": {"errors", "ir", "io", "families", "quant", "megatron"},
    "passes": {"errors", "ir", "io", "families", "quant", "megatron", "frontends", "device"},
    "backends": {"errors", "ir", "io", "families", "quant", "megatron", "frontends"},
    "api": {
        "errors",
        "ir",
        "io",
        "families",
        "quant",
        "megatron",
        "frontends",
        "passes",
        "backends",
        "device",
    },
    "live": {"errors", "ir", "io", "families", "quant", "megatron", "frontends", "passes", "backends", "api"},
    "commands": {
        "errors",
        "ir",
        "io",
        "families",
        "quant",
        "megatron",
        "frontends",
        "passes",
        "backends",
        "api",
        "device",
    },
    "__init__": {"errors"},
    "__main__": {"commands"},
}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """module -> the ckpt_ir modules it imports anywhere in its body."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                base = base.rstrip(".")
                # "from ckpt_ir.x import y" imports the module y when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t.startswith("ckpt_ir") and t != name and t != "ckpt_ir":
                    found.add(t)
        out[name] = found
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_package_has_no_import_cycle():
    g = nx.DiGraph([(a, b) for a, bs in _imports().items() for b in bs])
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {sorted(cycles, key=len)[:5]}"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    bad = sorted(
        f"{a} imports {b}"
        for a, bs in _imports().items()
        if _layer(a) == layer
        for b in bs
        if _layer(b) != layer and _layer(b) not in ALLOWED[layer]
    )
    assert not bad, bad


def test_every_layer_is_known():
    assert {_layer(m) for m in _imports()} <= set(ALLOWED)


def test_frontends_do_not_import_each_other():
    """What two frontends share lives below both; only the package's dispatcher names each."""
    bad = sorted(
        f"{a} imports {b}"
        for a, bs in _imports().items()
        if a.startswith("ckpt_ir.frontends.")
        for b in bs
        if b.startswith("ckpt_ir.frontends")
    )
    assert not bad, bad


def test_the_checker_sees_function_local_imports(tmp_path):
    """The graph is read from every import statement, not only the module-level ones."""
    assert "ckpt_ir.megatron.ranks" in _imports()["ckpt_ir.frontends.torch_dist"]


def test_any_family_module_imported_first_registers_every_family():
    """A family table module imported on its own (``from ckpt_ir.families.vlm import ...`` before
    anything else) registers its families and the rest load on the first lookup, with no import
    cycle between the table modules."""
    import pkgutil
    import subprocess
    import sys

    import ckpt_ir.families as families

    names = sorted(m.name for m in pkgutil.iter_modules(families.__path__))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m.startswith('ckpt_ir.families')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module('ckpt_ir.families.' + name)\n"
        "    import ckpt_ir.families as f\n"
        "    print(name, len(f.all_families()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1:]
    counts = dict(line.split() for line in out.stdout.split("\n") if line)
    assert sorted(counts) == names
    assert set(counts.values()) == {str(len(families.all_families()))}, counts
