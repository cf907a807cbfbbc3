"""Error types.  Every error ckpt-ir raises on bad input is a :class:`CkptIrError` with a one-line
message that names the file or tensor at fault and says what to do; the CLI prints it without a
traceback (unless ``--debug``) and exits with :attr:`CkptIrError.exit_code`.  A message names a
setting as its caller gives it (:func:`setting`): ``--overwrite`` under the commands,
``overwrite=True`` for Python callers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class CkptIrError(Exception):
    """Base class: bad input, impossible request, or an I/O failure we can explain."""

    exit_code = 1


class UsageError(CkptIrError):
    """A malformed request (exit code 2): a bad setting or combination of settings, from the
    command line or the API, or malformed pipeline text."""

    exit_code = 2


class FormatError(CkptIrError):
    """A checkpoint file is missing, truncated, corrupt or not what its metadata claims."""


class LayoutError(CkptIrError):
    """A parallel layout or model spec is impossible (e.g. heads not divisible by TP)."""


class VerifyError(CkptIrError):
    """The IR broke an invariant; raised by the verifier after a pass."""


class CoverageError(CkptIrError):
    """A source tensor would be silently dropped, or a target tensor produced twice."""


# Messages name a setting the way the caller gave it: a flag on the command line, a keyword from
# Python.  One message source, two wordings: a message writes setting("overwrite") and reads
# "pass --overwrite" under ckpt-ir's commands, "pass overwrite=True" for a Python caller.
_command_line = False

# settings whose flag is not "--" + the Python keyword with dashes for underscores (a key may be
# an entry of a keyword's dict, as load() takes them)
FLAGS = {
    "vocab_divisible_by": "--make-vocab-size-divisible-by",
    "grouped_gemm": "--moe-grouped-gemm",
    "dp": "--target-dp",
    "lora_rank": "--lora-r",
    "lora_targets": "--lora-target-modules",
    "mtp_layers": "--mtp-num-layers",
    "hf_config_dir": "--hf-config",
    "family": "--model-type-hf",
    "optimizer_layout['dp']": "--source-dp",
    "optimizer_layout['bucket_size']": "--source-bucket-size",
    "optimizer_layout['align']": "--source-param-align",
}
_UNSET: Any = object()


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Word the errors raised inside for the command line (``--overwrite``); the CLI runs every
    command inside.  Outside, they are worded for Python callers (``overwrite=True``)."""
    global _command_line
    before, _command_line = _command_line, True
    try:
        yield
    finally:
        _command_line = before


def setting(name: str, value: Any = _UNSET, *, metavar: str | None = None) -> str:
    """How a message names the setting ``name`` (its Python keyword, e.g. ``overwrite``, ``tp``,
    ``vocab_divisible_by``), with ``value`` when given or a placeholder ``metavar``: on the command
    line ``--tp 2``, ``--overwrite`` (True), ``--no-optimizer`` (False), ``--lora-load DIR``; for
    Python callers ``tp=2``, ``overwrite=True``, ``optimizer=False``, ``lora_load=...``."""
    if not _command_line:
        if metavar is not None:
            return f"{name}=..."
        return name if value is _UNSET else f"{name}={value!r}"
    flag = FLAGS.get(name, "--" + name.replace("_", "-"))
    if value is True or (value is _UNSET and metavar is None):
        return flag
    if value is False:
        return "--no-" + flag[2:]
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    elif isinstance(value, float):
        value = f"{value:g}"  # as typed: --lora-alpha 16
    return f"{flag} {metavar if value is _UNSET else value}"
