"""Concurrent conversions: a destination is published by exactly one of them, never replaced
silently, never a mix; a SIGKILL at any step leaves the old DST or the new one and the next run
succeeds; torchrun ranks agree on the outcome.

Overlap is made deterministic with the test hook ``CKPT_IR_TEST_STOP_AT=STEP``: the conversion
stops itself (SIGSTOP) at that step, holding whatever it holds there, while a rival runs or the
test kills it.  Outputs are compared byte for byte with a sequential conversion of the same
layout, their rank directories with the Megatron naming (``mp_rank_TT`` for TP only,
``mp_rank_TT_PPP`` with PP), and once with ``ckpt-ir diff`` against the source.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_ir.frontends import check_replaceable
from tests.cli_contract import (  # noqa: F401  (fixtures are used by name)
    ERROR_PREFIX,
    MCORE_ITER,
    REPO,
    _env,
    assert_clean_error,
    assert_ok,
    cli_argv,
    convert,
    tiny_hf,
    tmp_siblings,
)
from tests.conftest import files_of

LAYOUTS = {  # name -> (flags, rank directories under iter_0000001, or None for an HF output)
    "tp2": (("--to", "mcore", "--tp", "2"), ["mp_rank_00", "mp_rank_01"]),
    "tp1pp2": (("--to", "mcore", "--tp", "1", "--pp", "2"), ["mp_rank_00_000", "mp_rank_00_001"]),
    "tp2pp2": (
        ("--to", "mcore", "--tp", "2", "--pp", "2"),
        ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"],
    ),
    "tp1": (("--to", "mcore"), ["mp_rank_00"]),
    "hf": (("--to", "hf"), None),
}
LOCK = ".ckpt-ir-lock"


def argv(src: Path, dst: Path, layout: str, *flags: str) -> list[str]:
    return cli_argv("convert", src, dst, *LAYOUTS[layout][0], "--quiet", "--workers", "1", *flags)


def start(args: list[str], stop: str | None = None, python_prefix: str | None = None) -> subprocess.Popen:
    """A conversion in its own process group; ``stop``: the step where it stops itself."""
    env = _env()
    if stop:
        env["CKPT_IR_TEST_STOP_AT"] = stop
    if python_prefix:  # run the CLI after a line of Python (e.g. to take away renameat2)
        args = [
            sys.executable,
            "-c",
            f"{python_prefix}; import sys; from ckpt_ir.commands.cli import main; sys.exit(main(sys.argv[1:]))",
            *args[3:],
        ]
    return subprocess.Popen(
        args,
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(proc: subprocess.Popen, pid: int | None = None, seconds: float = 120) -> None:
    """Wait until ``pid`` (default: the process itself) has stopped at its step."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if state(pid or proc.pid) == "T":
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "(still running)")
    pytest.fail(f"the conversion never reached its stop step (exit {proc.returncode}):\n{err}")


