"""Pass infrastructure: registry, typed options, MLIR-style pipeline text, and instrumentation.

A pass is a small class with a ``name``, a one-line ``summary``, typed ``options``, and what it
``requires`` of / ``guarantees`` about the layout; it transforms a Checkpoint and returns a new one.
Optimizer state (``Checkpoint.states``) follows every pass that moves tensors (each state set is
run through the pass like the weights), is kept as is by passes that change values (cast), or is
dropped where it has no meaning any more (LoRA merge): ``Pass.optimizer_state`` says which.
Passes know nothing about printing or timing: the :class:`PassManager` verifies the IR after every
pass and runs the instrumentation (print before/after, dumps, statistics) for all of them.

Pipeline text: ``gather,unfuse-qkv,cast{dtype=bf16 keep-norms=true},select-layers{keep=0,1,-1}``.
It round-trips: ``str(parse_pipeline(t))`` prints a pipeline that parses to the same thing.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar, TextIO

import attrs

from ckpt_ir.errors import UsageError
from ckpt_ir.ir.checkpoint import Checkpoint


@attrs.frozen
class Option:
    name: str
    type: type  # int, float, str, bool, or tuple (a comma list of ints)
    default: Any = None
    help: str = ""
    required: bool = False

    def parse(self, text: str) -> Any:
        try:
            if self.type is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if self.type is tuple:
                return tuple(int(x) for x in text.split(",") if x.strip() != "")
            return self.type(text)
        except ValueError:
            kind = {tuple: "a comma-separated list of integers"}.get(self.type, self.type.__name__)
            raise UsageError(f"option {self.name}={text!r}: expected {kind}") from None

    def format(self, value: Any) -> str:
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)


class Pass:
    """Base class.  Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    requires: ClassVar[str] = "-"
    guarantees: ClassVar[str] = "-"
    # what happens to optimizer-state tensor sets: "follow" (run_state on each), "keep", "drop"
    optimizer_state: ClassVar[str] = "follow"

    def __init__(self, **values: Any) -> None:
        known = {o.name: o for o in self.options}
        for k in values:
            if k not in known:
                raise UsageError(f"pass {self.name}: unknown option {k!r}; options: "
                                 f"{', '.join(known) or '(none)'}")
        self.values = {o.name: values.get(o.name, o.default) for o in self.options}
        for o in self.options:
            if o.required and self.values[o.name] is None:
                raise UsageError(f"pass {self.name}: option {o.name} is required")

    def opt(self, name: str) -> Any:
        return self.values[name]

    def run(self, ckpt: Checkpoint) -> Checkpoint:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_state(self, ckpt: Checkpoint, state: str) -> Checkpoint:
        """The pass on optimizer-state set ``state`` (``ckpt.tensors`` holds that set's tensors, not
        the weights).  Moving tensors works the same on weights and on their state; override where
        the state needs other values (e.g. zeros, not copies, for padding moments)."""
        return self.run(ckpt)

    def __str__(self) -> str:
        set_opts = [f"{o.name}={o.format(self.values[o.name])}" for o in self.options
                    if self.values[o.name] is not None and self.values[o.name] != o.default]
        return self.name + ("{" + " ".join(set_opts) + "}" if set_opts else "")


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name to pipelines, the CLI and ``ckpt-ir passes``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _PASSES[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    _load_builtin()
    return dict(_PASSES)


_entry_points_loaded = False


def _load_builtin() -> None:
    """Register the built-in passes, then any that installed packages declare under the
    ``ckpt_ir.passes`` entry-point group (each entry point names a module or a Pass class)."""
    global _entry_points_loaded
    from ckpt_ir import passes  # noqa: F401  (importing the package registers the built-in passes)

    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="ckpt_ir.passes"):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break the tool
            import warnings

            warnings.warn(f"ckpt-ir: could not load pass plugin {ep.name!r} ({e})", stacklevel=2)
            continue
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _PASSES:
            register_pass(obj)


