"""What ckpt-ir says: every flag a message names exists, and reports name what they describe."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ckpt_ir"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w-])")
# flags of Megatron-LM's training script that messages tell a user to pass to it (not ckpt-ir's)
MEGATRON_LM_FLAGS = {
    "--no-load-rng",
    "--dist-ckpt-optim-fully-reshardable",
    "--overlap-grad-reduce",
    "--overlap-param-gather-with-optimizer-step",
    "--use-megatron-fsdp",
    "--use-torch-fsdp2",
}


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its subcommands."""
    flags: set[str] = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= parser_flags(sub)
    return flags


def named_flags() -> dict[str, list[str]]:
    """``--flag`` -> where in ckpt_ir/ a string literal (a message, a help text) names it."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    found.setdefault(flag, []).append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def option_flags() -> dict[str, list[str]]:
    """``--flag`` -> where in ckpt_ir/ a message names a setting through ``setting("name", ...)``,
    as the command line words it."""
    from ckpt_ir.errors import command_line, setting

    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setting"):
                continue
            name = node.args[0]
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                continue  # a computed name: its flag is a literal of errors.FLAGS, scanned above
            negated = (
                len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value is False
            )
            with command_line():
                flag = setting(name.value, False) if negated else setting(name.value)
            found.setdefault(flag, []).append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_every_flag_a_message_names_exists():
    from ckpt_ir.commands.cli import build_parser

    known = parser_flags(build_parser()) | MEGATRON_LM_FLAGS
    named = {**named_flags(), **option_flags()}
    unknown = {flag: where for flag, where in named.items() if flag not in known}
    assert not unknown, f"messages name flags no command has: {unknown}"
    # the scans see the messages: a literal flag, a setting named through setting()
    assert "--dist-ckpt-optim-fully-reshardable" in named_flags()
    assert {"--moe-grouped-gemm", "--no-optimizer", "--overwrite"} <= set(option_flags())


def test_dry_run_names_each_tensor_under_the_key_its_rank_file_holds(hf_cache, tmp_path):
    """A rank file holds its model under ``model`` (``model0``, ``model1``... only with a virtual
    pipeline): ``--dry-run`` (and ``plan``) name each tensor ``<that key>/<Megatron key>``."""
    import torch

    from tests.cli_contract import cli
    from tests.test_plan import dry_run_files

    src = hf_cache("llama", layers=4)
    for flags, keys, files in (
        (["--tp", "2", "--pp", "2"], ["model"], 4),
        (["--pp", "2", "--vpp-layers", "1"], ["model0", "model1"], 2),
    ):
        out = tmp_path / "-".join(flags)
        planned = dry_run_files(src, out, "--to", "mcore", *flags)
        assert cli("convert", src, out, "--to", "mcore", *flags).returncode == 0
        rank_files = [path for path, (kind, _, _) in planned.items() if kind == "torch"]
        assert len(rank_files) == files
        for path in rank_files:
            obj = torch.load(out / path, weights_only=False)
            assert [k for k in obj if k.startswith("model")] == keys
            held = [f"{k}/{name}" for k in keys for name, v in obj[k].items() if isinstance(v, torch.Tensor)]
            assert [t[0] for t in planned[path][2]] == held, path


def test_plan_describes_the_layout_of_the_output(hf_cache):
    from tests.cli_contract import cli

    src = hf_cache("llama", layers=4)
    r = cli("plan", "--hf-config", src, "--to", "mcore", "--tp", "2", "--disk-gbps", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == [
        "pipeline: fuse-qkv,fuse-gate-up,shard{tp=2}",
        "layout: mcore tp=2 pp=1 qkv=fused gate_up=fused norms=local",
    ]
    r = cli("plan", "--hf-config", src, "--to", "hf", "--disk-gbps", "1")
    assert r.stdout.splitlines()[:2] == [
        "pipeline: (no passes)",
        "layout: hf tp=1 pp=1 qkv=split gate_up=split",
    ]


def test_pipeline_line_says_when_no_pass_runs_and_what_the_writer_quantizes(hf_cache, tmp_path):
    """``--quantize fp8`` is done by the HF writer, not by a pass: the ``pipeline:`` line of
    ``plan``, ``--dry-run`` and ``convert`` says so instead of printing nothing."""
    from tests.cli_contract import cli

    src = hf_cache("llama", layers=2)
    quantized = "pipeline: (no passes); then the writer quantizes to fp8 (16x16 blocks, ue8m0 scales)"
    flags = ["--to", "hf", "--quantize", "fp8", "--quant-block-size", "16", "--quant-scale-fmt", "ue8m0"]
    r = cli("plan", "--hf-config", src, *flags, "--disk-gbps", "1")
    assert r.stdout.splitlines()[0] == quantized, r.stderr
    r = cli("convert", src, tmp_path / "q", *flags, "--dry-run")
    assert r.stdout.splitlines()[0] == quantized, r.stderr
    r = cli("convert", src, tmp_path / "q", *flags)
    assert r.returncode == 0 and r.stderr.splitlines()[0] == quantized, r.stderr
    r = cli("convert", src, tmp_path / "q16", *flags, "--dtype", "bf16", "--dry-run")
    assert r.stdout.splitlines()[0] == quantized.replace(
        "(no passes)", "cast{dtype=bf16 keep-fp32=transformers}"
    )
    r = cli("convert", src, tmp_path / "h", "--to", "hf")
    assert r.returncode == 0 and r.stderr.splitlines()[0] == "pipeline: (no passes)", r.stderr


def test_a_config_that_does_not_describe_the_checkpoint_says_so(hf_cache, tmp_path):
    """``--hf-config`` of another model for a Megatron checkpoint: one line naming the config and
    the first disagreement (a tensor the config's model needs, one it has no place for, a shape),
    not "the checkpoint is incomplete" nor a hint to drop tensors; from the API as well."""
    import json
    import shutil

    import pytest

    import ckpt_ir.api as ck
    from ckpt_ir.errors import FormatError
    from tests.cli_contract import assert_clean_error, cli

    llama, qwen2 = hf_cache("llama", layers=2), hf_cache("qwen2", layers=2)
    wide = tmp_path / "llama-ffn96"
    wide.mkdir()
    cfg = json.loads((Path(llama) / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    sources = {}
    for name, hf, flags in (
        ("llama-mc", llama, ["--tp", "2"]),
        ("qwen2-mc", qwen2, ["--tp", "2"]),
        ("llama-dist", llama, ["--ckpt-format", "torch_dist"]),
    ):
        sources[name] = tmp_path / name
        assert cli("convert", hf, sources[name], "--to", "mcore", *flags).returncode == 0
    model = "a {} model as the config describes it"
    cases = [
        (
            "llama-mc",
            qwen2,
            f"{model.format('qwen2')} has layers.0.attn.qkv.bias (+1 more), which the checkpoint lacks",
        ),
        (
            "llama-dist",
            qwen2,
            f"{model.format('qwen2')} has layers.0.attn.qkv.bias (+1 more), which the checkpoint lacks",
        ),
        (
            "qwen2-mc",
            llama,
            f"the checkpoint holds layers.0.attn.qkv.bias (+1 more), which {model.format('llama')} has no place for",
        ),
        (
            "llama-mc",
            wide,
            f"layers.0.mlp.gate_up.weight is [256, 64] in the checkpoint but [192, 64] in {model.format('llama')}",
        ),
    ]
    for source, config, what in cases:
        src, out = sources[source], tmp_path / "out"
        msg = assert_clean_error(cli("convert", src, out, "--to", "hf", "--hf-config", config), out)
        assert msg == (
            f"ckpt-ir: error: {config}/config.json: this config does not describe the checkpoint {src}: "
            f"{what}; pass the config of the model the checkpoint holds"
        )
        for flags in (["inspect", src], ["diff", src, llama]):
            assert cli(*flags, "--hf-config", config).stderr == msg + "\n"
    with pytest.raises(
        FormatError, match=r"^the given HF config: this config does not describe the checkpoint"
    ):
        ck.load(str(sources["llama-mc"]), hf_config=json.loads((Path(qwen2) / "config.json").read_text()))
    shutil.rmtree(sources["qwen2-mc"])
    assert (
        cli("convert", sources["llama-mc"], tmp_path / "ok", "--to", "hf", "--hf-config", llama).returncode
        == 0
    )
