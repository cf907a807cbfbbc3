"""The CLI contract: convert/inspect/diff/passes/models/convert-ckpt, dumps and dry runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_server import run_cli
from tests.test_hf_roundtrip import assert_same_tensors


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = run_cli(list(args), timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"ckpt-ir {' '.join(args)} exited {r.returncode}\n{r.stderr}")
    return r


def test_help_and_listings():
    assert "convert" in cli("--help").stdout
    out = cli("passes").stdout
    for name in (
        "cast",
        "select-layers",
        "fuse-qkv",
        "unfuse-qkv",
        "fuse-gate-up",
        "unfuse-gate-up",
        "shard",
        "gather",
        "insert-noop-layers",
        "remove-noop-layers",
        "pad-vocab",
        "unpad-vocab",
    ):
        assert f"\n{name}\n" in "\n" + out, name
    assert "requires:" in out and "guarantees:" in out
    models = cli("models").stdout
    for fam in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
        assert fam in models


def test_convert_prints_every_pass_with_print_ir_after_all(hf_cache, tmp_path):
    src = hf_cache("qwen2")
    r = cli(
        "convert", src, str(tmp_path / "o"), "--to", "mcore", "--tp", "2", "--pp", "2", "--print-ir-after-all"
    )
    for p in ("fuse-qkv", "fuse-gate-up", "shard{tp=2 pp=2}"):
        assert f"// ----- IR after {p} -----" in r.stdout
    assert "layers.0.attn.qkv.weight" in r.stdout and "tp2:column" in r.stdout


def test_print_before_after_and_dump_ir(hf_cache, tmp_path):
    src = hf_cache("llama")
    dump = tmp_path / "dump"
    r = cli(
        "convert",
        src,
        str(tmp_path / "o"),
        "--to",
        "mcore",
        "--tp",
        "2",
        "--print-ir-before",
        "fuse-qkv",
        "--print-ir-after",
        "shard",
        "--dump-ir",
        str(dump),
        "--pass-stats",
    )
    assert "IR before fuse-qkv" in r.stdout and "IR after shard{tp=2}" in r.stdout
    assert "IR after fuse-qkv" not in r.stdout
    assert sorted(os.listdir(dump)) == [
        "00-input.txt",
        "01-fuse-qkv.txt",
        "02-fuse-gate-up.txt",
        "03-shard.txt",
    ]
    assert "tensors" in r.stdout and "ms" in r.stdout  # the stats table


def test_dump_ir_follows_the_output_rules(hf_cache, tmp_path):
    """--dump-ir DIR: an existing file or non-empty DIR is refused (exit 2, one line naming it,
    untouched) unless --overwrite, which replaces only a previous dump; the files appear as a whole."""
    src = hf_cache("llama")
    dump = tmp_path / "dump"

    def convert(*extra: str) -> subprocess.CompletedProcess:
        return cli(
            "convert",
            src,
            str(tmp_path / "o"),
            "--to",
            "hf",
            "--dry-run",
            "--dump-ir",
            str(dump),
            *extra,
            check=False,
        )

    dump.write_text("mine\n")  # a file in the way
    r = convert()
    assert (
        r.returncode == 2
        and r.stderr.count("\n") == 1
        and f"{dump}: exists and is not a directory" in r.stderr
    )
    assert dump.read_text() == "mine\n"
    dump.unlink()
    dump.mkdir()
    (dump / "07-stale.txt").write_text("old dump\n")
    r = convert()
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"{dump}: destination exists and is not empty; pass --overwrite" in r.stderr
    assert os.listdir(dump) == ["07-stale.txt"]
    assert convert("--overwrite").returncode == 0
    assert os.listdir(dump) == ["00-input.txt"]  # --to hf from hf: no passes; the stale file is gone
    assert open(dump / "00-input.txt").read().startswith(f"// source: {src}")
    (dump / "notes.txt").write_text("mine\n")
    r = convert("--overwrite")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"{dump / 'notes.txt'}: not part of an IR dump" in r.stderr
    assert sorted(os.listdir(dump)) == ["00-input.txt", "notes.txt"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no lock or temporary left


def test_pipeline_flag_replaces_the_derived_one(hf_cache, tmp_path):
    src = hf_cache("llama")
    dst = tmp_path / "o"
    cli("convert", src, str(dst), "--to", "hf", "--pipeline", "select-layers{keep=0,-1},cast{dtype=bf16}")
    cfg = json.load(open(dst / "config.json"))
    assert cfg["num_hidden_layers"] == 2 and cfg["dtype"] == "bfloat16"
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(str(dst / "model.safetensors"))
    assert torch.equal(
        b["model.layers.1.mlp.down_proj.weight"], a["model.layers.3.mlp.down_proj.weight"].bfloat16()
    )
    assert "model.layers.2.mlp.down_proj.weight" not in b
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(dst))  # transformers accepts the smaller model


def test_print_pipeline_can_be_pasted_back(hf_cache, tmp_path):
    src = hf_cache("llama")
    flags = ("--to", "mcore", "--tp", "2", "--noop-layers", "4", "--pp", "5")
    r = cli("convert", src, str(tmp_path / "a"), *flags, "--print-pipeline")
    text = r.stdout.strip()
    assert text == "fuse-qkv,fuse-gate-up,insert-noop-layers{layers=4},shard{tp=2 pp=5}"
    assert not (tmp_path / "a").exists()  # --print-pipeline prints and exits
    cli("convert", src, str(tmp_path / "a"), *flags)
    cli("convert", src, str(tmp_path / "b"), "--to", "mcore", "--pipeline", text)
    assert cli("diff", str(tmp_path / "a"), str(tmp_path / "b")).returncode == 0


def test_dry_run_shows_the_plan_and_writes_nothing(hf_cache, tmp_path):
    src = hf_cache("llama")
    dst = tmp_path / "o"
    out = cli("convert", src, str(dst), "--to", "mcore", "--tp", "2", "--dry-run").stdout
    assert not dst.exists()
    assert "iter_0000001/mp_rank_01/model_optim_rng.pt" in out
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in out and "model.safetensors:" in out
    assert "bytes to write" in out and "estimated peak memory" in out


def test_inspect_formats(hf_cache, tmp_path):
    src = hf_cache("qwen3")
    text = cli("inspect", src).stdout
    assert "layers.0.attn.q_norm.weight" in text and "// layout: hf tp=1" in text
    doc = json.loads(cli("inspect", src, "--format", "json").stdout)
    assert doc["spec"]["family"] == "qwen3" and any(t["name"] == "embed.weight" for t in doc["tensors"])
    dot = cli("inspect", src, "--format", "dot").stdout
    assert dot.startswith("digraph") and "->" in dot
    mc = str(tmp_path / "mc")
    cli("convert", src, mc, "--to", "mcore", "--tp", "2", "--pp", "2")
    doc = json.loads(cli("inspect", mc, "--format", "json").stdout)
    assert doc["layout"]["tp"] == 2 and doc["layout"]["pp"] == 2


def test_diff_finds_one_changed_element_across_formats(hf_cache, tmp_path):
    src = hf_cache("llama")
    mc = str(tmp_path / "mc")
    cli("convert", src, mc, "--to", "mcore", "--tp", "2", "--pp", "2")
    assert cli("diff", src, mc).returncode == 0
    changed = str(tmp_path / "changed")
    cli("convert", src, changed, "--to", "hf")
    sd = load_file(os.path.join(changed, "model.safetensors"))
    sd["model.layers.2.mlp.up_proj.weight"][5, 7] += 0.25
    save_file(sd, os.path.join(changed, "model.safetensors"), metadata={"format": "pt"})
    r = cli("diff", mc, changed, check=False)
    assert r.returncode == 1
    assert "layers.2.mlp.up.weight" in r.stdout and "1 element(s) differ" in r.stdout and "[5, 7]" in r.stdout
    doc = json.loads(cli("diff", mc, changed, "--json", check=False).stdout)
    assert doc["identical"] is False and [d["name"] for d in doc["different"]] == ["layers.2.mlp.up.weight"]
    assert abs(doc["different"][0]["max_abs_diff"] - 0.25) < 1e-6


def test_diff_exits_2_when_it_cannot_compare(hf_cache, tmp_path):
    """0 identical, 1 different (above), 2 could not compare: a missing or corrupt side."""
    src = hf_cache("llama")
    missing = str(tmp_path / "missing")
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    for other, says in ((missing, f"{missing}: no such file or directory"), (truncated, "truncated")):
        r = cli("diff", src, str(other), check=False)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert r.stderr.startswith("ckpt-ir: error: ") and says in r.stderr and r.stderr.count("\n") == 1
    assert "2 if they could not be compared" in cli("diff", "--help").stdout.replace("\n", " ")


def test_overwrite_replaces_existing_output(hf_cache, tmp_path):
    src = hf_cache("llama")
    dst = tmp_path / "o"
    cli("convert", src, str(dst), "--to", "hf")
    cli("convert", src, str(dst), "--to", "mcore", "--overwrite")
    assert (
        not (dst / "config.json").exists() and (dst / "latest_checkpointed_iteration.txt").read_text() == "1"
    )


def _demo(*args: str, tmpdir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": tmpdir}
    return subprocess.run(
        [sys.executable, "-m", "ckpt_ir", "demo", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_demo_removes_its_temporary_directory(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = _demo(tmpdir=str(tmp))
    assert r.returncode == 0 and "demo: OK" in r.stdout, r.stdout + r.stderr
    root = r.stdout.splitlines()[0].split(" in ", 1)[1].split(" (")[0]
    assert os.path.dirname(root) == str(tmp), r.stdout
    assert not os.path.exists(root) and not [n for n in os.listdir(tmp) if n.startswith("ckpt-ir")]


def test_demo_in_a_directory_replaces_only_its_own_checkpoints(tmp_path):
    """Run twice in DIR: the second run replaces the first one's three checkpoints and keeps the
    user's own file in DIR."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine\n")
    for _ in range(2):
        r = _demo(str(work), tmpdir=str(tmp_path))
        assert r.returncode == 0 and "demo: OK" in r.stdout, r.stdout + r.stderr
    assert sorted(os.listdir(work)) == ["hf", "hf-roundtrip", "mcore-tp2-pp2", "notes.txt"]
    assert (work / "notes.txt").read_text() == "mine\n"