def finish(proc: subprocess.Popen, cont: bool = True, pid: int | None = None) -> subprocess.CompletedProcess:
    if cont:
        os.kill(pid or proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # as the OOM killer or `kill -9` would
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def leftovers(dst: Path) -> list[str]:
    """Hidden siblings of DST: temporary directories, a moved-aside old DST, the lock file."""
    return sorted(n for n in os.listdir(dst.parent) if n.startswith(f".{dst.name}.ckpt-ir-"))


@pytest.fixture(scope="module")
def src(tiny_hf) -> Path:
    return tiny_hf


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Each layout converted alone: the bytes a winner's output must equal."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name in LAYOUTS:
        r = subprocess.run(
            argv(src, root / name, name), capture_output=True, text=True, env=_env(), timeout=300
        )
        assert_ok(r)
        out[name] = files_of(str(root / name))
    return out


def assert_is(dst: Path, layout: str, reference) -> None:
    """DST is the complete output of a conversion to ``layout`` (and nothing else)."""
    ranks = LAYOUTS[layout][1]
    if ranks is None:
        assert (dst / "config.json").is_file(), sorted(os.listdir(dst))
    else:
        assert sorted(os.listdir(dst / MCORE_ITER)) == ranks
    got = files_of(str(dst))
    assert got.keys() == reference[layout].keys(), (sorted(got), sorted(reference[layout]))
    assert got == reference[layout], f"{dst} differs from a {layout} conversion made alone"


def assert_names_dst(res: subprocess.CompletedProcess, dst: Path) -> None:
    """The loser: non-zero exit, one error line naming DST, no traceback."""
    assert_clean_error(res, None, code=res.returncode or -1, names=(str(dst),))


def occupy(dst: Path) -> dict[str, bytes]:
    """A previous checkpoint at DST (random bytes: --overwrite replaces only a checkpoint, and
    judges it by its entries)."""
    (dst / MCORE_ITER / "mp_rank_00").mkdir(parents=True)
    (dst / "latest_checkpointed_iteration.txt").write_text("1")
    (dst / MCORE_ITER / "mp_rank_00" / "model_optim_rng.pt").write_bytes(os.urandom(1000))
    return files_of(str(dst))


# ---------------------------------------------------------------------------------------------
# two conversions into one destination (the case: --tp 2 and --tp 1 --pp 2)


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_two_overlapping_conversions_one_wins(src, tmp_path, reference, overwrite):
    """The TP2 conversion holds DST (stopped once claimed); the TP1 PP2 one started meanwhile
    fails naming DST and leaves nothing; the TP2 one then completes and DST is its output."""
    dst = tmp_path / "out"
    flags = ("--overwrite",) if overwrite else ()
    if overwrite:
        occupy(dst)
    first = start(argv(src, dst, "tp2", *flags), stop="claimed")
    try:
        wait_stopped(first)
        lock = (dst.parent / f".{dst.name}{LOCK}").read_text()
        assert f"pid {first.pid} " in lock, lock
        second = subprocess.run(
            argv(src, dst, "tp1pp2", *flags), capture_output=True, text=True, env=_env(), timeout=300
        )
        assert_names_dst(second, dst)
        assert f"pid {first.pid}" in second.stderr and "another conversion" in second.stderr, second.stderr
        assert leftovers(dst) == [f".{dst.name}{LOCK}"], "the loser left something beside DST"
        res = finish(first)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert_ok(res)
    assert_is(dst, "tp2", reference)
    assert not leftovers(dst), leftovers(dst)


def test_two_conversions_started_together(src, tmp_path, reference):
    """No hook, as a user would: ``--tp 2`` and 0.3 s later ``--tp 1 --pp 2`` into one DST, three
    times.  Whether they overlap or not, exactly one exits 0 and DST is exactly its output."""
    for attempt in range(3):
        dst = tmp_path / f"out{attempt}"
        a = start(argv(src, dst, "tp2"))
        time.sleep(0.3 * attempt / 2)  # 0, 0.15 and 0.3 s apart
        b = start(argv(src, dst, "tp1pp2"))
        results = {"tp2": finish(a, cont=False), "tp1pp2": finish(b, cont=False)}
        winners = [name for name, r in results.items() if r.returncode == 0]
        assert len(winners) == 1, {n: (r.returncode, r.stderr) for n, r in results.items()}
        for name, r in results.items():
            if name != winners[0]:
                assert_names_dst(r, dst)
        assert_is(dst, winners[0], reference)
        assert not leftovers(dst), leftovers(dst)


def test_diff_confirms_the_survivor(src, tmp_path):
    """The surviving DST of an overlapped pair holds every tensor of the source, bit for bit."""
    from ckpt_ir.commands.diff import diff

    dst = tmp_path / "out"
    first = start(argv(src, dst, "tp1pp2"), stop="publish")  # everything written, not yet published
    wait_stopped(first)
    assert_names_dst(
        subprocess.run(argv(src, dst, "tp2"), capture_output=True, text=True, env=_env(), timeout=300), dst
    )
    assert_ok(finish(first))
    report = diff(str(src), str(dst))
    assert report["identical"] and report["equal"] > 0, report


# ---------------------------------------------------------------------------------------------
# N > cores concurrent conversions


N = max(5, (os.cpu_count() or 1) + 1)


def test_many_concurrent_conversions_into_distinct_destinations(src, tmp_path, reference):
    names = [list(LAYOUTS)[i % len(LAYOUTS)] for i in range(N)]
    procs = [start(argv(src, tmp_path / f"out{i}", name)) for i, name in enumerate(names)]
    results = [finish(p, cont=False) for p in procs]
    for i, (name, r) in enumerate(zip(names, results)):
        assert_ok(r)
        assert_is(tmp_path / f"out{i}", name, reference)
        assert not leftovers(tmp_path / f"out{i}")


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_many_concurrent_conversions_into_one_destination(src, tmp_path, reference, overwrite):
    """N conversions of N different layouts into one DST: one complete output, N-1 clean failures.
    The first is held just before its publish so that all the others overlap it; without the
    hold they run free (and, being tiny, may also run one after the other)."""
    dst = tmp_path / "out"
    flags = ("--overwrite",) if overwrite else ()
    names = [list(LAYOUTS)[i % len(LAYOUTS)] for i in range(N)]
    held = start(argv(src, dst, names[0], *flags), stop="publish")
    wait_stopped(held)
    rivals = [start(argv(src, dst, name, *flags)) for name in names[1:]]
    results = [finish(p, cont=False) for p in rivals]
    results.insert(0, finish(held))
    assert [r.returncode == 0 for r in results] == [True] + [False] * (N - 1), [
        (r.returncode, r.stderr[-300:]) for r in results
    ]
    for r in results[1:]:
        assert_names_dst(r, dst)
    assert_is(dst, names[0], reference)
    assert not leftovers(dst), leftovers(dst)

    free = tmp_path / "free"
    procs = [start(argv(src, free, name)) for name in names]
    results = [finish(p, cont=False) for p in procs]
    winners = [i for i, r in enumerate(results) if r.returncode == 0]
    assert len(winners) == 1, [(r.returncode, r.stderr[-300:]) for r in results]
    for i, r in enumerate(results):
        if i != winners[0]:
            assert_names_dst(r, free)
    assert_is(free, names[winners[0]], reference)
    assert not leftovers(free), leftovers(free)


# ---------------------------------------------------------------------------------------------
# SIGKILL at each step: the old DST or the new one, never a mix; the next run succeeds

STEPS_FRESH = ["claimed", "written", "publish"]
STEPS_OVERWRITE = ["claimed", "written", "publish", "replaced"]
NO_RENAMEAT2 = "import ckpt_ir.io.atomic as a; a._RENAMEAT2 = None"


@pytest.mark.parametrize(
    "step,existing,renameat2",
    [(s, False, True) for s in STEPS_FRESH]
    + [(s, True, True) for s in STEPS_OVERWRITE]
    + [(s, True, False) for s in ("aside", "replaced")],
)
def test_sigkill_at_each_step(src, tmp_path, reference, step, existing, renameat2):
    dst = tmp_path / "out"
    old = occupy(dst) if existing else None
    flags = ("--overwrite",) if existing else ()
    proc = start(argv(src, dst, "tp2", *flags), stop=step, python_prefix=None if renameat2 else NO_RENAMEAT2)
    try:
        wait_stopped(proc)
        kill(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if step == "replaced":
        assert_is(dst, "tp2", reference)  # the new DST is complete; the old one awaits removal
    elif step == "aside":  # without renameat2 a kill between the two renames leaves DST missing ...
        assert not dst.exists()
        assert any(".ckpt-ir-old-" in n for n in leftovers(dst)), leftovers(dst)
        # ... and the next run puts the old DST back before it checks
        res = subprocess.run(
            argv(src, dst, "tp1pp2"), capture_output=True, text=True, env=_env(), timeout=300
        )
        assert_clean_error(res, None, code=2, names=(str(dst), "--overwrite"))
        assert files_of(str(dst)) == old, "the old DST was not restored"
    elif existing:
        assert files_of(str(dst)) == old, "a killed --overwrite damaged the old DST"
    else:
        assert not dst.exists(), "a killed conversion left a destination"
    res = subprocess.run(
        argv(src, dst, "tp1pp2", *(("--overwrite",) if dst.exists() else ())),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert_ok(res)
    assert_is(dst, "tp1pp2", reference)
    assert not leftovers(dst), f"not swept: {leftovers(dst)}"


# ---------------------------------------------------------------------------------------------
# publishing without the lock: what appeared or changed after the check is never replaced


def _destination(tmp_path: Path, monkeypatch, renameat2: bool, before: str) -> Path:
    """DST absent, an empty directory or a full one; renameat2 taken away unless ``renameat2``."""
    from ckpt_ir.io import atomic

    if not renameat2:
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    dst = tmp_path / "out"
    if before == "empty":
        dst.mkdir()
    elif before == "full":
        occupy(dst)
    return dst


def _written(claim) -> str:
    from ckpt_ir.io import atomic

    tmp = atomic.prepare(claim)
    Path(tmp, "new.txt").write_text("new\n")
    return tmp


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "plain-rename"])
@pytest.mark.parametrize(
    "before,overwrite,rival",
    [
        ("absent", False, "dir"),
        ("absent", False, "file"),
        ("absent", True, "dir"),
        ("empty", False, "fill"),
        ("full", True, "swap"),
    ],
)
def test_publish_refuses_what_appeared_after_the_check(
    tmp_path, monkeypatch, renameat2, before, overwrite, rival
):
    """A writer that ignores the lock (another tool, or a filesystem without flock) acts between
    the check and the publish: the publish fails naming DST and the rival's DST is kept."""
    from ckpt_ir.errors import CkptIrError
    from ckpt_ir.io import atomic

    dst = _destination(tmp_path, monkeypatch, renameat2, before)
    with atomic.claim(str(dst), overwrite, check_replaceable) as claim:
        tmp = _written(claim)
        if rival == "dir":
            dst.mkdir()
            (dst / "theirs.txt").write_text("theirs\n")
        elif rival == "file":
            dst.write_text("theirs\n")
        elif rival == "fill":
            (dst / "theirs.txt").write_text("theirs\n")
        else:  # another writer replaced the DST that was checked with its own
            theirs = tmp_path / "theirs"
            theirs.mkdir()
            (theirs / "theirs.txt").write_text("theirs\n")
            os.rename(dst, tmp_path / "gone")
            os.rename(theirs, dst)
        snapshot = files_of(str(dst)) if dst.is_dir() else dst.read_text()
        with pytest.raises(CkptIrError, match=str(dst)):
            atomic.publish(tmp, claim)
        assert (files_of(str(dst)) if dst.is_dir() else dst.read_text()) == snapshot, (
            "the rival's DST was replaced"
        )
        assert "theirs" in str(snapshot) and "new.txt" not in str(snapshot)
        shutil.rmtree(tmp)  # what the caller's cleanup does
    assert not leftovers(dst), leftovers(dst)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "plain-rename"])
