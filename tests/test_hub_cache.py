"""Sources from the Hugging Face cache: Hub ids (``org/name[@revision]``) for every command that
reads a source, and snapshot directories given as paths (their files are symlinks into the cache's
``blobs/``).  Nothing here touches the network: the cache is built in tmp exactly as
huggingface_hub lays it out, and the CLI runs with ``HF_HUB_OFFLINE=1``; the download path is
checked with huggingface_hub's ``snapshot_download`` replaced."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_hf, files_of
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


def test_hub_id_convert_equals_the_local_copy(hub, tmp_path):
    ok(run(hub, "convert", "org/tiny", tmp_path / "from-id", "--to", "mcore", "--tp", 2))
    ok(run(hub, "convert", hub["a"], tmp_path / "from-path", "--to", "mcore", "--tp", 2))
    assert files_of(str(tmp_path / "from-id")) == files_of(str(tmp_path / "from-path"))
    # the side files (README.md and LICENSE are no side files) came out of the blobs as files
    assert not any(p.is_symlink() for p in (tmp_path / "from-id").rglob("*"))


def test_hub_id_with_revision_diff_and_inspect(hub):
    ok(run(hub, "diff", "org/tiny", hub["a"]))
    r = run(hub, "diff", "org/tiny@v1", "org/tiny")
    assert r.returncode == 1 and "DIFFERENT" in r.stdout, r.stdout + r.stderr
    ok(run(hub, "diff", f"org/tiny@{hub['commit_b']}", hub["b"]))  # a commit as the revision
    text = ok(run(hub, "inspect", "org/tiny")).stdout
    assert "layers.1.mlp.down.weight" in text and str(hub["snapshot"]) in text


def test_hub_id_as_hf_config_and_lora_adapter(hub, tmp_path):
    """--hf-config (convert, plan), --lora-load (convert, verify), convert-ckpt --load-dir and
    verify's two sides, each a Hub id."""
    mc = tmp_path / "mc"
    ok(
        run(
            hub,
            "convert-ckpt",
            "--load-dir",
            "org/tiny",
            "--save-dir",
            mc,
            "--target-tensor-parallel-size",
            2,
        )
    )
    back = tmp_path / "back"
    ok(run(hub, "convert", mc, back, "--to", "hf", "--hf-config", "org/tiny"))
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (hub["a"] / "config.json").read_text()
    )
    ok(run(hub, "diff", back, "org/tiny"))
    ok(run(hub, "diff", mc, "org/tiny", "--hf-config", "org/tiny"))
    assert "layers.1.mlp.down.weight" in ok(run(hub, "inspect", mc, "--hf-config", "org/tiny")).stdout
    plans = [
        json.loads(
            ok(
                run(hub, "plan", "--hf-config", cfg, "--to", "mcore", "--format", "json", "--disk-gbps", 1)
            ).stdout
        )
        for cfg in ("org/tiny", hub["a"])
    ]
    assert plans[0]["total_bytes"] == plans[1]["total_bytes"] > 0
    merged = tmp_path / "merged"
    ok(run(hub, "convert", "org/tiny", merged, "--to", "hf", "--lora-load", "org/tiny-lora"))
    ok(run(hub, "verify", merged, "org/tiny", "--lora-load", "org/tiny-lora"))


def test_hf_home_locates_the_cache(hub, tmp_path):
    """Without HF_HUB_CACHE the cache is $HF_HOME/hub."""
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(hub["cache"], home / "hub")
    text = ok(run(hub, "inspect", "org/tiny", HF_HUB_CACHE="", HF_HOME=str(home))).stdout
    assert "layers.1.mlp.down.weight" in text


@pytest.mark.parametrize("source", ["org/missing", "org/tiny@no-such-tag"])
def test_offline_without_a_cached_copy(hub, tmp_path, source):
    out = tmp_path / "out"
    r = run(hub, "convert", source, out, "--to", "mcore")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(
        f"ckpt-ir: error: {source}: no such file or directory, and the Hugging Face cache {hub['cache']} has no complete snapshot of org/"
    )
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in lines[0]
    assert not out.exists()


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


# ---------------------------------------------------------------------------------------------
# downloading, with snapshot_download replaced (no network)


@pytest.fixture
def online(monkeypatch, tmp_path):
    """huggingface_hub online, its snapshot_download a fake that records each call and returns a
    snapshot holding the files the test put in ``files``."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    calls: list[dict] = []

    def fake(repo_id, **kw):
        calls.append({"repo": repo_id, **kw})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return snapshot, calls


def test_download_asks_for_the_checkpoint_files_only(online):
    from ckpt_ir.io.hub import resolve
    from ckpt_ir.io.side_files import HF_FILES

    snapshot, calls = online
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    assert resolve("org/model@v2") == str(snapshot)
    [call] = calls
    assert call["repo"] == "org/model" and call["revision"] == "v2" and call["local_files_only"] is False
    assert call["ignore_patterns"] == ["*/*"]  # top level only: no original/ consolidated weights
    assert set(call["allow_patterns"]) == set(HF_FILES) - {"pytorch_model*.bin", "adapter_model.bin"}


def test_download_takes_bin_weights_only_without_safetensors(online):
    from ckpt_ir.io.hub import resolve

    snapshot, calls = online
    (snapshot / "config.json").write_text("{}")
    (snapshot / "pytorch_model.bin").write_bytes(b"")
    assert resolve("org/old") == str(snapshot)
    assert [c["allow_patterns"] for c in calls][1] == ["pytorch_model*.bin", "adapter_model.bin"]


def test_download_for_a_config_takes_no_weights(online):
    from ckpt_ir.io.hub import resolve

    snapshot, calls = online
    (snapshot / "config.json").write_text("{}")
    assert resolve("org/big", weights=False) == str(snapshot)
    [call] = calls
    assert "config.json" in call["allow_patterns"] and "tokenizer*" in call["allow_patterns"]
    assert not [p for p in call["allow_patterns"] if "safetensors" in p or p.endswith(".bin")]


def test_an_existing_path_is_never_a_hub_id(tmp_path, monkeypatch, online):
    from ckpt_ir.io.hub import resolve

    _, calls = online
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert resolve("org/model") == "org/model" and resolve("not an id") == "not an id" and not calls
