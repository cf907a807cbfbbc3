"""Pass infrastructure: registry, typed options, MLIR-style pipeline text, and instrumentation.

A pass is a small frozen attrs class with a ``name``, a one-line ``summary``, what it
``requires`` of the checkpoint (:class:`Requirement` values the manager checks before running it)
and ``guarantees`` about it, and its options as typed fields (:func:`option`); it transforms a
Checkpoint and returns a new one.  Option values are checked when the pass is built, from pipeline
text or from Python alike (``Shard(tp=-2)`` and ``shard{tp=-2}`` are usage errors naming the pass,
the option and what it takes), and read as attributes (``self.keep_norms`` for ``keep-norms``).

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
import re
import sys
import time
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TextIO, TypeVar

import attrs

from ckpt_ir.errors import UsageError, VerifyError
from ckpt_ir.ir.checkpoint import Checkpoint

OPTION = "ckpt_ir.option"  # attrs metadata key of an option field


@attrs.frozen
class Allowed:
    """The values an option takes beyond its type: a test and what it says (``{type}`` stands for
    the option's type) in errors and in ``ckpt-ir passes``.  For a tuple option the test applies
    to each element."""

    what: str
    holds: Callable[[Any], bool] = attrs.field(eq=False)


def one_of(*choices: str) -> Allowed:
    return Allowed("one of " + ", ".join(choices), lambda v: v in choices)


def at_least(n: int) -> Allowed:
    return Allowed(f"{{type}} >= {n}", lambda v: v >= n)


@attrs.frozen
class _OptionMeta:
    name: str | None
    help: str
    allowed: Allowed | None


def option(
    default: Any = attrs.NOTHING, *, help: str, allowed: Allowed | None = None, name: str | None = None
) -> Any:
    """A pass option: a keyword-only attrs field whose annotation is its type (``bool``, ``int``,
    ``float``, ``str`` or ``tuple[int, ...]``, each optionally ``| None``); without a default it is
    required.  ``name`` is its pipeline spelling (default: the field's, ``_`` as ``-``); ``help``
    is shown by ``ckpt-ir passes``; ``allowed`` limits its values.  The value is checked (and an
    int widened to float, a list to a tuple) when the pass is built, from pipeline text or from
    Python alike: a bad one is a :class:`UsageError` naming the pass, the option and what it takes."""
    return attrs.field(
        default=default,
        kw_only=True,
        converter=attrs.Converter(_checked, takes_self=True, takes_field=True),
        metadata={OPTION: _OptionMeta(name, help, allowed)},
    )


def _checked(value: Any, instance: Any, field: attrs.Attribute) -> Any:
    return next(o for o in options_of(type(instance)) if o.attribute == field.name).check(value)


@attrs.frozen
class Option:
    """One option of a pass as pipeline text, ``ckpt-ir passes`` and errors see it, derived from an
    :func:`option` field of the pass class."""

    owner: str  # the pass's name
    name: str  # pipeline spelling: keep-norms
    attribute: str  # the field: keep_norms
    type: type[Any]  # bool, int, float, str, or tuple (of ints)
    optional: bool  # None is a value
    default: Any  # attrs.NOTHING when required
    help: str = ""
    allowed: Allowed | None = None

    @property
    def required(self) -> bool:
        return self.default is attrs.NOTHING

    @property
    def metavar(self) -> str:
        return "i,j,.." if self.type is tuple else self.type.__name__

    @property
    def kind(self) -> str:
        """What the option takes, e.g. ``int >= 1`` or ``one of local, te, te-input``."""
        base = {tuple: "a comma-separated list of integers", bool: "true or false"}.get(
            self.type, self.type.__name__
        )
        return self.allowed.what.format(type=base) if self.allowed else base

    def error(self, value: Any) -> UsageError:
        shown = self.format(value) if isinstance(value, tuple) else repr(value)
        return UsageError(f"pass {self.owner}: option {self.name}={shown}: expected {self.kind}")

    def parse(self, text: str) -> Any:
        """The value of this option written as pipeline text, checked."""
        try:
            if self.type is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if self.type is tuple:
                return self.check(tuple(int(x) for x in text.split(",") if x.strip() != ""))
            return self.check(self.type(text))
        except ValueError:
            raise self.error(text) from None

    def check(self, value: Any) -> Any:
        """A value given from Python, validated (and widened: int for float, list for tuple)."""
        if value is None and self.optional:
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
        }[self.type]
        if not ok(value):
            raise self.error(value)
        value = float(value) if self.type is float else tuple(value) if self.type is tuple else value
        if self.allowed and not all(map(self.allowed.holds, value if self.type is tuple else (value,))):
            raise self.error(value)
        return value

    def format(self, value: Any) -> str:
        """``value`` as pipeline text (a string in double quotes where it needs them)."""
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:g}" if float(f"{value:g}") == value else repr(value)
        return quote(str(value))


def quote(text: str) -> str:
    """``text`` as an option value of pipeline text: as it is, or in double quotes (a backslash or
    double quote inside escaped by a backslash) when it is empty or holds whitespace, a brace or a
    double quote."""
    if text and not any(c.isspace() or c in '{}"' for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value_type(cls: type, field: str, hint: Any) -> tuple[type[Any], bool]:
    """(type, whether None is allowed) of an option annotated ``hint``."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    rest = [a for a in args if a is not type(None)]
    if len(rest) == 1 and rest[0] in (bool, int, float, str):
        return rest[0], len(rest) < len(args)
    if len(rest) == 1 and typing.get_origin(rest[0]) is tuple and typing.get_args(rest[0]) == (int, ...):
        return tuple, len(rest) < len(args)
    raise TypeError(
        f"pass {cls.__name__}: option {field} is {hint}; an option is bool, int, float, str or "
        f"tuple[int, ...], or one of those | None"
    )


_OPTIONS: dict[type, tuple[Option, ...]] = {}


def options_of(cls: type) -> tuple[Option, ...]:
    """The options of pass class ``cls``: its :func:`option` fields, in declaration order."""
    if cls not in _OPTIONS:
        _OPTIONS[cls] = _derive_options(cls) if attrs.has(cls) else ()
    return _OPTIONS[cls]


def _derive_options(cls: type) -> tuple[Option, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in attrs.fields(cls):
        meta = f.metadata.get(OPTION)
        if meta is None:
            continue
        kind, optional = _value_type(cls, f.name, hints[f.name])
        out.append(
            Option(
                owner=getattr(cls, "name", "") or cls.__name__,
                name=meta.name or f.name.replace("_", "-"),
                attribute=f.name,
                type=kind,
                optional=optional,
                default=f.default,
                help=meta.help,
                allowed=meta.allowed,
            )
        )
    return tuple(out)


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


@attrs.frozen
class Pass:
    """Base class.  Subclasses set the class attributes, declare their options as :func:`option`
    fields of an ``@attrs.frozen`` class, and implement :meth:`run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # preconditions the manager checks (a plain string is documentation only, for older plugins)
    requires: ClassVar[tuple[Requirement, ...] | str] = ()
    guarantees: ClassVar[str] = "-"
    # what happens to optimizer-state tensor sets: "follow" (run_state on each), "keep", or "drop"
    # (the default: a pass that does not say may change values, and moments must not be
    # transformed as if they were weights)
    optimizer_state: ClassVar[str] = "drop"
    drop_reason: ClassVar[str] = ""  # why, recorded with the dropped state (when optimizer_state is "drop")

    @classmethod
    def options(cls) -> tuple[Option, ...]:
        return options_of(cls)

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
        """Pipeline text: the name, and the options whose values differ from their defaults."""
        set_opts = []
        for o in self.options():
            value = getattr(self, o.attribute)
            if value is not None and value != o.default:
                set_opts.append(f"{o.name}={o.format(value)}")
        return self.name + ("{" + " ".join(set_opts) + "}" if set_opts else "")


@attrs.frozen
class FunctionPass(Pass):
    """A plain ``Checkpoint -> Checkpoint`` function used as a pass (``api.run`` accepts them)."""

    optimizer_state = "drop"
    fn: Callable[[Checkpoint], Checkpoint]

    @property  # type: ignore[override]
    def name(self) -> str:  # type: ignore[override]
        return getattr(self.fn, "__name__", "function").replace("_", "-")

    def run(self, ckpt: Checkpoint) -> Checkpoint:
        return self.fn(ckpt)


_PASSES: dict[str, type[Pass]] = {}
_FIELD = type(attrs.field())  # an option() not yet made a field by @attrs.frozen
P = TypeVar("P", bound=Pass)


def register_pass(cls: type[P]) -> type[P]:
    """Class decorator: make a pass available by name to pipelines, the CLI and ``ckpt-ir passes``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if isinstance(getattr(cls, "options", None), tuple):
        raise TypeError(
            f"pass {cls.name}: declare options as fields (name: type = option(...)), not as an "
            f"options tuple; see docs/writing-a-pass.md"
        )
    if any(isinstance(v, _FIELD) for v in vars(cls).values()):
        raise TypeError(
            f"pass {cls.name}: a class with option fields needs @attrs.frozen under @register_pass"
        )
    options_of(cls)  # an option of a type pipeline text cannot give fails here, not when used
    _PASSES[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    _load_builtin()
    return dict(_PASSES)


_entry_points_loaded = False


def _load_builtin() -> None:
    """Register the passes that installed packages declare under the ``ckpt_ir.passes``
    entry-point group (each entry point names a module or a Pass class).  The built-in passes are
    registered already: importing this module imports its package, whose ``__init__`` imports
    every built-in pass module."""
    global _entry_points_loaded

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
    options; a value with spaces or braces in double quotes: ``attach-lora{path="my adapter"}``),
    into a :class:`Pipeline`; an unknown pass or option, or a bad value, is a
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
        tokens: list[tuple[str, int, str, int]] = []
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == "{":
            tokens, i = _option_tokens(reg[name], text, i)
        values = _parse_options(reg[name], text, tokens)
        missing = [o.name for o in reg[name].options() if o.required and o.attribute not in values]
        if missing:
            raise _caret(text, start, f"pass {name}: option {missing[0]} is required")
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


def _option_tokens(cls: type[Pass], text: str, brace: int) -> tuple[list[tuple[str, int, str, int]], int]:
    """The ``key=value`` tokens of the option block opening at ``brace``, as (key, where it starts,
    value text unquoted, where it starts), and the index after the closing brace."""
    tokens: list[tuple[str, int, str, int]] = []
    i, n = brace + 1, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            raise _caret(text, brace, "unclosed '{'")
        if text[i] == "}":
            return tokens, i + 1
        start = i
        while i < n and not text[i].isspace() and text[i] not in "=}":
            i += 1
        if i == n:
            raise _caret(text, brace, "unclosed '{'")
        if text[i] != "=":
            raise _caret(text, start, f"expected key=value in options of {cls.name}, found {text[start:i]!r}")
        i += 1
        at = i
        if i < n and text[i] == '"':
            value, i = _quoted(text, i)
            if i < n and not text[i].isspace() and text[i] != "}":
                raise _caret(text, i, "expected a space or '}' after a quoted value")
        else:
            while i < n and not text[i].isspace() and text[i] != "}":
                i += 1
            value = text[at:i]
        tokens.append((text[start : at - 1], start, value, at))


def _quoted(text: str, quote_at: int) -> tuple[str, int]:
    """The string in double quotes at ``quote_at`` (backslash escapes the next character), and the
    index after its closing quote."""
    chars = []
    i = quote_at + 1
    while i < len(text) and text[i] != '"':
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        chars.append(text[i])
        i += 1
    if i == len(text):
        raise _caret(text, quote_at, "unclosed '\"'")
    return "".join(chars), i + 1


def _parse_options(cls: type[Pass], text: str, tokens: list[tuple[str, int, str, int]]) -> dict[str, Any]:
    """Typed, checked option values by attribute name."""
    opts = {o.name: o for o in cls.options()}
    values: dict[str, Any] = {}
    for key, start, value, at in tokens:
        if key not in opts:
            raise _caret(
                text, start, f"pass {cls.name} has no option {key!r}; options: {', '.join(opts) or '(none)'}"
            )
        try:
            values[opts[key].attribute] = opts[key].parse(value)
        except UsageError as e:
            raise _caret(text, at, str(e)) from None
    return values


# ---------------------------------------------------------------------------------------------
# running


DUMP_EXTENSIONS = {"text": "txt", "json": "json", "dot": "dot"}  # dump file name extension per --ir-format
_DUMP_FILE = re.compile(rf"\d{{2,}}-[^/]+\.(?:{'|'.join(DUMP_EXTENSIONS.values())})")


def check_dump_replaceable(path: str) -> None:
    """Refuse (exit 2) to replace directory ``path`` unless it holds an IR dump (the numbered
    files ``Instrumentation.dump_dir`` gets) and nothing else."""
    import os

    foreign = [n for n in sorted(os.listdir(path)) if not _DUMP_FILE.fullmatch(n)]
    if foreign:
        raise UsageError(
            f"{os.path.join(path, foreign[0])}: not part of an IR dump, and --overwrite replaces only a "
            f"--dump-ir directory that holds a dump and nothing else; move it out of {path} or choose "
            f"another --dump-ir directory"
        )


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
        ext = DUMP_EXTENSIONS.get(self.inst.ir_format, "txt")
        with open(os.path.join(self.inst.dump_dir, f"{n:02d}-{name}.{ext}"), "w") as f:  # type: ignore[arg-type]
            f.write(render(ckpt, self.inst.ir_format))

    def format_stats(self) -> str:
        lines = [f"{'pass':40s} {'tensors':>8s} {'bytes':>12s} {'ms':>8s}"]
        for s in self.stats:
            lines.append(f"{s.name:40s} {s.tensors_changed:8d} {s.bytes_changed:12d} {s.seconds * 1e3:8.1f}")
        return "\n".join(lines) + "\n"