def load_plugin(module: str) -> None:
    """Import a user module that calls :func:`register_pass` (``--plugin MODULE``)."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"--plugin {module}: cannot import it ({e}); is it on PYTHONPATH?") from None


# ---------------------------------------------------------------------------------------------
# pipeline text


class Pipeline(list):
    def __str__(self) -> str:
        return ",".join(str(p) for p in self)


def _caret(text: str, pos: int, msg: str) -> UsageError:
    return UsageError(f"pipeline: {msg} at column {pos + 1}\n  {text}\n  {' ' * pos}^")


def parse_pipeline(text: str) -> Pipeline:
    """Parse ``a,b{k=v k2=v2},c``; errors point at the bad token."""
    reg = registry()
    out = Pipeline()
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        start = i
        while i < n and (text[i].isalnum() or text[i] in "-_"):
            i += 1
        name = text[start:i]
        if not name:
            raise _caret(text, start, "expected a pass name" if start < n else "expected a pass name after ','")
        if name not in reg:
            close = [p for p in reg if p.startswith(name[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; known passes: {', '.join(sorted(reg))}"
            raise _caret(text, start, f"unknown pass {name!r}{hint}")
        values: dict[str, Any] = {}
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == "{":
            close_at = text.find("}", i)
            if close_at < 0:
                raise _caret(text, i, "unclosed '{'")
            values = _parse_options(reg[name], text, i + 1, close_at)
            i = close_at + 1
        try:
            out.append(reg[name](**values))
        except UsageError as e:
            raise _caret(text, start, str(e)) from None
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return out
        if text[i] != ",":
            raise _caret(text, i, f"expected ',' or '{{' after pass {name!r}, found {text[i]!r}")
        i += 1


def _parse_options(cls: type[Pass], text: str, a: int, b: int) -> dict[str, Any]:
    opts = {o.name: o for o in cls.options}
    values: dict[str, Any] = {}
    i = a
    while i < b:
        while i < b and text[i].isspace():
            i += 1
        if i >= b:
            break
        start = i
        while i < b and not text[i].isspace():
            i += 1
        token = text[start:i]
        if "=" not in token:
            raise _caret(text, start, f"expected key=value in options of {cls.name}, found {token!r}")
        key, val = token.split("=", 1)
        if key not in opts:
            raise _caret(text, start, f"pass {cls.name} has no option {key!r}; options: "
                                      f"{', '.join(opts) or '(none)'}")
        try:
            values[key] = opts[key].parse(val)
        except UsageError as e:
            raise _caret(text, start + len(key) + 1, str(e)) from None
    return values


# ---------------------------------------------------------------------------------------------
# running


@attrs.define
class Instrumentation:
    """What to print or dump around passes (separate from the passes themselves)."""

    print_before: tuple[str, ...] = ()
    print_after: tuple[str, ...] = ()
    print_after_all: bool = False
    dump_dir: str | None = None
    stats: bool = False
    stream: TextIO = sys.stderr
    ir_format: str = "text"


@attrs.define
class PassStat:
    name: str
    seconds: float
    tensors_changed: int
    bytes_changed: int


def _carry_states(p: Pass, before: Checkpoint, after: Checkpoint) -> Checkpoint:
    """Apply pass ``p``'s rule for optimizer state to ``after`` (the pass's result on the weights)."""
    if not before.states:
        return after
    if p.optimizer_state == "keep":
        return attrs.evolve(after, states=before.states)
    if p.optimizer_state == "drop":
        dropped = dict(after.dropped)
        for set_name in before.states:
            dropped[f"optimizer state {set_name}"] = f"no longer meaningful after {p.name}"
        return attrs.evolve(after, states={}, dropped=dropped)
    states = {}
    for set_name, tensors in before.states.items():
        states[set_name] = p.run_state(attrs.evolve(before, tensors=tensors, states={}), set_name).tensors
    return attrs.evolve(after, states=states)


class PassManager:
    def __init__(self, pipeline: Pipeline, instrumentation: Instrumentation | None = None,
                 verify: Callable[[Checkpoint, str], None] | None = None) -> None:
        from ckpt_ir.ir.verify import verify as default_verify

        self.pipeline = pipeline
        self.inst = instrumentation or Instrumentation()
        self.verify = verify or default_verify
        self.stats: list[PassStat] = []

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        from ckpt_ir.ir.printer import render

        inst = self.inst
        self.verify(ckpt, "")
        if inst.dump_dir:
            self._dump(0, "input", ckpt)
        for n, p in enumerate(self.pipeline, 1):
            if p.name in inst.print_before:
                inst.stream.write(f"// ----- IR before {p} -----\n{render(ckpt, inst.ir_format)}\n")
            t0 = time.perf_counter()
            new = _carry_states(p, ckpt, p.run(ckpt))
            dt = time.perf_counter() - t0
            self.verify(new, str(p))
            changed = [t for name, t in new.tensors.items() if ckpt.tensors.get(name) != t]
            changed_names = {t.name for t in changed} | (set(ckpt.tensors) - set(new.tensors))
            self.stats.append(PassStat(str(p), dt, len(changed_names), sum(t.nbytes for t in changed)))
            if inst.print_after_all or p.name in inst.print_after:
                inst.stream.write(f"// ----- IR after {p} -----\n{render(new, inst.ir_format)}\n")
            if inst.dump_dir:
                self._dump(n, p.name, new)
            ckpt = new
        if inst.stats:
            inst.stream.write(self.format_stats())
        return ckpt

    def _dump(self, n: int, name: str, ckpt: Checkpoint) -> None:
        import os

        from ckpt_ir.ir.printer import render

        os.makedirs(self.inst.dump_dir, exist_ok=True)  # type: ignore[arg-type]
        ext = {"json": "json", "dot": "dot"}.get(self.inst.ir_format, "txt")
        with open(os.path.join(self.inst.dump_dir, f"{n:02d}-{name}.{ext}"), "w") as f:  # type: ignore[arg-type]
            f.write(render(ckpt, self.inst.ir_format))

    def format_stats(self) -> str:
        lines = [f"{'pass':40s} {'tensors':>8s} {'bytes':>12s} {'ms':>8s}"]
        for s in self.stats:
            lines.append(f"{s.name:40s} {s.tensors_changed:8d} {s.bytes_changed:12d} {s.seconds * 1e3:8.1f}")
        return "\n".join(lines) + "\n"
