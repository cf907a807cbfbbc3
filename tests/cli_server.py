"""``python -m ckpt_ir ...`` for the tests, forked from a warm interpreter.

Every CLI test runs the command as its own process (exit code, stdout and stderr are the contract
under test), and most of such a process's time went to importing torch and transformers (about
1.5 and 3.5 CPU-seconds on this project's two cores), hundreds of times per run.  This module
keeps one *zygote* per test process: a child interpreter that has imported torch, safetensors and
transformers with its modeling stack (not ckpt_ir: each command imports it afresh, as a real run
does, so a test sees the code and the environment variables of its own invocation) and, per
command, forks a process that
sets up exactly what ``subprocess.run([sys.executable, "-m", "ckpt_ir", *args])`` would give it:
stdin from /dev/null, stdout and stderr to files, the working directory, the environment, the
address-space limit, ``sys.argv`` and ``sys.path[0]``; then runs ``ckpt_ir`` as ``__main__``.
The result is a :class:`subprocess.CompletedProcess` as before; a command that outlives its
timeout is killed and raises :class:`subprocess.TimeoutExpired`.

Forking after importing torch is safe here because the zygote never runs a torch operation (no
thread pool exists yet).  Commands that need a pristine interpreter (a test of what gets
imported, a custom ``PYTHONPATH``) call :func:`subprocess.run` themselves.  Set
``CKPT_IR_TESTS_NO_ZYGOTE=1`` to run every command as a fresh process instead.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# transformers' first model module pulls in its generation and modeling stack (1.8 s here): verify,
# demo and the logits checks all import one
_PRELOAD = ("torch", "safetensors.torch", "transformers", "transformers.models.llama.modeling_llama")


class Zygote:
    """One warm interpreter (a child process) that forks a process per command."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
        )
        self.lock = threading.Lock()
        atexit.register(self.close)

    def close(self) -> None:
        """End the zygote (its input closes) and reap it, so its CPU time is this process's."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(
        self, args: list[str], env: dict[str, str], cwd: str, timeout: float, memory_cap: int | None
    ) -> subprocess.CompletedProcess:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with tempfile.TemporaryDirectory(prefix="ckpt-ir-cli-") as d:
            out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
            request = dict(
                args=args, env=env, cwd=cwd, timeout=timeout, memory_cap=memory_cap, out=out, err=err
            )
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the test CLI zygote died (exit {self.proc.wait()})")
            reply = json.loads(line)
            stdout = Path(out).read_text(errors="replace")
            stderr = Path(err).read_text(errors="replace")
        argv = [sys.executable, "-m", "ckpt_ir", *args]
        if reply.get("timed_out"):
            raise subprocess.TimeoutExpired(argv, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(argv, reply["returncode"], stdout, stderr)


_zygote: Zygote | None = None
_start_lock = threading.Lock()


def run_cli(
    args: list[object],
    *,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    memory_cap: int | None = None,
) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, "-m", "ckpt_ir", *args], capture_output=True, text=True,
    stdin=DEVNULL)``, with ``env`` (default: this process's), ``cwd`` and an optional
    address-space limit, served by the warm zygote.  Concurrent calls from threads of one test
    (a race under test) get fresh processes, so they really run at the same time."""
    global _zygote
    argv = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    cwd = str(cwd or os.getcwd())
    with _start_lock:
        if _zygote is None or not _zygote.alive():
            _zygote = None if os.environ.get("CKPT_IR_TESTS_NO_ZYGOTE") else Zygote()
        zygote = _zygote
    if zygote is not None and zygote.lock.acquire(blocking=False):
        try:
            return zygote.run(argv, env, cwd, timeout, memory_cap)
        finally:
            zygote.lock.release()

    def limit() -> None:
        if memory_cap:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

    return subprocess.run(
        [sys.executable, "-m", "ckpt_ir", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit,
    )


# ---------------------------------------------------------------------------------------------
# the zygote itself (this file run as a script)


def _child(req: dict, control: list[int]) -> None:
    """In the forked process: become ``python -m ckpt_ir *args`` and leave with its exit code."""
    import runpy
    import traceback

    code = 1
    try:
        for fd in control:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.setsid()  # its own process group, so a timeout kills its workers too
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        if req["memory_cap"]:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (req["memory_cap"], req["memory_cap"]))
        sys.argv = [os.path.join(str(REPO), "ckpt_ir", "__main__.py"), *req["args"]]
        sys.path[0] = req["cwd"]  # ``python -m`` puts the working directory first
        for entry in reversed(req["env"].get("PYTHONPATH", "").split(os.pathsep)):
            if entry and entry not in sys.path:
                sys.path.insert(1, entry)
        try:
            runpy.run_module("ckpt_ir", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve() -> None:
    import importlib
    import signal
    import time

    # the control channel moves off fds 0 / 1, which each command's process takes over
    control_in, control_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    requests = os.fdopen(control_in, "r")
    replies = os.fdopen(control_out, "w")
    for name in _PRELOAD:
        importlib.import_module(name)
    import transformers

    transformers.AutoModelForCausalLM  # noqa: B018  (resolves the lazy module: modeling_utils)
    for line in requests:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req, [control_in, control_out])
        deadline = time.monotonic() + req["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        reply = {"timed_out": True} if timed_out else {"returncode": os.waitstatus_to_exitcode(status)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve()
