"""Safety properties: the destination is replaced atomically or not at all, sources are never
modified, pickles never run code, a killed conversion leaves nothing behind that the next run
does not clean, and no corrupt input escapes as anything but a CkptIrError.

CLI checks run ``python -m ckpt_ir`` as a subprocess; the fuzz tests call :mod:`ckpt_ir.api`.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from tests.cli_contract import (  # noqa: F401  (fixtures are used by name)
    CLI_TIMEOUT,
    ERROR_PREFIX,
    MCORE_ITER,
    MEMORY_CAP,
    REPO,
    TMP_TAG,
    _env,
    _limit_memory,
    assert_clean_error,
    assert_ok,
    build_tiny_hf,
    build_tiny_mcore,
    cli,
    cli_argv,
    convert,
    dst,
    hf_src,
    mcore_src,
    tiny_hf,
    tiny_mcore,
    tmp_siblings,
)
from tests.conftest import files_of

RANKS = ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001")


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mode) for every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() or p.is_symlink():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[str(p.relative_to(root))] = (h.hexdigest(), p.lstat().st_mode)
    return out


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------------------------------------
# 6. an existing destination


def _occupy(dst: Path) -> dict[str, tuple[str, int]]:
    dst.mkdir()
    (dst / "keep.txt").write_text("precious\n")
    (dst / "sub").mkdir()
    (dst / "sub" / "data.bin").write_bytes(os.urandom(1000))
    return tree_digest(dst)


def test_nonempty_destination_without_overwrite_exit_2(hf_src, dst):
    before = _occupy(dst)
    assert_clean_error(convert(hf_src, dst), None, code=2, names=(str(dst), "--overwrite"))
    assert tree_digest(dst) == before, "DST was modified"
    assert not tmp_siblings(dst)


def test_destination_is_a_file_exit_2(hf_src, dst):
    dst.write_text("not a directory\n")
    assert_clean_error(convert(hf_src, dst), None, code=2, names=(str(dst),))
    assert dst.read_text() == "not a directory\n"
    assert not tmp_siblings(dst)


def test_empty_destination_is_used(hf_src, dst):
    dst.mkdir()
    assert_ok(convert(hf_src, dst, "--quiet", to="hf"))
    assert (dst / "config.json").is_file() and list(dst.glob("*.safetensors"))
    assert not tmp_siblings(dst)


def _old_checkpoint(dst: Path) -> dict[str, tuple[str, int]]:
    """A previous Megatron checkpoint at DST (random bytes: --overwrite judges a directory by its
    entries, not by their contents)."""
    rank = dst / MCORE_ITER / "mp_rank_00"
    rank.mkdir(parents=True)
    (dst / "latest_checkpointed_iteration.txt").write_text("1")
    (rank / "model_optim_rng.pt").write_bytes(os.urandom(1000))
    return tree_digest(dst)


def test_overwrite_replaces_destination(hf_src, dst):
    _old_checkpoint(dst)
    assert_ok(convert(hf_src, dst, "--overwrite", "--quiet", to="hf"))
    names = {p.name for p in dst.iterdir()}
    assert MCORE_ITER not in names and "latest_checkpointed_iteration.txt" not in names, names
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names), names
    assert not tmp_siblings(dst), "the old destination or the temp dir was left behind"


def test_failed_overwrite_keeps_old_destination(hf_src, dst):
    before = _old_checkpoint(dst)
    assert_clean_error(convert(hf_src, dst, "--overwrite", "--tp", 3), None, names=("3",))
    assert tree_digest(dst) == before, "a failed --overwrite damaged the existing destination"
    assert not tmp_siblings(dst)


def _entries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# Every command that writes a checkpoint: its argv for an HF and a Megatron source, and the
# directory T it would replace; the demo writes three directories below its DIR, T the last one.
WRITERS = {
    "convert-hf": lambda hf, mc, t: ("convert", hf, t, "--to", "hf", "--overwrite"),
    "convert-mcore": lambda hf, mc, t: ("convert", hf, t, "--to", "mcore", "--tp", 2, "--overwrite"),
    "convert-torch-dist": lambda hf, mc, t: (
        *("convert", hf, t, "--to", "mcore", "--ckpt-format", "torch_dist", "--overwrite"),
    ),
    "convert-peft": lambda hf, mc, t: ("convert", hf, t, "--to", "peft", "--overwrite"),
    "convert-ckpt-hf-to-mg": lambda hf, mc, t: (
        *("convert-ckpt", "--load-model-type", "hf", "--save-model-type", "mg"),
        *("--load-dir", hf, "--save-dir", t, "--overwrite"),
    ),
    "convert-ckpt-mg-to-hf": lambda hf, mc, t: (
        *("convert-ckpt", "--load-model-type", "mg", "--save-model-type", "hf"),
        *("--load-dir", mc, "--save-dir", t, "--overwrite"),
    ),
    "demo": lambda hf, mc, t: ("demo", t.parent),
}


def _foreign_tree(t: Path, kind: str) -> str:
    """A directory tree at T that --overwrite must not replace; returns the entry the error names."""
    if kind == "files":  # the case: a project directory
        t.mkdir(parents=True)
        (t / "notes.txt").write_text("my notes\n")
        (t / "runs").mkdir()
        (t / "runs" / "log.txt").write_bytes(os.urandom(300))
        return str(t / "notes.txt")
    if kind == "checkpoint-and-a-file":  # a checkpoint with one file of the user's deep inside
        _old_checkpoint(t)
        (t / MCORE_ITER / "mp_rank_00" / "notes.txt").write_text("keep me\n")
        return str(t / MCORE_ITER / "mp_rank_00" / "notes.txt")
    # only files a checkpoint may hold, but no checkpoint
    t.mkdir(parents=True)
    (t / "README.md").write_text("# my project\n")
    (t / "tokenizer.json").write_text("{}\n")
    return f"{t}: holds no checkpoint"


@pytest.mark.parametrize(
    "writer,tree",
    [(w, "files") for w in WRITERS]
    + [(w, "checkpoint-and-a-file") for w in WRITERS]
    + [("convert-hf", "no-checkpoint")],
)
def test_overwrite_refuses_a_directory_that_is_not_only_a_checkpoint(
    tiny_hf, tiny_mcore, tmp_path, writer, tree
):
    """--overwrite replaces only a directory that holds a checkpoint and nothing else: anything
    else is refused with exit 2 naming the first foreign entry, and not one byte of it is lost."""
    t = tmp_path / "work" / "hf-roundtrip" if writer == "demo" else tmp_path / "out"
    named = _foreign_tree(t, tree)
    root = t.parent if writer == "demo" else t
    before, entries = tree_digest(root), _entries(root)
    res = cli(*WRITERS[writer](tiny_hf, tiny_mcore, t))
    msg = assert_clean_error(res, None, code=2, names=(named,))
    assert "--overwrite replaces only a directory that holds" in msg, msg
    assert tree_digest(root) == before and _entries(root) == entries, "the directory was changed"
    assert not tmp_siblings(t)


@pytest.fixture(scope="module")
def hf_output(tiny_hf, tmp_path_factory) -> dict[str, bytes]:
    """The files of ``convert tiny_hf --to hf`` into a fresh directory."""
    out = tmp_path_factory.mktemp("hf-output") / "out"
    assert_ok(convert(tiny_hf, out, "--quiet", to="hf"))
    return files_of(str(out))


def _previous(kind: str, hf_src: Path, mcore_src: Path, t: Path) -> None:
    """A previous checkpoint of ``kind`` at T."""
    if kind == "ckpt-ir-hf":
        assert_ok(convert(hf_src, t, "--quiet", to="hf"))
    elif kind == "ckpt-ir-mcore-with-notes":  # also carries hf/ and ckpt-ir-notes.txt
        assert_ok(convert(mcore_src, t, "--replicas", "take-rank0", "--quiet"))
        assert (t / "ckpt-ir-notes.txt").is_file() and (t / "hf" / "config.json").is_file()
    elif kind == "ckpt-ir-torch-dist":
        assert_ok(convert(hf_src, t, "--ckpt-format", "torch_dist", "--quiet"))
    elif kind == "hub-snapshot":  # an HF model as the Hub holds it, files as symlinks into blobs/
        blobs = t.parent / "blobs"
        shutil.copytree(hf_src, blobs)
        t.mkdir()
        extra = ("README.md", "LICENSE", ".gitattributes", "tokenizer.json", "chat_template.jinja")
        for name in extra:
            (blobs / name).write_text(f"{name}\n")
        for name in os.listdir(blobs):
            (t / name).symlink_to(os.path.join("..", "blobs", name))
    elif kind == "peft-adapter":
        t.mkdir()
        (t / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}\n')
        (t / "adapter_model.safetensors").write_bytes(os.urandom(500))
        (t / "README.md").write_text("# adapter\n")
    else:  # a Megatron-LM save directory: two iterations, distributed optimizer, a release
        for it in ("iter_0000010", "iter_0000020", "release"):
            rank = t / it / "mp_rank_00_000"
            rank.mkdir(parents=True)
            (rank / "model_optim_rng.pt").write_bytes(os.urandom(300))
            (rank / "distrib_optim.pt").write_bytes(os.urandom(300))
        (t / "latest_checkpointed_iteration.txt").write_text("20")


@pytest.mark.parametrize(
    "kind",
    [
        "ckpt-ir-hf",
        "ckpt-ir-mcore-with-notes",
        "ckpt-ir-torch-dist",
        "hub-snapshot",
        "peft-adapter",
        "megatron-lm",
    ],
)
def test_overwrite_replaces_a_previous_checkpoint(hf_src, tiny_mcore, tmp_path, hf_output, kind):
    t = tmp_path / "out"
    _previous(kind, hf_src, tiny_mcore, t)
    assert_ok(convert(hf_src, t, "--overwrite", "--quiet", to="hf"))
    assert files_of(str(t)) == hf_output, "DST is not exactly the new output"
    assert not tmp_siblings(t)


# ---------------------------------------------------------------------------------------------
# 7. a destination that cannot be written


def test_destination_under_a_regular_file(hf_src, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("I am a file\n")
    dst = blocker / "sub"
    assert_clean_error(convert(hf_src, dst), None, names=(str(blocker),))
    assert blocker.read_text() == "I am a file\n"
    assert not [n for n in os.listdir(tmp_path) if TMP_TAG in n]


def test_unwritable_destination_parent(hf_src, tmp_path):
    """chmod 0o555 on the parent; root ignores permission bits, so there the parent is a regular
    file instead (an unwritable location even for root)."""
    if is_root():
        parent = tmp_path / "locked"
        parent.write_text("")
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o555)
    dst = parent / "out"
    try:
        assert_clean_error(convert(hf_src, dst), None, names=(str(parent),))
        assert not dst.exists()
        assert not [n for n in os.listdir(tmp_path) if TMP_TAG in n]
        if parent.is_dir():
            assert not os.listdir(parent)
    finally:
        if parent.is_dir():
            parent.chmod(0o755)


# a disk that fills once a few KB are written: writes of tensor data fail as the kernel fails them,
# with an OSError that names no file (the lock file's line and small headers still fit)
FULL_DISK = (
    "import errno, os, sys\n"
    "def full(write, size):\n"
    "    def call(*args):\n"
    "        if size(args) > 4096: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
    "        return write(*args)\n"
    "    return call\n"
    "os.pwrite = full(os.pwrite, lambda a: len(a[1]))\n"
    "os.copy_file_range = full(os.copy_file_range, lambda a: a[2])\n"
    "from ckpt_ir.commands.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("to,workers", [("hf", 1), ("mcore", 1), ("mcore", 2)])
def test_full_disk_names_the_file_and_what_to_do(hf_src, dst, to, workers):
    """It said `ckpt-ir: error: : No space left on device`: the OS names no file for a failed write."""
    argv = [sys.executable, "-c", FULL_DISK, "convert", hf_src, dst, "--to", to, "--workers", workers]
    res = subprocess.run(
        list(map(str, argv)), capture_output=True, text=True, env=_env(), timeout=CLI_TIMEOUT
    )
    msg = assert_clean_error(res, dst, code=1)
    written = "model.safetensors" if to == "hf" else "model_optim_rng.pt"
    tmp = f"{dst.parent}/.{dst.name}{TMP_TAG}"
    assert (
        f": error: {tmp}" in msg
        and f"/{written}: No space left on device; free space or choose another " in msg
    ), msg


def test_file_size_limit_names_the_file(hf_src, dst):
    """A real write error from the kernel (EFBIG under a file-size limit) names the file too."""

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    res = subprocess.run(
        cli_argv("convert", hf_src, dst, "--to", "hf", "--workers", 1),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=CLI_TIMEOUT,
        preexec_fn=limit,
    )
    msg = assert_clean_error(res, dst, code=1)
    assert "/model.safetensors: File too large; the file is larger than" in msg and "ulimit -f" in msg, msg


def test_destination_parents_are_created(hf_src, tmp_path):
    dst = tmp_path / "no" / "such" / "dir" / "out"
    assert_ok(convert(hf_src, dst, "--quiet"))
    assert (dst / "latest_checkpointed_iteration.txt").is_file()
    assert not [n for n in os.listdir(dst.parent) if TMP_TAG in n]


# ---------------------------------------------------------------------------------------------
# 9. pickles never run code


class _Payload:
    """Pickles as a call of ``fn(arg)`` -- what a malicious checkpoint contains."""

    def __init__(self, fn, arg) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def _payload(kind: str, marker: Path) -> _Payload:
    if kind == "os.system":
        return _Payload(os.system, f"touch {marker}")
    if kind == "builtins.exec":
        return _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    if kind == "builtins.eval":
        return _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()")
    if kind == "subprocess.call":
        return _Payload(subprocess.call, ["touch", str(marker)])
    raise AssertionError(kind)


PAYLOADS = ("os.system", "builtins.exec", "builtins.eval", "subprocess.call")


def _assert_payload_inside(path: Path, kind: str) -> None:
    """Sanity: the file really carries the call (so a pass means it was refused, not absent)."""
    with zipfile.ZipFile(path) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    want = {
        "os.system": b"system",
        "builtins.exec": b"exec",
        "builtins.eval": b"eval",
        "subprocess.call": b"call",
    }[kind]  # protocol 2 spells subprocess.call as commands.call
    assert b"\n" + want + b"\n" in pkl


def _hf_bin(src: Path, extra: dict | None = None, top=None) -> Path:
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    sd.update(extra or {})
    f = src / "pytorch_model.bin"
    torch.save(top if top is not None else sd, f)
    return f


def test_plain_pytorch_model_bin_is_accepted(hf_src, dst):
    """Control for the malicious-pickle tests: a clean pytorch_model.bin loads through the safe
    unpickler."""
    _hf_bin(hf_src)
    res = convert(hf_src, dst, "--dry-run")
    assert_ok(res)
    assert "pytorch_model.bin" in res.stdout


@pytest.mark.parametrize(
    "where,kind", [("in_state_dict", k) for k in PAYLOADS] + [("whole_file", "os.system")]
)
def test_malicious_pytorch_model_bin(hf_src, dst, tmp_path, kind, where):
    marker = tmp_path / "pwned"
    evil = _payload(kind, marker)
    f = _hf_bin(
        hf_src,
        extra={"model.layers.0.mlp.evil": evil} if where == "in_state_dict" else None,
        top=evil if where == "whole_file" else None,
    )
    _assert_payload_inside(f, kind)
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("pytorch_model.bin",))
    assert "unpickle" in msg or "refus" in msg, msg
    if kind == "os.system":  # the read-only commands use the same loader
        assert_clean_error(cli("inspect", hf_src), None, names=("pytorch_model.bin",))
        assert_clean_error(cli("diff", hf_src, hf_src), None, code=2, names=("pytorch_model.bin",))
    assert not marker.exists(), "the pickle payload ran"


def _rewrite_rank(path: Path, edit) -> None:
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=False)  # our own fixture file
    edit(obj)
    torch.save(obj, path)


@pytest.mark.parametrize(
    "rank,where,kind",
    [("mp_rank_00_000", "args", k) for k in PAYLOADS]
    + [("mp_rank_01_001", "args", "os.system"), ("mp_rank_01_001", "model", "builtins.exec")],
)
def test_malicious_megatron_rank_file(mcore_src, dst, tmp_path, kind, rank, where):
    marker = tmp_path / "pwned"
    f = mcore_src / MCORE_ITER / rank / "model_optim_rng.pt"

    def edit(obj):
        if where == "args":
            obj["args"] = _payload(kind, marker)
        else:
            obj["model"]["decoder.layers.0.mlp.evil"] = _payload(kind, marker)

    _rewrite_rank(f, edit)
    _assert_payload_inside(f, kind)
    msg = assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=(rank,))
    assert "unpickle" in msg or "refus" in msg, msg
    assert not marker.exists(), "the pickle payload ran"


def test_legacy_non_zip_pickle_is_refused(hf_src, dst, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    from safetensors.torch import load_file

    sd = load_file(str(hf_src / "model.safetensors"))
    (hf_src / "model.safetensors").unlink()
    sd["evil"] = _payload("os.system", marker)
    torch.save(sd, hf_src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_clean_error(convert(hf_src, dst), dst, names=("pytorch_model.bin",))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 10. sources are never modified


@pytest.mark.parametrize("case", ["hf_to_mcore_ok", "hf_to_mcore_fails", "hf_dry_run"])
def test_hf_source_unchanged(hf_src, dst, case):
    before = tree_digest(hf_src)
    if case == "hf_to_mcore_ok":
        assert_ok(convert(hf_src, dst, "--tp", 2, "--pp", 2, "--dtype", "bf16", "--quiet"))
    elif case == "hf_to_mcore_fails":
        assert_clean_error(convert(hf_src, dst, "--tp", 3), dst)
    else:
        assert_ok(convert(hf_src, dst, "--tp", 2, "--dry-run"))
    assert tree_digest(hf_src) == before


@pytest.mark.parametrize("case", ["mcore_to_hf_ok", "mcore_to_hf_fails"])
def test_mcore_source_unchanged(mcore_src, dst, tmp_path, case):
    if case == "mcore_to_hf_fails":
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "config.json").write_text("{broken")
    before = tree_digest(mcore_src)
    if case == "mcore_to_hf_ok":
        assert_ok(convert(mcore_src, dst, "--quiet", to="hf"))
    else:
        assert_clean_error(convert(mcore_src, dst, "--tp", 3, "--hf-config", tmp_path / "cfg"), dst)
    assert tree_digest(mcore_src) == before


def _with_side_files(src: Path) -> Path:
    (src / "README.md").write_text("model card\n")
    (src / "modeling_custom.py").write_text("# remote code\n")
    return src


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["same", "inside", "contains", "same_via_symlink"])
@pytest.mark.parametrize("command", ["convert", "convert-ckpt"])
def test_destination_overlapping_the_source_is_refused(hf_src, tmp_path, where, overwrite, command):
    """DST equal to SRC, inside it or containing it: exit 2 before anything happens, SRC byte-identical
    (the in-place `convert X X --to hf --dtype fp16 --overwrite` once deleted README.md and *.py)."""
    src = _with_side_files(hf_src)
    dst = {"same": src, "inside": src / "out", "contains": tmp_path, "same_via_symlink": tmp_path / "link"}[
        where
    ]
    if where == "same_via_symlink":
        dst.symlink_to(src)
    before = tree_digest(src)
    if command == "convert":
        res = cli(
            "convert", src, dst, "--to", "hf", "--dtype", "fp16", *(["--overwrite"] if overwrite else [])
        )
    else:
        res = cli(
            "convert-ckpt",
            "--load-model-type",
            "hf",
            "--save-model-type",
            "mg",
            "--load-dir",
            src,
            "--save-dir",
            dst,
            *(["--overwrite"] if overwrite else []),
        )
    msg = assert_clean_error(res, None, code=2, names=(str(src),))
    assert "destination" in msg
    assert tree_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["src"] + (["link"] if where == "same_via_symlink" else [])
    )
    assert not list(tmp_path.rglob(f".*{TMP_TAG}*"))


def test_destination_overlapping_other_inputs_is_refused(mcore_src, tiny_hf, tmp_path):
    """--hf-config and --lora-load directories are inputs too."""
    cfg = Path(shutil.copytree(tiny_hf, tmp_path / "cfg"))
    before = tree_digest(cfg)
    msg = assert_clean_error(
        convert(mcore_src, cfg, "--hf-config", cfg, "--overwrite", to="hf"),
        None,
        code=2,
        names=("--hf-config",),
    )
    assert tree_digest(cfg) == before
    msg = assert_clean_error(
        convert(mcore_src, tmp_path / "lora" / "out", "--lora-load", tmp_path / "lora", to="hf"),
        None,
        code=2,
        names=("--lora-load",),
    )
    assert "inside" in msg


# ---------------------------------------------------------------------------------------------
# 11. killed mid-write: nothing at DST, the next run cleans up and succeeds


def _write_big_llama(d: Path) -> None:
    """A ~340 MB fp32 Llama-shaped checkpoint (2 layers, hidden 1024, vocab 32000) from zeros."""
    import torch
    from safetensors.torch import save_file

    h, ffn, vocab, layers = 1024, 2048, 32000, 2
    d.mkdir()
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "dtype": "float32",
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    t = {
        "model.embed_tokens.weight": torch.zeros(vocab, h),
        "lm_head.weight": torch.zeros(vocab, h),
        "model.norm.weight": torch.ones(h),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update(
            {
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
                p + "self_attn.q_proj.weight": torch.zeros(h, h),
                p + "self_attn.k_proj.weight": torch.zeros(h, h),
                p + "self_attn.v_proj.weight": torch.zeros(h, h),
                p + "self_attn.o_proj.weight": torch.zeros(h, h),
                p + "mlp.gate_proj.weight": torch.zeros(ffn, h),
                p + "mlp.up_proj.weight": torch.zeros(ffn, h),
                p + "mlp.down_proj.weight": torch.zeros(h, ffn),
            }
        )
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("big") / "hf_big"
    _write_big_llama(d)
    yield d
    shutil.rmtree(d.parent, ignore_errors=True)  # ~340 MB: do not keep it in pytest's retained temp dirs


def _start(src: Path, dst: Path, flags) -> subprocess.Popen:
    """A conversion in its own session / process group (so Ctrl-C can be sent to all of it)."""
    return subprocess.Popen(
        cli_argv("convert", src, dst, "--to", "mcore", *flags),
        env=_env(),
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        preexec_fn=_limit_memory,
        start_new_session=True,
    )


def _wait_until_writing(proc: subprocess.Popen, dst: Path, need_data: bool) -> None:
    """Return once the hidden temp dir exists (and, with need_data, holds a non-empty file)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            tmps = tmp_siblings(dst)
            if tmps and (
                not need_data
                or any(p.is_file() and p.stat().st_size > 0 for p in (dst.parent / tmps[0]).rglob("*"))
            ):
                break
        except FileNotFoundError:  # renamed into place between listing and stat
            pass
        time.sleep(0.002)
    if proc.poll() is not None:
        _, err = proc.communicate()
        pytest.fail(f"the conversion ended (exit {proc.returncode}) before it could be interrupted:\n{err}")
    assert tmp_siblings(dst), "no temporary directory appeared"


