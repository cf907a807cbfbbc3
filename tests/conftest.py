"""Shared fixtures: tiny random HF models built offline from transformers configs.

The suite runs on one pytest-xdist worker per core (``-n auto --dist loadgroup`` in
pyproject.toml), each test in its own ``tmp_path``.  The tests that use a module-scoped fixture
run on one worker with the rest of their file (:func:`pytest_collection_modifyitems`), so the
fixture is built once; every other test goes to whichever worker is free.  What several files
need is built once per run with :func:`built_once`, under the run's temp root that all workers
share, and only read from there.  Each worker runs torch (and the CLI subprocesses it starts)
on its share of the cores (:func:`worker_threads`): the OpenMP threads of two workers on the
same two cores spin against each other.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch


def worker_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """This pytest-xdist worker's share of the cores (at least one); None outside pytest-xdist."""
    if not environ.get("PYTEST_XDIST_WORKER"):
        return None
    return max(1, len(os.sched_getaffinity(0)) // int(environ["PYTEST_XDIST_WORKER_COUNT"]))


if threads := worker_threads():
    import torch  # not in the pytest-xdist controller, which runs no test: its start is everyone's wait

    os.environ["OMP_NUM_THREADS"] = str(threads)  # the CLI subprocesses this worker starts
    torch.set_num_threads(threads)

# shape parameters per family; every model gets random values in *every* parameter (norms and
# biases too), so a swapped or dropped tensor cannot hide behind default initialisation
FAMILY_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "gemma": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16
    ),
    "gemma2": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16
    ),
    "seed_oss": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "glm": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        pad_token_id=0,
        partial_rotary_factor=0.5,
    ),
    "phi3": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0
    ),
}


def build_hf(
    path: str,
    family: str = "llama",
    layers: int = 4,
    vocab: int = 128,
    tied: bool | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(FAMILY_CONFIGS[family], num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=128)
    if tied is not None:
        kw["tie_word_embeddings"] = tied
    cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model = model.to(dtype or torch.float32)
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kw)
    return path


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a fixture of module (or class, package) scope, directly or through
    another fixture, joins its file's ``xdist_group``: with ``--dist loadgroup`` the whole group
    runs on one worker, which builds the fixture once.

    pytest-xdist hands out the groups, largest first, then the other tests in collection order,
    a few at a time to whichever worker is free.  In a worker the files with fewer tests come
    first: their tests tend to be the long ones (a subprocess or a model each), so the run ends on
    short tests and the workers finish together."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)  # the fixture closure pytest resolved
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d.scope in ("module", "class", "package") for ds in defs for d in ds):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        tests_in = Counter(item.nodeid.split("::")[0] for item in items)
        items.sort(key=lambda item: tests_in[item.nodeid.split("::")[0]])  # stable: files stay whole


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """``build(DIR)`` once per test run, DIR being ``name`` under the run's temp root, which the
    pytest-xdist workers share: the first worker to ask builds it while the others wait on a lock
    (a build that failed is tried again by the next one to ask).  Read what it returns; copy it to
    change it."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: <run>/popen-gwN
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    """build_hf, each model built once per run (:func:`built_once`): returns a fresh copy under
    tmp for each call."""
    root = tmp_path_factory.mktemp("hf-cache")
    counter = [0]

    def get(family: str = "llama", **kw) -> str:
        name = "-".join(["hf", family, *(f"{k}={v}" for k, v in sorted(kw.items()))])
        built = built_once(tmp_path_factory, name, lambda d: build_hf(str(d), family, **kw))
        counter[0] += 1
        dst = str(root / f"copy-{counter[0]}")
        shutil.copytree(built, dst)
        return dst

    return get


def files_of(path: str) -> dict[str, bytes]:
    out = {}
    for r, _, fs in os.walk(path):
        for f in fs:
            with open(os.path.join(r, f), "rb") as fh:
                out[os.path.relpath(os.path.join(r, f), path)] = fh.read()
    return out


@pytest.fixture(scope="session")
def trained_tp2pp2dp2(tmp_path_factory) -> tuple[str, str]:
    """(HF dir, checkpoint dir): a tiny llama (hidden 72, so no parameter is a multiple of 64; 4
    layers, vocab 256, untied) and the checkpoint megatron-core wrote of it after two Adam steps
    at TP=2 PP=2 DP=2 (bf16 with fp32 masters, distributed optimizer, DDP buckets of 4096
    elements; ``tests/distopt_fixtures.py``), built once per run (:func:`built_once`)."""
    from tests import distopt_fixtures as F

    def build(root: Path) -> None:
        hf, src = str(root / "hf"), str(root / "src")
        F.make_tiny_hf_llama(hf, hidden=72, layers=4, heads=4, kv_heads=2, ffn=120, vocab=256, tied=False)
        F.make_distopt_checkpoint(src, hf, tp=2, pp=2, dp=2, bucket_size=4096, steps=2, bf16=True, init="hf")

    root = built_once(tmp_path_factory, "distopt-llama-tp2pp2dp2", build)
    return str(root / "hf"), str(root / "src")