@pytest.mark.parametrize("before", ["absent", "empty", "full"])
def test_publish_replaces_exactly_what_was_checked(tmp_path, monkeypatch, renameat2, before):
    from ckpt_ir.io import atomic

    dst = _destination(tmp_path, monkeypatch, renameat2, before)
    with atomic.claim(str(dst), before == "full", check_replaceable) as claim:
        atomic.publish(_written(claim), claim)
    assert files_of(str(dst)) == {"new.txt": b"new\n"}
    assert not leftovers(dst), leftovers(dst)


def test_lock_file_of_a_killed_run_does_not_block(tmp_path):
    """A lock file nobody holds (its process was killed) is taken over, then removed."""
    from ckpt_ir.errors import CkptIrError
    from ckpt_ir.io import atomic

    dst = tmp_path / "out"
    (tmp_path / f".out{LOCK}").write_text("pid 999999 on elsewhere\n")
    with atomic.claim(str(dst), False, check_replaceable):
        assert f"pid {os.getpid()} " in (tmp_path / f".out{LOCK}").read_text()
        with pytest.raises(CkptIrError, match=f"{dst}: another conversion \\(pid {os.getpid()} "):
            with atomic.claim(str(dst), False, check_replaceable):
                pass
    assert not leftovers(dst)


# ---------------------------------------------------------------------------------------------
# torchrun: every rank agrees on the outcome


