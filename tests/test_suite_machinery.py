"""The test suite's own machinery: what xdist workers share (``built_once``), which tests stay on
one worker (the ``xdist_group`` given in ``tests/conftest.py``), each worker's torch threads,
and the warm megatron-core server the oracle and fixture scripts run in
(``tests/mcore_server.py``)."""

from __future__ import annotations

import itertools
import os
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import cast

import pytest
import torch

from tests import mcore_server
from tests.conftest import built_once, worker_threads


class _Factory:
    """A worker's ``tmp_path_factory``, as far as :func:`built_once` uses it."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def getbasetemp(self) -> Path:
        return self.base


def _build_in_worker(run_root: Path, worker: str, log: Path, fail: bool) -> None:
    """Body of a forked 'xdist worker': ask for the shared directory, report what it read."""
    os.environ["PYTEST_XDIST_WORKER"] = worker
    base = run_root / f"popen-{worker}"
    base.mkdir()

    def build(d: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{worker}\n")
        time.sleep(0.5)  # the other workers ask meanwhile
        if fail:
            raise RuntimeError("build failed")
        d.mkdir()
        (d / "data").write_text(f"built by {worker}")

    try:
        d = built_once(cast(pytest.TempPathFactory, _Factory(base)), "shared", build)
        (base / "read").write_text((d / "data").read_text())
    except RuntimeError:
        os._exit(3)
    os._exit(0)


def _workers(run_root: Path, log: Path, names: list[str], fail: str = "") -> list[int]:
    pids = []
    for name in names:
        pid = os.fork()
        if pid == 0:
            _build_in_worker(run_root, name, log, fail == name)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


def test_built_once_builds_once_for_all_workers_of_a_run(tmp_path):
    log = tmp_path / "builds"
    assert _workers(tmp_path, log, ["gw0", "gw1", "gw2"]) == [0, 0, 0]
    (builder,) = log.read_text().split()
    for w in ("gw0", "gw1", "gw2"):
        assert (tmp_path / f"popen-{w}" / "read").read_text() == f"built by {builder}"
    assert (tmp_path / "shared" / "data").is_file()  # under the run's root, not one worker's


def test_built_once_builds_again_after_a_failed_build(tmp_path):
    log = tmp_path / "builds"
    assert _workers(tmp_path, log, ["gw0"], fail="gw0") == [3]
    assert _workers(tmp_path, log, ["gw1"]) == [0]
    assert log.read_text().split() == ["gw0", "gw1"]
    assert (tmp_path / "popen-gw1" / "read").read_text() == "built by gw1"


@pytest.fixture(scope="module")
def built_for_the_module() -> list[str]:
    return ["module"]


@pytest.fixture
def through_another_fixture(built_for_the_module) -> list[str]:
    return [*built_for_the_module, "function"]


def test_a_test_with_a_module_fixture_stays_with_its_file(request, through_another_fixture):
    groups = [m.args for m in request.node.iter_markers("xdist_group")]
    assert groups == [("tests/test_suite_machinery.py",)] and through_another_fixture == [
        "module",
        "function",
    ]


def test_a_test_without_one_goes_to_any_worker(request, tmp_path):
    assert list(request.node.iter_markers("xdist_group")) == []


def test_each_files_tests_run_together_and_in_a_worker_small_files_first(request):
    files = [item.nodeid.split("::")[0] for item in request.session.items]
    blocks = [f for f, _ in itertools.groupby(files)]
    tests_in = Counter(files)
    assert len(blocks) == len(tests_in)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite's default; -n 0 keeps the collection order
        assert [tests_in[f] for f in blocks] == sorted(tests_in.values())


def test_each_worker_runs_torch_on_its_share_of_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert worker_threads({}) is None
    assert worker_threads({"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"}) == max(
        1, cores // 2
    )
    assert worker_threads({"PYTEST_XDIST_WORKER": "gw7", "PYTEST_XDIST_WORKER_COUNT": str(cores + 1)}) == 1
    threads = worker_threads()
    if threads is not None:  # this test runs in a worker (the suite's default): set for it
        assert torch.get_num_threads() == threads and os.environ["OMP_NUM_THREADS"] == str(threads)


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_server_runs_a_script_as_python_would(tmp_path):
    script = _script(
        tmp_path,
        """
        import os, sys
        print(__name__, sys.argv[1:], sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
        print("on stderr", file=sys.stderr)
        sys.exit(int(sys.argv[1]))
        """,
    )
    log = tmp_path / "log"
    assert mcore_server.run(script, [3, "x y"], str(log), timeout=120) == 3
    assert sorted(log.read_text().splitlines()) == ["__main__ ['3', 'x y'] True", "on stderr"]
    assert mcore_server.run(script, [0], str(log), timeout=120) == 0


def test_server_reports_a_traceback_and_keeps_serving(tmp_path):
    script = _script(tmp_path, "raise ValueError('no such job')\n")
    log = tmp_path / "log"
    assert mcore_server.run(script, [], str(log), timeout=120) == 1
    text = log.read_text()
    assert text.startswith("Traceback") and text.endswith("ValueError: no such job\n")
    ok = _script(tmp_path, "print('next')\n")
    assert mcore_server.run(ok, [], str(log), timeout=120) == 0 and log.read_text() == "next\n"


def test_server_replies_that_arrive_together_are_both_read(tmp_path):
    """The job's two replies (started, ended) may wait in the pipe together when the test process
    comes back to read them: reading the first must leave the second to be read."""
    import json

    script = _script(tmp_path, "pass\n")
    assert mcore_server.run(script, [], str(tmp_path / "log"), timeout=120) == 0  # the server is up
    server = mcore_server._start()
    assert server.stdin is not None
    request = {"script": script, "argv": [], "log": str(tmp_path / "log")}
    server.stdin.write(json.dumps(request).encode() + b"\n")
    time.sleep(1)  # the job (nothing to do) has ended: both replies are in the pipe
    pid = mcore_server._reply(server, time.monotonic() + 5)["pid"]
    assert mcore_server._reply(server, time.monotonic() + 5) == {"rc": 0} and pid > 0


def _gone(pid: int, seconds: float = 30) -> bool:
    """The process has ended (reaped, or a zombie waiting for its new parent)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["exits", "times_out"])
def test_server_kills_what_a_job_leaves_running(tmp_path, how):
    """A job's leftovers (like the Manager that dist_checkpointing.save starts) are killed with its
    process group when it exits, and a job that runs past its timeout is killed with them."""
    pid_file = tmp_path / "leftover.pid"
    script = _script(
        tmp_path,
        f"""
        import subprocess, sys, time
        p = subprocess.Popen(["sleep", "600"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        if sys.argv[1] == "times_out":
            time.sleep(600)
        """,
    )
    start = time.monotonic()
    rc = mcore_server.run(script, [how], str(tmp_path / "log"), timeout=4 if how == "times_out" else 120)
    assert rc == ("timeout" if how == "times_out" else 0)
    assert time.monotonic() - start < 120
    assert _gone(int(pid_file.read_text()))
