"""The CLI error contract and tiny shared checkpoints for the bad-input and safety tests.

Fixtures are built offline once per run (an HF Llama via transformers, and a TP=2 PP=2
Megatron-Core copy made by ``ckpt-ir convert``); every test corrupts its own copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.cli_server import run_cli
from tests.conftest import built_once

REPO = Path(__file__).resolve().parents[1]
TMP_TAG = ".ckpt-ir-tmp-"
CLI_TIMEOUT = 180  # a hang fails the test instead of blocking CI
ERROR_PREFIX = "ckpt-ir: error:"
MCORE_ITER = "iter_0000001"
MEMORY_CAP = 8 << 30  # address-space limit for each CLI run (stops runaway allocations)

# ---------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # many short CLI runs: cache bytecode outside the repo instead of recompiling every time
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "ckpt-ir-tests-pycache")
    return env


def _limit_memory() -> None:
    """Runs in the child: a runaway allocation becomes a MemoryError (a failed test), not an OOM."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def cli_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "ckpt_ir", *map(str, args)]


def cli(*args: object, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return run_cli(list(args), timeout=timeout, env=_env(), cwd=REPO, memory_cap=MEMORY_CAP)


def convert(src: Path, dst: Path, *flags: object, to: str = "mcore") -> subprocess.CompletedProcess:
    return cli("convert", src, dst, "--to", to, *flags)


def tmp_siblings(dst: Path) -> list[str]:
    if not dst.parent.is_dir():
        return []
    return sorted(n for n in os.listdir(dst.parent) if n.startswith(f".{dst.name}{TMP_TAG}"))


def assert_clean_error(
    res: subprocess.CompletedProcess, dst: Path | None, *, code: int = 1, names: tuple[str, ...] = ()
) -> str:
    """The one-line error contract; returns the message."""
    err = res.stderr
    assert "Traceback" not in err, f"traceback on stderr:\n{err}"
    assert res.returncode == code, f"exit code {res.returncode}, expected {code}\nstderr:\n{err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ERROR_PREFIX in ln]
    assert len(errors) == 1, f"expected exactly one '{ERROR_PREFIX}' line, got:\n{err}"
    assert errors[0].startswith(ERROR_PREFIX) and lines[-1] == errors[0], (
        f"error is not the last line:\n{err}"
    )
    msg = errors[0]
    for n in names:
        assert str(n) in msg, f"error message does not name {n!r}: {msg}"
    if dst is not None:
        assert not dst.exists(), f"{dst} was left behind"
        assert not tmp_siblings(dst), f"temporary directories left behind: {tmp_siblings(dst)}"
    return msg


def assert_ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0 and "Traceback" not in res.stderr, f"exit {res.returncode}\n{res.stderr}"


def build_tiny_hf(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads, vocab 128), built once per run and shared
    with test_safety.py and the other files (:func:`tests.conftest.built_once`)."""

    def build(d: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = AutoConfig.for_model(
            "llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)

    return built_once(tmp_path_factory, "hf_tiny", build)


def build_tiny_mcore(tmp_path_factory) -> Path:
    """The tiny HF model as a Megatron-Core TP=2 PP=2 checkpoint (made by ckpt-ir itself)."""
    src = build_tiny_hf(tmp_path_factory)
    return built_once(
        tmp_path_factory,
        "mcore_tp2pp2",
        lambda d: assert_ok(convert(src, d, "--tp", 2, "--pp", 2, "--quiet")),
    )


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return build_tiny_hf(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_mcore(tmp_path_factory) -> Path:
    return build_tiny_mcore(tmp_path_factory)


@pytest.fixture
def hf_src(tiny_hf, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_hf, tmp_path / "src"))


@pytest.fixture
def mcore_src(tiny_mcore, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_mcore, tmp_path / "src"))


@pytest.fixture
def dst(tmp_path) -> Path:
    return tmp_path / "out"