def test_mindspeed_drop_in_flags(hf_cache, tmp_path):
    src = hf_cache("qwen2", layers=4)
    ms = tmp_path / "ms"
    cli(
        "convert-ckpt",
        "--use-mcore-models",
        "--model-type",
        "GPT",
        "--load-model-type",
        "hf",
        "--save-model-type",
        "mg",
        "--target-tensor-parallel-size",
        "2",
        "--target-pipeline-parallel-size",
        "2",
        "--num-layer-list",
        "1,3",
        "--model-type-hf",
        "qwen25",
        "--load-dir",
        src,
        "--save-dir",
        str(ms),
        "--tokenizer-model",
        src,
    )
    ours = tmp_path / "ours"
    cli("convert", src, str(ours), "--to", "mcore", "--tp", "2", "--pp", "2", "--num-layer-list", "1,3")
    for rank in ("mp_rank_00_000", "mp_rank_01_001"):
        a = torch.load(ms / "iter_0000001" / rank / "model_optim_rng.pt", weights_only=False)["model"]
        b = torch.load(ours / "iter_0000001" / rank / "model_optim_rng.pt", weights_only=False)["model"]
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # back to HF, into an HF model directory as the v1 tool did: output lands in <save-dir>/mg2hf
    hf_dir = tmp_path / "hfdir"
    os.makedirs(hf_dir)
    (hf_dir / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    cli(
        "convert-ckpt",
        "--load-model-type",
        "mg",
        "--save-model-type",
        "hf",
        "--model-type-hf",
        "qwen25",
        "--load-dir",
        str(ms),
        "--save-dir",
        str(hf_dir),
    )
    assert_same_tensors(src, str(hf_dir / "mg2hf"))
    r = cli(
        "convert-ckpt",
        "--load-dir",
        src,
        "--save-dir",
        str(tmp_path / "x"),
        "--model-type-hf",
        "llama2",
        check=False,
    )
    assert r.returncode == 2 and "is a qwen2 checkpoint" in r.stderr
    # MindSpeed-LLM reads no model_type from config.json: --model-type-hf names the family then
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(model_type="my-qwen", architectures=["X"])
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    cli("convert-ckpt", "--load-dir", src, "--save-dir", str(tmp_path / "y"), "--model-type-hf", "qwen25")
    assert cli("diff", str(ms), str(tmp_path / "y")).returncode == 0  # same weights, another layout
    r = cli("convert", src, str(tmp_path / "z"), "--to", "mcore", check=False)
    assert r.returncode == 1 and "unsupported architecture" in r.stderr


def test_mindspeed_flags_that_change_the_output_are_honoured_or_refused(hf_cache, tmp_path):
    """MindSpeed-LLM's v1 converter writes torch_dist with --ckpt-format torch_dist (Megatron's
    save_checkpoint after validate_args sets use_dist_ckpt); convert-ckpt writes the same format
    convert does, not torch rank files.  Flags that would change the output and are not done here
    (zarr, DualPipeV placement, a layout torch_dist does not have) are usage errors."""
    src = hf_cache("qwen2", layers=4)
    ms, ours = tmp_path / "ms", tmp_path / "ours"
    cli("convert-ckpt", "--load-dir", src, "--save-dir", str(ms), "--ckpt-format", "torch_dist")
    cli("convert", src, str(ours), "--to", "mcore", "--ckpt-format", "torch_dist")
    files = sorted(os.listdir(ms / "iter_0000001"))
    assert ".metadata" in files and any(f.endswith(".distcp") for f in files)
    assert not [f for f in files if f.startswith("mp_rank_")]
    for f in files:
        assert (ms / "iter_0000001" / f).read_bytes() == (ours / "iter_0000001" / f).read_bytes(), f
    for flags, says in (
        (("--ckpt-format", "zarr"), "--ckpt-format zarr: ckpt-ir does not write"),
        (("--schedules-method", "dualpipev"), "--schedules-method: DualPipeV"),
        (
            ("--ckpt-format", "torch_dist", "--target-tensor-parallel-size", "2"),
            "leave out --target-tensor-parallel-size",
        ),
    ):
        r = cli("convert-ckpt", "--load-dir", src, "--save-dir", str(tmp_path / "x"), *flags, check=False)
        assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1, (flags, r.stderr)
        assert not (tmp_path / "x").exists()


def test_plugin_pass_from_the_cli(hf_cache, tmp_path, monkeypatch):
    plugin_dir = tmp_path / "plug"
    plugin_dir.mkdir()
    (plugin_dir / "my_passes.py").write_text(
        "from ckpt_ir.passes import Pass, register_pass\n"
        "@register_pass\n"
        "class DropFirstLayerNormScale(Pass):\n"
        "    name = 'noop-marker'\n"
        "    summary = 'returns the checkpoint unchanged'\n"
        "    def run(self, ckpt):\n"
        "        return ckpt\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{plugin_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    src = hf_cache("llama")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckpt_ir",
            "convert",
            src,
            str(tmp_path / "o"),
            "--to",
            "hf",
            "--plugin",
            "my_passes",
            "--pipeline",
            "noop-marker",
            "--print-ir-after-all",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "IR after noop-marker" in r.stdout
    r = cli("convert", src, str(tmp_path / "p"), "--to", "hf", "--plugin", "no_such_module_xyz", check=False)
    assert r.returncode == 2 and "cannot import" in r.stderr


# each command with its required arguments (the paths need not exist: --plugin is imported first)
EVERY_COMMAND = [
    ["convert", "a", "b", "--to", "hf"],
    ["inspect", "a"],
    ["diff", "a", "b"],
    ["verify", "a", "b"],
    ["plan", "--hf-config", "a", "--to", "mcore"],
    ["passes"],
    ["models"],
    ["demo"],
    ["convert-ckpt", "--load-dir", "a", "--save-dir", "b"],
    ["mm-convert", "Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", "b"],
]


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda c: c[0])
def test_every_command_takes_plugin(command):
    r = cli(*command, "--plugin", "no_such_module_xyz", check=False)
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("ckpt-ir: error: --plugin no_such_module_xyz: cannot import it")
    ), r.stderr


