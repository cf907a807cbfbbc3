"""Error types.  Every error ckpt-ir raises on bad input is a :class:`CkptIrError` with a one-line
message that names the file or tensor at fault and says what to do; the CLI prints it without a
traceback (unless ``--debug``) and exits with :attr:`CkptIrError.exit_code`."""

from __future__ import annotations


class CkptIrError(Exception):
    """Base class: bad input, impossible request, or an I/O failure we can explain."""

    exit_code = 1


class UsageError(CkptIrError):
    """The command line or pipeline text is malformed (exit code 2)."""

    exit_code = 2


class FormatError(CkptIrError):
    """A checkpoint file is missing, truncated, corrupt or not what its metadata claims."""


class LayoutError(CkptIrError):
    """A parallel layout or model spec is impossible (e.g. heads not divisible by TP)."""


class VerifyError(CkptIrError):
    """The IR broke an invariant; raised by the verifier after a pass."""


class CoverageError(CkptIrError):
    """A source tensor would be silently dropped, or a target tensor produced twice."""