def torchrun(src: Path, dst: Path, layout: str, stop: str | None = None) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",  # a free port
        *argv(src, dst, layout)[1:],
    ]
    return start(args, stop=stop)


def test_torchrun_loses_to_a_running_conversion(src, tmp_path, reference):
    dst = tmp_path / "out"
    first = start(argv(src, dst, "tp2"), stop="claimed")
    try:
        wait_stopped(first)
        res = finish(torchrun(src, dst, "tp1pp2"), cont=False)
        assert res.returncode != 0
        # both ranks raise the error rank 0 broadcast; torchrun may stop rank 1 once rank 0 has
        # exited, before rank 1 printed it, so one or two identical lines
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith(ERROR_PREFIX)]
        assert errors and len(errors) <= 2 and len(set(errors)) == 1, res.stderr
        assert str(dst) in errors[0] and f"another conversion (pid {first.pid} " in errors[0], errors
        assert not re.search(r'File ".*/ckpt_ir/', res.stderr), f"a rank printed a traceback:\n{res.stderr}"
        assert leftovers(dst) == [f".{dst.name}{LOCK}"]
        assert_ok(finish(first))
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert_is(dst, "tp2", reference)
    assert not leftovers(dst)


def test_torchrun_wins_over_a_later_conversion(src, tmp_path, reference):
    dst = tmp_path / "out"
    job = torchrun(src, dst, "tp1pp2", stop="claimed")  # rank 0 claims DST, then stops
    try:
        lock = dst.parent / f".{dst.name}{LOCK}"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().startswith("pid ")) and time.monotonic() < deadline:
            time.sleep(0.02)
        rank0 = int(lock.read_text().split()[1])
        wait_stopped(job, rank0)
        assert_names_dst(
            subprocess.run(argv(src, dst, "tp2"), capture_output=True, text=True, env=_env(), timeout=300),
            dst,
        )
        res = finish(job, pid=rank0)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert res.returncode == 0, res.stderr
    assert_is(dst, "tp1pp2", reference)
    assert not leftovers(dst), leftovers(dst)
