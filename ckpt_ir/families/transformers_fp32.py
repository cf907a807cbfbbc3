"""Which tensors transformers keeps in fp32 when it loads a family's model in half precision.

``from_pretrained(path, dtype=torch.bfloat16)`` gives every tensor the requested dtype except
(``PreTrainedModel._get_dtype_plan``): those matching the model class's
``_keep_in_fp32_modules_strict`` (under fp16 and bf16) and ``_keep_in_fp32_modules`` (under fp16
only), each entry a glob searched for in the tensor's name, and the parameters the class creates in
fp32 whatever the dtype (Hunyuan's router), which its table states as ``Family.fp32_in_transformers``.

The two class attributes are read from the modeling module's source, not by importing it:
importing a model class imports torch (about 200 MB and seconds), which a numpy cast does not
need.  A class whose attributes the source does not state as literals is imported after all.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import os
import re
from typing import Any

from ckpt_ir.families import Family

ATTRIBUTES = ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")


def kept_in_fp32(family: Family, dtype: str) -> re.Pattern[str] | None:
    """What transformers keeps in fp32 when it loads ``family`` in ``dtype`` (an IR dtype), as a
    pattern to search HF tensor names with; None when it keeps nothing."""
    if dtype not in ("F16", "BF16"):
        return None
    attributes = class_attributes(family.architecture, family.model_types)
    globs = [*family.fp32_in_transformers, *attributes["_keep_in_fp32_modules_strict"]]
    if dtype == "F16":
        globs += attributes["_keep_in_fp32_modules"]
    return re.compile("|".join(g.replace("*", ".*") for g in globs)) if globs else None


@functools.cache
def class_attributes(architecture: str, model_types: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """The two attributes of transformers' class ``architecture`` (inherited values included;
    empty where unset, or where transformers has no such class)."""
    source = _modeling_source(architecture, model_types)
    if source is None:
        return dict.fromkeys(ATTRIBUTES, ())
    classes = {n.name: n for n in ast.parse(source[1]).body if isinstance(n, ast.ClassDef)}
    try:
        return {a: tuple(_lookup(classes, architecture, a) or ()) for a in ATTRIBUTES}
    except ValueError:  # not stated as a literal beside the class: ask the class itself
        cls = getattr(importlib.import_module(source[0]), architecture)
        return {a: tuple(getattr(cls, a, None) or ()) for a in ATTRIBUTES}


def _lookup(classes: dict[str, ast.ClassDef], name: str, attribute: str) -> Any:
    """``attribute`` of class ``name`` as Python would find it (the class, then its bases in
    order); ValueError where that depends on something the source does not state as a literal."""
    node = classes[name]
    for stmt in node.body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == attribute for t in targets):
            return ast.literal_eval(value)
    for base in node.bases:
        base_name = base.id if isinstance(base, ast.Name) else None
        if base_name in ("PreTrainedModel", "GenerationMixin"):  # transformers' own: unset there
            continue
        if base_name not in classes:
            raise ValueError(f"{name}: base {ast.unparse(base)} is defined elsewhere")
        value = _lookup(classes, base_name, attribute)
        if value is not None:
            return value
    return None


def _modeling_source(architecture: str, model_types: tuple[str, ...]) -> tuple[str, str] | None:
    """(module name, source) of the transformers module defining class ``architecture``: the
    model type's own module, else the one that defines it (gemma3_text's class is in gemma3's)."""
    spec = importlib.util.find_spec("transformers")  # locates the package without importing it
    if spec is None or spec.origin is None:
        return None
    models = os.path.join(os.path.dirname(spec.origin), "models")

    def others():
        for d in sorted(os.listdir(models)):
            if os.path.isdir(os.path.join(models, d)):
                yield from (
                    f"{d}/{f}"
                    for f in sorted(os.listdir(os.path.join(models, d)))
                    if f.startswith("modeling_")
                )

    for rel in itertools.chain((f"{t}/modeling_{t}.py" for t in model_types), others()):
        try:
            with open(os.path.join(models, rel), encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        if re.search(rf"^class {re.escape(architecture)}\(", text, re.MULTILINE):
            return "transformers.models." + rel[: -len(".py")].replace("/", "."), text
    return None
