"""Pass infrastructure: registry, typed options, MLIR-style pipeline text, and instrumentation.

A pass is a small class with a ``name``, a one-line ``summary``, typed ``options``, what it
``requires`` of the checkpoint (:class:`Requirement` values the manager checks before running it)
and ``guarantees`` about it; it transforms a Checkpoint and returns a new one.  Options are typed
fields: they are validated when the pass is built, from pipeline text or from Python alike, and
read as attributes (``self.factor`` for option ``factor``, ``self.keep_norms`` for ``keep-norms``).

Optimizer state (``Checkpoint.states``) follows a pass only when the pass says so:
``optimizer_state = "follow"`` runs each state set through the pass like the weights (passes that
move tensors), ``"keep"`` leaves the state as it is (cast: masters and moments stay fp32), and
``"drop"`` -- the default, for any pass that does not say -- removes it and records why, because
Adam moments transformed as if they were weights would be wrong for a pass that changes values.
Passes know nothing about printing or timing: the :class:`PassManager` checks requirements,
verifies the IR after every pass and runs the instrumentation (print before/after, dumps,
statistics) for all of them.

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

from ckpt_ir.errors import UsageError, VerifyError
from ckpt_ir.ir.checkpoint import Checkpoint


@attrs.frozen
class Option:
    name: str
    type: type[Any]  # int, float, str, bool, or tuple (a comma list of ints)
    default: Any = None
    help: str = ""
    required: bool = False

    @property
    def attribute(self) -> str:
        """The Python attribute the value is read from: ``keep-norms`` -> ``keep_norms``."""
        return self.name.replace("-", "_")

    def parse(self, text: str) -> Any:
        """The value of this option written as pipeline text."""
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
            raise UsageError(f"option {self.name}={text!r}: expected {self.kind}") from None

    def check(self, value: Any) -> Any:
        """A value given from Python, validated (and widened: int for float, list for tuple)."""
        if value is None:
            return None
        ok = {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            str: lambda v: isinstance(v, str),
            tuple: lambda v: (
                isinstance(v, (tuple, list))
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            ),
        }.get(self.type, lambda v: True)
        if not ok(value):
            raise UsageError(f"option {self.name}={value!r}: expected {self.kind}")
        if self.type is float:
            return float(value)
        return tuple(value) if self.type is tuple else value

    @property
    def kind(self) -> str:
        return {tuple: "a comma-separated list of integers", bool: "true or false"}.get(
            self.type, self.type.__name__
        )

    def format(self, value: Any) -> str:
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:g}" if float(f"{value:g}") == value else repr(value)
        return str(value)


@attrs.frozen
class Requirement:
    """A precondition of a pass, checked by the :class:`PassManager` before the pass runs.

    ``holds`` tests the checkpoint; ``fix`` names the pass that establishes it (shown in the error
    and in ``ckpt-ir passes``)."""

    what: str
    holds: Callable[[Checkpoint], bool] = attrs.field(eq=False)
    fix: str = ""

    def __str__(self) -> str:
        return self.what + (f" (run {self.fix} first)" if self.fix else "")


def _whole(c: Checkpoint) -> bool:
    return c.layout.tp == 1 and c.layout.expert_tp == 1


def _gathered(c: Checkpoint) -> bool:
    lay = c.layout
    return (
        _whole(c)
        and lay.pp == 1
        and lay.ep == 1
        and not lay.vpp_layers
        and not lay.num_layer_list
        and lay.etp is None
    )


WHOLE = Requirement("whole tensors (tp=1)", _whole, "gather")
GATHERED = Requirement("a gathered checkpoint (tp=1, pp=1, ep=1)", _gathered, "gather")
SINGLE_STAGE = Requirement(
    "one pipeline stage (pp=1)", lambda c: c.layout.pp == 1 and not c.layout.num_layer_list, "gather"
)
NO_NOOP = Requirement("no no-op layers", lambda c: not c.layout.noop_layers, "remove-noop-layers")
UNPADDED = Requirement("an unpadded vocabulary", lambda c: not c.layout.padded_vocab, "unpad-vocab")
UNFUSED = Requirement(
    "separate q/k/v and gate/up tensors",
    lambda c: not c.layout.fused_qkv and not c.layout.fused_gate_up,
    "unfuse-qkv and unfuse-gate-up",
)
HAS_LORA = Requirement("LoRA tensors", lambda c: c.spec.lora_rank is not None, "attach-lora")
MOE = Requirement("a mixture-of-experts model", lambda c: bool(c.spec.num_experts))


class Pass:
    """Base class.  Subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    # preconditions the manager checks (a plain string is documentation only, for older plugins)
    requires: ClassVar[tuple[Requirement, ...] | str] = ()
    guarantees: ClassVar[str] = "-"
    # what happens to optimizer-state tensor sets: "follow" (run_state on each), "keep", or "drop"
    # (the default: a pass that does not say may change values, and moments must not be
    # transformed as if they were weights)
    optimizer_state: ClassVar[str] = "drop"
    drop_reason: ClassVar[str] = ""  # why, recorded with the dropped state (when optimizer_state is "drop")

    def __init__(self, **values: Any) -> None:
        known = {o.name: o for o in self.options}
        known.update({o.attribute: o for o in self.options})
        for k in values:
            if k not in known:
                raise UsageError(
                    f"pass {self.name}: unknown option {k!r}; options: "
                    f"{', '.join(o.name for o in self.options) or '(none)'}"
                )
        given = {known[k].name: known[k].check(v) for k, v in values.items()}
        self.values = {o.name: given.get(o.name, o.default) for o in self.options}
        for o in self.options:
            if o.required and self.values[o.name] is None:
                raise UsageError(f"pass {self.name}: option {o.name} is required")

    def __getattr__(self, attr: str) -> Any:
        for o in type(self).options:
            if o.attribute == attr:
                return self.__dict__["values"][o.name]
        raise AttributeError(f"{type(self).__name__} has no attribute or option {attr!r}")

    def opt(self, name: str) -> Any:
        return self.values[name]

    def requirements(self) -> tuple[Requirement, ...]:
        """The preconditions of this pass instance (a pass may make them depend on its options)."""
        return self.requires if isinstance(self.requires, tuple) else ()

    @classmethod
    def describe_requires(cls) -> str:
        if isinstance(cls.requires, str):
            return cls.requires or "-"
        return "; ".join(map(str, cls.requires)) or "any checkpoint"

    def check_requirements(self, ckpt: Checkpoint) -> None:
        """Raise a one-line error naming the pass that would establish a missing precondition."""
        for req in self.requirements():
            if not req.holds(ckpt):
                fix = f"; run {req.fix} before it" if req.fix else ""
                raise VerifyError(
                    f"pass {self}: needs {req.what}, which the checkpoint does not have "
                    f"({ckpt.layout.describe()}){fix}"
                )

    def run(self, ckpt: Checkpoint) -> Checkpoint:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_state(self, ckpt: Checkpoint, state: str) -> Checkpoint:
        """The pass on optimizer-state set ``state`` (``ckpt.tensors`` holds that set's tensors, not
        the weights).  Moving tensors works the same on weights and on their state; override where
        the state needs other values (e.g. zeros, not copies, for padding moments)."""
        return self.run(ckpt)

    def __str__(self) -> str:
        set_opts = [
            f"{o.name}={o.format(self.values[o.name])}"
            for o in self.options
            if self.values[o.name] is not None and self.values[o.name] != o.default
        ]
        return self.name + ("{" + " ".join(set_opts) + "}" if set_opts else "")

    def __repr__(self) -> str:
        return f"<pass {self}>"


