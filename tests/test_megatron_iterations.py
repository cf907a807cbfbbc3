"""Which iteration of a Megatron save directory is read: ``--iteration N`` / ``release`` for every
command that reads one (convert, inspect, diff, verify), and an ``iter_*`` / ``release`` directory
given itself is read as that iteration (torch and torch_dist)."""

from __future__ import annotations

import json
import os
import shutil

import attrs
import pytest

import ckpt_ir.api as ck
from ckpt_ir.commands.cli import main
from ckpt_ir.commands.diff import diff
from tests.conftest import build_hf


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """Two tiny Llamas (seeds 0 and 1) saved as iterations 1 and 10 of one run, in the torch
    format (TP=2, tracker naming 10) and in torch_dist (no tracker); and a run whose iteration 1
    is its ``release`` directory."""
    root = tmp_path_factory.mktemp("iterations")
    hf = {it: build_hf(str(root / f"hf{it}"), layers=2, seed=seed) for seed, it in ((0, 1), (1, 10))}
    run, dist, rel = root / "run", root / "dist", root / "rel"
    for d in (run, dist, rel):
        d.mkdir()
    for it, path in hf.items():
        src = ck.load(path)
        src = attrs.evolve(src, meta={**src.meta, "iteration": it})
        name = f"iter_{it:07d}"
        for fmt, tp, into in (("torch", 2, run), ("torch_dist", 1, dist)):
            out = root / f"{fmt}{it}"
            ck.convert(src, str(out), ck.Target(to="mcore", tp=tp, ckpt_format=fmt))
            shutil.copytree(out / name, into / name)
        shutil.copytree(run / name, rel / ("release" if it == 1 else name))
    (run / "latest_checkpointed_iteration.txt").write_text("10")
    (rel / "latest_checkpointed_iteration.txt").write_text("10")
    return {"hf": hf, "run": run, "dist": dist, "rel": rel}


def same(a, b) -> bool:
    return diff(str(a), str(b))["identical"]


def loaded_from(path, *flags: str, capsys) -> set[str]:
    """The iteration directories ``inspect`` reads the tensors from."""
    assert main(["inspect", str(path), "--format", "json", *flags]) == 0
    doc = json.loads(capsys.readouterr().out)

    def paths(e):
        yield from [e["path"]] if "path" in e else []
        for x in e.get("inputs", ()):
            yield from paths(x)

    return {
        part
        for t in doc["tensors"]
        for s in t["shards"]
        for p in paths(s)
        for part in p.split(os.sep)
        if part.startswith("iter_") or part == "release"
    }


@pytest.mark.parametrize("fmt", ["run", "dist"])
@pytest.mark.parametrize("it", [1, 10])
def test_an_iteration_directory_given_itself_is_read_as_that_iteration(saves, fmt, it):
    path = saves[fmt] / f"iter_{it:07d}"
    ckpt = ck.load(str(path))
    assert ckpt.meta["iteration"] == it
    assert same(path, saves["hf"][it])
    assert not same(path, saves["hf"][11 - it])


def test_the_latest_iteration_is_the_default_and_iteration_picks_another(saves, tmp_path, capsys):
    run, hf = saves["run"], saves["hf"]
    assert loaded_from(run, capsys=capsys) == {"iter_0000010"}
    assert loaded_from(run, "--iteration", "1", capsys=capsys) == {"iter_0000001"}
    out = tmp_path / "it1"
    assert main(["convert", str(run), str(out), "--to", "hf", "--iteration", "1", "--quiet"]) == 0
    assert same(out, hf[1]) and not same(out, hf[10])
    mc = tmp_path / "it1-mcore"
    assert main(["convert", str(run), str(mc), "--to", "mcore", "--iteration", "1", "--quiet"]) == 0
    assert os.listdir(mc / "iter_0000001") == ["mp_rank_00"]
    assert (mc / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_iteration_picks_one_of_a_torch_dist_save_directory(saves, tmp_path, capsys):
    dist, hf = saves["dist"], saves["hf"]
    for it in (1, 10):
        out = tmp_path / f"it{it}"
        assert main(["convert", str(dist), str(out), "--to", "hf", "--iteration", str(it), "--quiet"]) == 0
        assert same(out, hf[it])
    capsys.readouterr()
    # without a tracker, several iterations need a choice
    assert main(["inspect", str(dist)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"ckpt-ir: error: {dist}: several iterations (1, 10) and no latest_checkpointed_iteration.txt; "
        f"pick one with --iteration or give its iter_* directory"
    )


def test_release_is_an_iteration(saves, capsys):
    rel, hf = saves["rel"], saves["hf"]
    assert loaded_from(rel, "--iteration", "release", capsys=capsys) == {"release"}
    assert same(rel / "release", hf[1])
    assert main(["diff", str(rel), str(hf[1]), "--iteration", "release"]) == 0


def test_diff_and_verify_read_the_chosen_iteration(saves, capsys):
    run, hf = saves["run"], saves["hf"]
    assert main(["diff", str(run), str(hf[1])]) == 1  # the latest, iteration 10, is another model
    assert main(["diff", str(run), str(hf[1]), "--iteration", "1"]) == 0
    assert main(["diff", str(hf[1]), str(run), "--iteration", "1", "--json"]) == 0
    capsys.readouterr()
    assert main(["verify", str(run), str(hf[1]), "--iteration", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["verify", str(run), str(hf[10]), "--json"]) == 0


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_missing_iteration_is_a_usage_error_listing_the_present_ones(saves, tmp_path, capsys, command):
    run = saves["run"]
    out = tmp_path / "out"
    argv = [command, str(run), "--iteration", "5"] + (
        [str(out), "--to", "hf"] if command == "convert" else []
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ckpt-ir: error: {run}: no iteration 5; iterations present: 1, 10"
    assert not out.exists()


def test_iteration_other_than_the_directory_given_is_refused(saves, capsys):
    path = saves["run"] / "iter_0000010"
    assert main(["inspect", str(path), "--iteration", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ckpt-ir: error: {path}: is iteration 10 itself, not 1; give its save directory (the parent) "
        f"to read another iteration"
    )
    assert main(["inspect", str(path), "--iteration", "10"]) == 0


def test_iteration_values_and_sources_that_have_none(saves, capsys):
    for bad in ("latest", "-1", "1.5"):
        assert main(["inspect", str(saves["run"]), "--iteration", bad]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"ckpt-ir: error: ckpt-ir inspect: argument --iteration: expected an iteration number or "
            f"'release', got {bad!r}"
        )
    hf = saves["hf"][1]
    assert main(["inspect", hf, "--iteration", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ckpt-ir: error: {hf}: an HF checkpoint has no iterations; only a Megatron or MindSpeed-LLM FSDP2 "
        "checkpoint has"
    )
