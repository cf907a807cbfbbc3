"""Sources from the Hugging Face cache: snapshot directories given as paths (their files are
symlinks into the cache's ``blobs/``).  Nothing here touches the network: the cache is built in
tmp exactly as huggingface_hub lays it out, and the CLI runs with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_hf
from tests.test_lora import make_peft_adapter

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT_EXTRAS = {"README.md": "# tiny\n", "LICENSE": "MIT\n", ".gitattributes": "*.safetensors lfs\n"}


def add_to_cache(cache: Path, repo: str, files: Path, refs: tuple[str, ...] = ("main",)) -> tuple[Path, str]:
    """Put the files of directory ``files`` into ``cache`` as huggingface_hub stores a download:
    ``models--org--name/blobs/<hash>``, ``refs/<ref>`` holding the commit, and
    ``snapshots/<commit>/<file>`` a relative symlink to its blob.  Returns (snapshot, commit)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    names = sorted(os.listdir(files))
    commit = hashlib.sha1("".join(names).encode() + (files / names[0]).read_bytes()).hexdigest()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for name in names:
        data = (files / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{blob}")
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot, commit


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """A cache with ``org/tiny`` (main: a sharded tiny Llama with a Hub snapshot's extra files;
    tag v1: the same model with other weights) and ``org/tiny-lora`` (a PEFT adapter for main),
    and plain local copies of each."""
    root = tmp_path_factory.mktemp("hub")
    local_a = Path(build_hf(str(root / "local-a"), layers=2, seed=0, max_shard_size="40KB"))
    local_b = Path(build_hf(str(root / "local-b"), layers=2, seed=1, max_shard_size="40KB"))
    for name, text in SNAPSHOT_EXTRAS.items():
        (local_a / name).write_text(text)
    adapter = root / "local-adapter"
    make_peft_adapter(str(local_a), str(adapter), targets=("q_proj", "v_proj"))
    cache = root / "cache"
    snap_a, commit_a = add_to_cache(cache, "org/tiny", local_a)
    _, commit_b = add_to_cache(cache, "org/tiny", local_b, refs=("v1",))
    add_to_cache(cache, "org/tiny-lora", adapter)
    assert len(list((cache / "models--org--tiny" / "snapshots").iterdir())) == 2
    assert (local_a / "model.safetensors.index.json").is_file()  # sharded: the index names each file
    return {
        "cache": cache,
        "home": root / "hf-home",
        "a": local_a,
        "b": local_b,
        "snapshot": snap_a,
        "commit_b": commit_b,
        "root": root,
    }


def run(hub: dict, *args: object, **env: str) -> subprocess.CompletedProcess:
    """The CLI, offline, with ``hub``'s cache (``env`` overrides; an empty value removes a variable)."""
    full = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub["cache"])}
    full["HF_HOME"] = str(hub["home"])
    full.update(env)
    full = {k: v for k, v in full.items() if v}
    return subprocess.run(
        [sys.executable, "-m", "ckpt_ir", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=full,
        cwd=str(hub["root"]),
    )


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"exit {r.returncode}\n{r.stderr}"
    return r


def test_snapshot_directory_as_a_path(hub, tmp_path):
    """Refused before: 'tensor ... points to 'model-00002-of-0000N.safetensors', which resolves
    outside the checkpoint directory', since every file is a link into blobs/."""
    out = tmp_path / "mc"
    ok(run(hub, "convert", hub["snapshot"], out, "--to", "mcore", "--tp", 2))
    ok(run(hub, "diff", out, hub["a"]))


def test_a_link_out_of_the_cache_is_still_refused(hub, tmp_path):
    """Only links into the snapshot's own blobs/ are followed: one to a file elsewhere is not."""
    cache = tmp_path / "cache"
    snapshot, _ = add_to_cache(cache, "org/evil", hub["a"])
    shard = sorted(snapshot.glob("model-*.safetensors"))[-1]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)
    r = run(hub, "convert", snapshot, tmp_path / "out", "--to", "mcore")
    assert (
        r.returncode == 1
        and f"points to '{shard.name}', which resolves outside the checkpoint directory" in r.stderr
    )