class FunctionPass(Pass):
    """A plain ``Checkpoint -> Checkpoint`` function used as a pass (``api.run`` accepts them)."""

    optimizer_state = "drop"

    def __init__(self, fn: Callable[[Checkpoint], Checkpoint]) -> None:
        super().__init__()
        self.fn = fn

    @property  # type: ignore[override]
    def name(self) -> str:  # type: ignore[override]
        return getattr(self.fn, "__name__", "function").replace("_", "-")

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return self.fn(ckpt)


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
    """Import a user module that calls :func:`register_pass` or registers a model family
    (``--plugin MODULE``)."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"--plugin {module}: cannot import it ({e}); is it on PYTHONPATH?") from None


# ---------------------------------------------------------------------------------------------
# pipeline text


class Pipeline(list):
    """Passes in order; ``str()`` is the pipeline text :func:`parse_pipeline` reads back."""

    def __str__(self) -> str:
        return ",".join(str(p) for p in self)

    def __repr__(self) -> str:
        return f"<Pipeline {self or '(no passes)'}>"


def _caret(text: str, pos: int, msg: str) -> UsageError:
    return UsageError(f"pipeline: {msg} at column {pos + 1}\n  {text}\n  {' ' * pos}^")


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text, ``a,b{k=v k2=v2},c`` (``ckpt-ir passes`` lists the passes and their
    options), into a :class:`Pipeline`; an unknown pass or option, or a bad value, is a
    :class:`~ckpt_ir.errors.UsageError` pointing at the token."""
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
            raise _caret(
                text, start, "expected a pass name" if start < n else "expected a pass name after ','"
            )
        if name not in reg:
            close = [p for p in reg if p.startswith(name[:3])]
            hint = (
                f" (did you mean {', '.join(close)}?)"
                if close
                else f"; known passes: {', '.join(sorted(reg))}"
            )
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
            raise _caret(
                text, start, f"pass {cls.name} has no option {key!r}; options: {', '.join(opts) or '(none)'}"
            )
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
        why = (
            p.drop_reason
            or f"not carried through pass {p.name} (it does not say how optimizer state follows it)"
        )
        for set_name in before.states:
            dropped[f"optimizer state {set_name}"] = why
        return attrs.evolve(after, states={}, dropped=dropped)
    states = {}
    for set_name, tensors in before.states.items():
        states[set_name] = p.run_state(attrs.evolve(before, tensors=tensors, states={}), set_name).tensors
    return attrs.evolve(after, states=states)


class PassManager:
    def __init__(
        self,
        pipeline: Pipeline,
        instrumentation: Instrumentation | None = None,
        verify: Callable[[Checkpoint, str], None] | None = None,
    ) -> None:
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
            p.check_requirements(ckpt)
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