def _live_members(pgid: int) -> list[int]:
    """PIDs of the process group that are still running (zombies excluded)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            out.append(int(d))
    return out


def _wait_group_gone(pgid: int, seconds: float) -> list[int]:
    """Wait up to ``seconds`` for the group to end; returns the survivors (then SIGKILLed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = _live_members(pgid)
        if not alive:
            return []
        time.sleep(0.02)
    alive = _live_members(pgid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return alive


def test_sigkill_mid_write_then_rerun(big_hf, tmp_path):
    dst = tmp_path / "out"
    before = tree_digest(big_hf)
    proc = _start(big_hf, dst, ("--tp", 2))
    try:
        _wait_until_writing(proc, dst, need_data=True)  # the tmp dir holds a partly written file
        assert not dst.exists(), "DST appeared before the conversion finished"
        proc.kill()  # SIGKILL to the ckpt-ir process, as the OOM killer or `kill -9 PID` would
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    orphans = _wait_group_gone(proc.pid, 0.5)  # worker processes must not outlive their parent
    if orphans:  # let the rest of the test run on a quiet directory
        _wait_group_gone(proc.pid, 30)
    assert not dst.exists(), "a killed conversion left a destination directory"
    # only the hidden, PID-tagged temp dir may remain; the next run must sweep it and succeed
    res = convert(big_hf, dst, "--tp", 2, "--quiet")
    assert_ok(res)
    assert (dst / "latest_checkpointed_iteration.txt").is_file()
    assert len(list(dst.rglob("model_optim_rng.pt"))) == 2
    assert not tmp_siblings(dst), f"stale temp dir not swept: {tmp_siblings(dst)}"
    assert tree_digest(big_hf) == before
    shutil.rmtree(dst)
    assert not orphans, (
        f"worker processes {orphans} kept running (and writing into the temp dir) for more "
        f"than 0.5 s after the ckpt-ir process was SIGKILLed"
    )


@pytest.mark.parametrize("how", ["ctrl_c_to_group_with_overwrite", "sigint_to_pid_fresh"])
def test_sigint_mid_write_cleans_up(big_hf, tmp_path, how):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or ``kill -INT PID``:
    exit 130, one line on stderr and no traceback (workers included), no worker left running,
    the temp dir removed; with --overwrite the old DST survives untouched.  Interrupted three
    times (as soon as the temp dir appears, and once data is being written): the races these
    checks catch depend on timing."""
    existing = "overwrite" in how
    for attempt, need_data in enumerate((False, True, False)):
        dst = tmp_path / f"out{attempt}"
        before = _old_checkpoint(dst) if existing else None
        proc = _start(big_hf, dst, ("--tp", 2) + (("--overwrite",) if existing else ()))
        try:
            _wait_until_writing(proc, dst, need_data)
            if how.startswith("ctrl_c"):
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        survivors = _wait_group_gone(proc.pid, 1.0)
        where = f"(attempt {attempt}, interrupted {'while writing' if need_data else 'at start'})"
        assert proc.returncode == 130, f"exit {proc.returncode} {where}\n{err}"
        assert "Traceback" not in err, f"traceback {where}:\n{err}"
        assert "interrupted" in err.strip().splitlines()[-1], err
        assert not survivors, f"worker processes {survivors} outlived the interrupted ckpt-ir {where}"
        assert not tmp_siblings(dst), f"temp dir left behind {where}: {tmp_siblings(dst)}"
        if existing:
            assert tree_digest(dst) == before, f"an interrupted --overwrite damaged the existing DST {where}"
        else:
            assert not dst.exists()


# ---------------------------------------------------------------------------------------------
# 12. fuzzing: corrupt input -> success or CkptIrError, nothing else, no hang

# No shrink phase: a hanging example would cost EXAMPLE_TIMEOUT_S per shrink step.
FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EXAMPLE_TIMEOUT_S = 10  # a tiny conversion takes well under a second
EXAMPLE_MEMORY = 4 << 30  # extra address space one example may take


class Hang(BaseException):
    """Raised by the watchdog; a BaseException so that no `except Exception` can swallow it."""


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def watchdog(seconds: float, memory: int):
    """Fail (instead of hanging or exhausting the machine) when an example runs past ``seconds``
    or grows its address space by more than ``memory`` bytes (that raises MemoryError)."""
    import resource

    def fire(_signum, _frame):
        raise Hang(f"example still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    guard = os.path.exists("/proc/self/statm")
    if guard:
        cap = _address_space() + memory
        hard = old_limit[1]
        resource.setrlimit(
            resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard)
        )
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if guard:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)


def mutations(size: int, hot: list[tuple[int, int]]):
    """Byte flips (biased toward the structural ``hot`` ranges) and an optional truncation."""
    anywhere = st.integers(0, size - 1)
    offset = st.one_of(*[st.integers(a, max(a, b - 1)) for a, b in hot], anywhere)
    flips = st.lists(st.tuples(offset, st.integers(1, 255)), min_size=0, max_size=6)
    cut = st.one_of(st.none(), st.integers(0, size - 1), *[st.integers(a, max(a, b - 1)) for a, b in hot])
    return st.tuples(flips, cut).filter(lambda m: m[0] or m[1] is not None)


def apply_mutation(path: Path, mutation) -> None:
    flips, cut = mutation
    data = bytearray(path.read_bytes())
    for off, x in flips:
        data[off] ^= x
    if cut is not None:
        del data[cut:]
    path.write_bytes(bytes(data))


def convert_in_process(src: Path, dst: Path, target) -> None:
    """load -> derive -> run -> save; only CkptIrError may escape, and a failure leaves no DST."""
    import ckpt_ir.api as ck
    from ckpt_ir.errors import CkptIrError

    try:
        with watchdog(EXAMPLE_TIMEOUT_S, EXAMPLE_MEMORY):
            ckpt = ck.load(str(src))
            out = ck.run(ckpt, ck.derive_pipeline(ckpt, target))
            ck.save(out, str(dst), target)
    except CkptIrError as e:
        event(f"refused: {type(e).__name__}: {' '.join(str(e).split()[1:4])}")
        assert not dst.exists(), "a failed conversion left DST behind"
        assert not tmp_siblings(dst), f"a failed conversion left {tmp_siblings(dst)}"
        return
    except Hang:
        pytest.fail("conversion hung on a corrupt input")
    except Exception:
        pytest.fail(f"corrupt input raised a non-CkptIrError exception:\n{traceback.format_exc()}")
    event("converted")
    assert dst.is_dir()


def _st_layout(path: Path) -> tuple[int, list[tuple[int, int]]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return len(raw), [(0, 8 + n)]


def _pt_layout(path: Path) -> tuple[int, list[tuple[int, int]]]:
    with zipfile.ZipFile(path) as zf:
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
        first_data = next(i.header_offset for i in infos if "/data/" in i.filename)
        start_dir = zf.start_dir
    size = path.stat().st_size
    return size, [(0, first_data), (start_dir, size)]  # local header + data.pkl, central directory


def test_fuzz_safetensors(tiny_hf):
    from ckpt_ir.api import Target

    size, hot = _st_layout(tiny_hf / "model.safetensors")

    @FUZZ
    @given(mutation=mutations(size, hot))
    def check(mutation):
        with tempfile.TemporaryDirectory(prefix="ckpt-ir-fuzz-") as tmp:
            src = Path(shutil.copytree(tiny_hf, Path(tmp) / "src"))
            apply_mutation(src / "model.safetensors", mutation)
            convert_in_process(src, Path(tmp) / "out", Target(to="mcore", tp=2, pp=2))

    check()


def _rewrite_pickle(path: Path, mutation) -> None:
    """Mutate a rank file's data.pkl and re-zip it with correct CRCs, so the corruption reaches the
    unpickler instead of being caught by the zip layer."""
    with zipfile.ZipFile(path) as zf:
        records = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in records:
            if name.endswith("/data.pkl"):
                tmp = path.with_name("data.pkl")
                tmp.write_bytes(data)
                apply_mutation(tmp, mutation)
                data = tmp.read_bytes()
                tmp.unlink()
            zf.writestr(name, data)


def test_fuzz_megatron_pickle(tiny_mcore):
    from ckpt_ir.api import Target

    sizes = {}
    for r in RANKS:
        with zipfile.ZipFile(tiny_mcore / MCORE_ITER / r / "model_optim_rng.pt") as zf:
            sizes[r] = next(i.file_size for i in zf.infolist() if i.filename.endswith("/data.pkl"))

    @st.composite
    def rank_and_mutation(draw):
        rank = draw(st.sampled_from(RANKS))
        return rank, draw(mutations(sizes[rank], [(0, sizes[rank])]))

    @FUZZ
    @given(case=rank_and_mutation())
    def check(case):
        rank, mutation = case
        with tempfile.TemporaryDirectory(prefix="ckpt-ir-fuzz-") as tmp:
            src = Path(shutil.copytree(tiny_mcore, Path(tmp) / "src"))
            _rewrite_pickle(src / MCORE_ITER / rank / "model_optim_rng.pt", mutation)
            convert_in_process(src, Path(tmp) / "out", Target(to="hf"))

    check()


def test_fuzz_megatron_rank_file(tiny_mcore):
    from ckpt_ir.api import Target

    layouts = {r: _pt_layout(tiny_mcore / MCORE_ITER / r / "model_optim_rng.pt") for r in RANKS}

    @st.composite
    def rank_and_mutation(draw):
        rank = draw(st.sampled_from(RANKS))
        return rank, draw(mutations(*layouts[rank]))

    @FUZZ
    @given(case=rank_and_mutation())
    def check(case):
        rank, mutation = case
        with tempfile.TemporaryDirectory(prefix="ckpt-ir-fuzz-") as tmp:
            src = Path(shutil.copytree(tiny_mcore, Path(tmp) / "src"))
            apply_mutation(src / MCORE_ITER / rank / "model_optim_rng.pt", mutation)
            convert_in_process(src, Path(tmp) / "out", Target(to="hf"))

    check()


# semantic fuzzing: well-formed files whose *values* are wrong

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.sampled_from([2**31, 10**15, 10**12 + 0.5]),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(-2, 9), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "rms_norm_eps",
    "dtype",
    "model_type",
    "architectures",
    "attention_bias",
    "rope_theta",
)
ARGS_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "num_layer_list",
    "num_layers_per_virtual_pipeline_stage",
    "noop_layers",
    "ckpt_ir_hf_config",
    "ckpt_ir_family",
    "model_type_hf",
    "num_layers",
    "hidden_size",
    "padded_vocab_size",
)


def test_fuzz_hf_config_values(tiny_hf):
    from ckpt_ir.api import Target

    base = json.loads((tiny_hf / "config.json").read_text())

    @FUZZ
    @given(edits=st.dictionaries(st.sampled_from(CONFIG_KEYS), JUNK, min_size=1, max_size=3))
    def check(edits):
        with tempfile.TemporaryDirectory(prefix="ckpt-ir-fuzz-") as tmp:
            src = Path(shutil.copytree(tiny_hf, Path(tmp) / "src"))
            (src / "config.json").write_text(json.dumps({**base, **edits}))
            convert_in_process(src, Path(tmp) / "out", Target(to="mcore", tp=2))

    check()


def test_fuzz_megatron_args_values(tiny_mcore):
    import torch

    from ckpt_ir.api import Target

    first = tiny_mcore / MCORE_ITER / RANKS[0] / "model_optim_rng.pt"
    obj = torch.load(first, map_location="cpu", weights_only=False)

    @FUZZ
    @given(edits=st.dictionaries(st.sampled_from(ARGS_KEYS), JUNK, min_size=1, max_size=3))
    def check(edits):
        import argparse

        with tempfile.TemporaryDirectory(prefix="ckpt-ir-fuzz-") as tmp:
            src = Path(shutil.copytree(tiny_mcore, Path(tmp) / "src"))
            args = argparse.Namespace(**{**vars(obj["args"]), **edits})
            torch.save({**obj, "args": args}, src / MCORE_ITER / RANKS[0] / "model_optim_rng.pt")
            convert_in_process(src, Path(tmp) / "out", Target(to="hf"))

    check()


# ---------------------------------------------------------------------------------------------
# 13. replicated tensors are compared across rank files


def _drift_norm(mcore_src: Path, rank: str = "mp_rank_01_000") -> Path:
    import torch

    f = mcore_src / MCORE_ITER / rank / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    obj["model"]["decoder.layers.0.input_layernorm.weight"] += 0.02  # what real runs drift by
    torch.save(obj, f)
    return f


def test_drifted_replica_is_refused_naming_tensor_and_ranks(mcore_src, dst):
    _drift_norm(mcore_src)
    msg = assert_clean_error(
        convert(mcore_src, dst, to="hf"),
        dst,
        names=("layers.0.attn_norm.weight", "mp_rank_00_000", "mp_rank_01_000", "--replicas take-rank0"),
    )
    assert "differs" in msg
    assert_clean_error(cli("inspect", mcore_src), None, names=("layers.0.attn_norm.weight",))


def test_take_rank0_keeps_the_first_copy_and_notes_it(mcore_src, dst):
    import torch
    from safetensors.torch import load_file

    _drift_norm(mcore_src)
    res = convert(mcore_src, dst, "--replicas", "take-rank0", to="hf")
    assert_ok(res)
    assert "note: replicated tensors" in res.stderr
    assert "--replicas take-rank0" in (dst / "ckpt-ir-notes.txt").read_text()
    rank0 = torch.load(mcore_src / MCORE_ITER / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)
    assert torch.equal(
        load_file(str(dst / "model.safetensors"))["model.layers.0.input_layernorm.weight"],
        rank0["model"]["decoder.layers.0.input_layernorm.weight"],
    )


def test_large_replicas_are_compared_with_check_all(mcore_src, monkeypatch):
    import ckpt_ir.api as ck
    from ckpt_ir.errors import FormatError
    from ckpt_ir.frontends import mcore

    _drift_norm(mcore_src)
    monkeypatch.setattr(mcore, "REPLICA_CHECK_BYTES", 0)  # every replica counts as large
    ck.load(str(mcore_src))  # the default compares only small ones
    with pytest.raises(FormatError, match="layers.0.attn_norm.weight"):
        ck.load(str(mcore_src), replicas="check-all")


# ---------------------------------------------------------------------------------------------
# 14. papercuts: a single weight file as SRC, memory-budget units, diff --hf-config


def test_single_safetensors_file_as_source(hf_src, tmp_path):
    one = tmp_path / "from_file"
    assert_ok(convert(hf_src / "model.safetensors", one, "--tp", 2, "--quiet"))
    whole = tmp_path / "from_dir"
    assert_ok(convert(hf_src, whole, "--tp", 2, "--quiet"))
    assert tree_digest(one) == tree_digest(whole)
    assert_ok(cli("inspect", hf_src / "model.safetensors"))


def test_memory_budget_error_has_sensible_units(hf_src, dst):
    msg = assert_clean_error(convert(hf_src, dst, "--max-memory", "1KB"), dst)
    assert "budget is 1 KB" in msg and " 0 MB" not in msg
    assert "needs about 32.8 KB" in msg  # the embedding: 128 x 64 float32 = 32768 bytes


def test_diff_takes_hf_config_for_plain_megatron_args(mcore_src, tiny_hf):
    hf_src = tiny_hf  # read only
    for rank in RANKS:

        def strip(obj):
            for k in [
                k
                for k in vars(obj["args"])
                if k.startswith("ckpt_ir_") or k in ("model_type_hf", "model_type", "architectures")
            ]:
                delattr(obj["args"], k)

        _rewrite_rank(mcore_src / MCORE_ITER / rank / "model_optim_rng.pt", strip)
    res = cli("diff", mcore_src, hf_src)  # the family is inferred from the plain args
    assert res.returncode == 0 and "inferred family llama" in res.stderr, res.stdout + res.stderr
    res = cli("diff", mcore_src, hf_src, "--hf-config", hf_src)
    assert res.returncode == 0 and "identical" in res.stdout, res.stdout + res.stderr