def test_every_command_is_in_the_plugin_test():
    from ckpt_ir.commands.cli import COMMANDS

    assert sorted(c[0] for c in EVERY_COMMAND) == sorted(COMMANDS)


def test_the_command_leaves_without_teardown_once_torch_is_loaded_keeping_exit_code_and_output():
    """``ckpt-ir`` (cli.run) skips the interpreter's teardown after torch was imported: the exit
    code and everything printed must survive, and teardown must really be skipped (an atexit
    hook does not run, nor does a finaliser).  After loading torch's library for a LoRA merge
    without torch (ir/sgemm.py) the atexit hooks run but the slow rest of teardown is skipped;
    with neither it exits normally (both run)."""
    script = (
        "import atexit, sys\n"
        "if sys.argv[1] == 'torch':\n"
        "    import torch\n"
        "if sys.argv[1] == 'mkl':\n"
        "    from ckpt_ir.ir import sgemm\n"
        "    assert sgemm.library() is not None\n"
        "from ckpt_ir.commands import cli\n"
        "class Finalised:\n"
        "    def __del__(self):\n"
        "        print('finalised', file=sys.stderr)\n"
        "kept = Finalised()\n"
        "atexit.register(lambda: print('teardown', file=sys.stderr))\n"
        "cli.main = lambda: (print('x' * 100000), print('done', file=sys.stderr), 3)[-1]\n"
        "cli.run()\n"
    )
    for mode, hooks, finalised in (("torch", False, False), ("mkl", True, False), ("plain", True, True)):
        r = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=300)
        assert r.returncode == 3, (mode, r.stderr)
        assert r.stdout == "x" * 100000 + "\n", mode
        lines = r.stderr.splitlines()
        assert lines[0] == "done" and ("teardown" in lines) == hooks, (mode, r.stderr)
        assert ("finalised" in lines) == finalised, (mode, r.stderr)
