"""A warm process for the tests' megatron-core scripts: it imports torch and megatron-core once,
then runs each script in a fork of itself.

Not a test module.  ``tests/mcore_harness.py`` (logits oracle) and ``tests/distopt_fixtures.py``
(checkpoints written by megatron-core) are scripts, ``python SCRIPT JOB.json WORLD``, that import
megatron-core (about 5 CPU-seconds, most of it torch's compiler stack) and fork the ranks.  A test
run has some fifty such jobs; :func:`run` gives each to one server per test process instead
(started on first use), which forks a child that runs the script as ``python SCRIPT ARGS``
would (``runpy`` as ``__main__``, ``sys.argv``, ``sys.path[0]`` the script's directory, the exit
code of its ``SystemExit``), in a session of its own with stdout and stderr in a log file.  The
script then forks its ranks as before: they all share the server's imports copy-on-write.

Each job still starts from a process that has only imported modules, so nothing passes from one
job to the next.  The server reads requests on its stdin and exits when that closes, i.e. when
the test process ends, however it ends.

Protocol, one JSON object per line: request ``{"script", "argv", "log"}``; replies ``{"pid": PID}``
when the child has started and ``{"rc": CODE}`` once it has ended, its process group killed first
(as the scripts' callers always did: ``dist_checkpointing.save`` leaves a spawn-context
``multiprocessing.Manager`` behind).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# what the scripts set for themselves: one thread per rank, eager megatron-core (no torch.compile)
ENV = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "PYTHONWARNINGS": "ignore"}

_server: subprocess.Popen | None = None


def run(script: str, argv: list[str], log: str, timeout: float) -> int | str:
    """``python SCRIPT ARGV...`` in a fork of the warm server, stdout and stderr to ``log``: its
    exit code, or ``"timeout"`` after ``timeout`` seconds (its process group is then killed)."""
    server = _start()
    assert server.stdin is not None
    request = {"script": os.path.abspath(script), "argv": [str(a) for a in argv], "log": log}
    server.stdin.write(json.dumps(request).encode() + b"\n")
    pid = _reply(server, time.monotonic() + 600)["pid"]  # the first job waits for the imports
    try:
        return _reply(server, time.monotonic() + timeout)["rc"]
    except TimeoutError:
        _killpg(pid)
        _reply(server, time.monotonic() + 60)
        return "timeout"


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # unbuffered: a reply is read exactly to its newline, the next one stays in the pipe
            env=dict(os.environ, **ENV),
            start_new_session=True,  # a Ctrl-C of the test run reaches the tests, not the server
        )
        atexit.register(_stop, _server)
    return _server


def _stop(server: subprocess.Popen) -> None:
    if server.stdin is not None:
        server.stdin.close()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reply(server: subprocess.Popen, deadline: float) -> dict:
    assert server.stdout is not None
    while not select.select([server.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        if time.monotonic() >= deadline:
            raise TimeoutError
    line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"the megatron-core server ended (exit {server.wait()})")
    return json.loads(line)


# ---------------------------------------------------------------------------------------------
# server side


def _serve() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    # everything the scripts import before they fork their ranks
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401

    replies = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        replies.flush()
        pid = os.fork()
        if pid == 0:
            _child(req["script"], req["argv"], req["log"])  # never returns
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: its group id stays
        _killpg(pid)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()
    os._exit(0)  # every job reaped: nothing to finalise but the imports (seconds of teardown)


def _child(script: str, argv: list[str], log: str) -> None:
    import runpy
    import traceback

    rc = 1
    try:
        os.setsid()
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.stdin = open(0)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # line-buffered, as Python's own
        sys.argv = [script, *argv]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
        rc = 0
    except SystemExit as e:  # as the interpreter maps it to an exit status
        if e.code is None or isinstance(e.code, int):
            rc = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


if __name__ == "__main__":
    _serve()
