"""The Python API as a caller meets it: short reprs, errors worded for Python, docstrings that
hold, and the API reference generated from them."""

from __future__ import annotations

import ckpt_ir.api as ck


def test_public_objects_have_short_reprs(hf_cache, tmp_path):
    """A Conversion printed in a notebook is one line, not its whole plan (tens of KB)."""
    src = ck.load(hf_cache("llama", layers=4))
    target = ck.Target(to="mcore", tp=2, dtype="bf16")
    assert repr(target) == "Target(to='mcore', dtype='bf16', tp=2)"
    assert eval(repr(target), {"Target": ck.Target}) == target
    dry = ck.convert(src, str(tmp_path / "dry"), target, dry_run=True)
    plan = dry.plan
    assert (
        repr(dry.pipeline)
        == "<Pipeline cast{dtype=bf16 keep-fp32=megatron},fuse-qkv,fuse-gate-up,shard{tp=2}>"
    )
    assert repr(plan) == f"<Plan 5 files, {plan.nbytes} bytes to write>"
    assert repr(plan.files[0]) == (
        f"<OutputFile iter_0000001/mp_rank_00/model_optim_rng.pt (torch): 27 tensors, {plan.files[0].nbytes} bytes>"
    )
    assert repr(dry) == (
        "<Conversion pipeline=cast{dtype=bf16 keep-fp32=megatron},fuse-qkv,fuse-gate-up,shard{tp=2} "
        # the HF model resharded for Megatron (TP=2, fused) is of mcore kind, lifted from hf
        f"output=<Checkpoint llama mcore tp=2 pp=1 qkv=fused gate_up=fused norms=local (from hf): 27 tensors, "
        f"{dry.output.nbytes} bytes> "
        f"plan={plan!r} stats=None>"
    )
    done = ck.convert(src, str(tmp_path / "out"), ck.Target(to="hf"))
    assert repr(done).startswith("<Conversion pipeline=(no passes) output=<Checkpoint llama hf tp=1")
    assert repr(done).endswith(f"stats={done.stats!r}>") and len(repr(done)) < 400
    assert repr(ck.Pipeline()) == "<Pipeline (no passes)>"


def test_errors_name_settings_as_the_caller_gives_them(hf_cache, tmp_path):
    """One message, two wordings: a Python caller reads the keyword it passes (``overwrite=True``),
    the command line the flag (``--overwrite``)."""
    import pytest

    from ckpt_ir.errors import LayoutError, UsageError, command_line, setting
    from tests.cli_contract import cli

    src = hf_cache("llama", layers=2, vocab=101)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("")
    api_and_cli = [
        (
            lambda: ck.convert(src, str(out), ck.Target(to="hf")),
            ["convert", src, out, "--to", "hf"],
            f"{out}: destination exists and is not empty; pass overwrite=True to replace it",
            f"{out}: destination exists and is not empty; pass --overwrite to replace it",
        ),
        (
            lambda: ck.Target(to="hf", tp=2),
            ["convert", src, tmp_path / "o", "--to", "hf", "--tp", "2"],
            "tp/pp/vpp_layers/num_layer_list/noop_layers/vocab_divisible_by/ep/etp/grouped_gemm/dp apply "
            "only with to='mcore'",
            "--tp/--pp/--vpp-layers/--num-layer-list/--noop-layers/--make-vocab-size-divisible-by/--ep/--etp/"
            "--moe-grouped-gemm/--target-dp apply only with --to mcore",
        ),
        (
            lambda: ck.convert(src, str(tmp_path / "o"), ck.Target(to="mcore", tp=2)),
            ["convert", src, tmp_path / "o", "--to", "mcore", "--tp", "2"],
            "layout: vocabulary of 101 rows does not split evenly over tensor parallel size 2; pass "
            "vocab_divisible_by to pad it",
            "layout: vocabulary of 101 rows does not split evenly over tensor parallel size 2; pass "
            "--make-vocab-size-divisible-by to pad it",
        ),
        (
            lambda: ck.convert(
                src, str(tmp_path / "o"), ck.Target(to="mcore", pp=2), pipeline="fuse-qkv,fuse-gate-up"
            ),
            [
                "convert",
                src,
                tmp_path / "o",
                "--to",
                "mcore",
                "--pp",
                "2",
                "--pipeline",
                "fuse-qkv,fuse-gate-up",
            ],
            "the pipeline's output differs from the target: pp=2 but the pipeline gives 1 (add the passes to "
            "the pipeline, or leave those settings out)",
            "the pipeline's output differs from the target: --pp 2 but the pipeline gives 1 (add the passes to "
            "the pipeline, or leave those settings out)",
        ),
    ]
    for call, argv, python, command_line_words in api_and_cli:
        with pytest.raises((UsageError, LayoutError)) as e:
            call()
        assert str(e.value) == python
        r = cli(*argv)
        assert r.returncode == e.value.exit_code and r.stderr.endswith(
            f"ckpt-ir: error: {command_line_words}\n"
        )
    assert [setting("optimizer", False), setting("etp", 1), setting("lora_load", metavar="DIR")] == [
        "optimizer=False",
        "etp=1",
        "lora_load=...",
    ]
    with command_line():
        assert [setting("optimizer", False), setting("etp", 1), setting("lora_load", metavar="DIR")] == [
            "--no-optimizer",
            "--etp 1",
            "--lora-load DIR",
        ]
    assert setting("noop_layers", (3, 5)) == "noop_layers=(3, 5)"  # Python again after the command


def test_save_writes_the_ir_as_it_is(hf_cache, tmp_path):
    """``save`` derives nothing (as its docstring says): an IR without the target's layout is
    refused naming the setting, nothing written; the IR the derived pipeline made is written."""
    import pytest

    from ckpt_ir.errors import UsageError

    src = ck.load(hf_cache("llama", layers=2))
    target = ck.Target(to="mcore", tp=2)
    with pytest.raises(UsageError, match=r"^the pipeline's output differs from the target: tp=2 but"):
        ck.save(src, str(tmp_path / "a"), target)
    assert not (tmp_path / "a").exists()
    stats = ck.save(ck.run(src, ck.derive_pipeline(src, target)), str(tmp_path / "b"), target)
    assert sorted(stats) == ["bytes_read", "bytes_written", "overflows", "seconds"]
    assert sorted(p.name for p in (tmp_path / "b" / "iter_0000001").iterdir()) == ["mp_rank_00", "mp_rank_01"]


def test_api_reference_is_generated_from_the_docstrings():
    """docs/api.md is what tools/api_reference.py writes from today's docstrings (a docstring
    changed without rerunning it fails here), and it documents every public name."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("api_reference", repo / "tools" / "api_reference.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = (repo / "docs" / "api.md").read_text()
    assert text == tool.reference(), "docs/api.md is stale: run python tools/api_reference.py"
    for name in ck.__all__:
        assert f"`{name}`" in text and (getattr(ck, name).__doc__ or "").strip(), name
    assert "Nothing is derived or converted here" in text  # save's docstring, as it now reads
    r = subprocess.run([sys.executable, str(repo / "tools" / "api_reference.py"), "--check"], cwd=repo)
    assert r.returncode == 0
