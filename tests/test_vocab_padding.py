"""Vocabulary padding rows are part of a Megatron checkpoint: a run with ``vocab_size=250`` and
256 padded rows (``make_vocab_size_divisible_by`` 128), trained by megatron-core, keeps its trained
padding rows bit for bit through Megatron -> Megatron conversions (same layout, TP and PP changes,
torch_dist), loses them only on export to HF (reported), and ``diff`` sees a change in them."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir.api as ck
from ckpt_ir.commands.cli import main as cli_main
from ckpt_ir.commands.diff import diff
from ckpt_ir.errors import UsageError
from ckpt_ir.ir import expr as E
from tests import distopt_fixtures as F
from tests.test_megatron_args_only import _assert_same_files

VOCAB, PADDED = 250, 256
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(root, sizes dir, a megatron-core TP2 PP2 checkpoint trained one step with 6 padding rows)."""
    root = tmp_path_factory.mktemp("vocab_padding")
    sizes = F.make_tiny_hf_llama(str(root / "sizes"), layers=2, heads=4, kv_heads=4, vocab=VOCAB)
    src = str(root / "src")
    F.make_distopt_checkpoint(src, sizes, tp=2, pp=2, dp=1, steps=1, vocab_divisible_by=128)
    return root, sizes, src


def rank_file(ckpt: str, d: str) -> dict:
    return torch.load(os.path.join(ckpt, "iter_0000001", d, "model_optim_rng.pt"), weights_only=False)


def table(ckpt: str, key: str, tp: int, pp: int) -> torch.Tensor:
    """``key``'s whole padded table, from the TP ranks of the stage that holds it."""
    stage = 0 if key.startswith("embedding") else pp - 1
    return torch.cat([rank_file(ckpt, F.mp_dir_name(r, stage, pp))["model"][key] for r in range(tp)])


def convert(src: str, dst: str, *flags: str) -> str:
    assert cli_main(["convert", src, dst, "--to", "mcore", "--quiet", *flags]) == 0
    return dst


def test_the_fixture_has_trained_padding_rows_of_its_own(run):
    _, _, src = run
    out = table(src, "output_layer.weight", 2, 2)
    assert out.shape[0] == PADDED and rank_file(src, "mp_rank_00_000")["args"].vocab_size == VOCAB
    pad = out[VOCAB:].float()
    # six distinct rows, none a copy of the last vocabulary row
    assert len({tuple(r.tolist()) for r in pad}) == PADDED - VOCAB
    assert not (pad == out[VOCAB - 1].float()).all(dim=1).any()


def test_same_layout_keeps_every_file_bit_for_bit(run):
    root, _, src = run
    _assert_same_files(src, convert(src, str(root / "same"), "--tp", "2", "--pp", "2"))


def test_padding_rows_move_with_their_rows_through_tp_and_pp_changes(run):
    """TP2 PP2 -> TP1 PP1 -> TP2 PP2: the padded tables (and their optimizer state) are the
    source's, and megatron-core resumes the result with the source's state."""
    root, sizes, src = run
    tp1 = convert(src, str(root / "tp1pp1"), "--tp", "1", "--pp", "1")
    for key in VOCAB_KEYS:
        assert torch.equal(table(tp1, key, 1, 1), table(src, key, 2, 2)), key
    args = rank_file(tp1, "mp_rank_00")["args"]
    assert (args.vocab_size, args.padded_vocab_size, args.make_vocab_size_divisible_by) == (
        VOCAB,
        PADDED,
        128,
    )
    back = convert(tp1, str(root / "back"), "--tp", "2", "--pp", "2")
    _assert_same_files(src, back)
    resumed = str(root / "resumed")
    F.resume_distopt_checkpoint(resumed, sizes, back, tp=2, pp=2, dp=1, vocab_divisible_by=128)
    for stage in range(2):
        for rank in range(2):
            name = F.mp_dir_name(rank, stage, 2) + ".pt"
            a = torch.load(os.path.join(src, "ground_truth", name), weights_only=False)["params"]
            b = torch.load(os.path.join(resumed, "ground_truth", name), weights_only=False)["params"]
            assert a.keys() == b.keys()
            for key in a:
                for field in ("model_param", "param", "exp_avg", "exp_avg_sq"):
                    assert torch.equal(a[key][field], b[key][field]), (name, key, field)


def test_torch_dist_keeps_the_padding_rows(run):
    root, _, src = run
    td = convert(src, str(root / "td"), "--ckpt-format", "torch_dist")
    assert ck.load(td).layout.padded_vocab == PADDED
    _assert_same_files(src, convert(td, str(root / "td_back"), "--tp", "2", "--pp", "2"))


def test_a_tp_that_megatrons_rule_pads_further_gets_a_divisor_that_gives_the_kept_rows(run):
    root, _, src = run
    tp4 = convert(src, str(root / "tp4"), "--tp", "4", "--pp", "1", "--no-optimizer")
    args = rank_file(tp4, "mp_rank_03")["args"]
    # Megatron-LM pads 250 to a multiple of 128 x 4 = 512; 64 x 4 gives the 256 rows kept
    assert (args.padded_vocab_size, args.make_vocab_size_divisible_by) == (PADDED, 64)
    assert torch.equal(table(tp4, "output_layer.weight", 4, 1), table(src, "output_layer.weight", 2, 2))


def test_hf_export_drops_the_padding_rows_and_says_so(run, capsys):
    root, sizes, src = run
    hf = str(root / "hf")
    capsys.readouterr()
    assert cli_main(["convert", src, hf, "--to", "hf"]) == 0
    err = capsys.readouterr().err
    assert (
        "dropped: embed.weight[250:256] and 1 more like it: vocabulary padding rows of Megatron's padded "
        "vocabulary (256 rows for 250 tokens); the unpadded layout (HF) holds the vocabulary's rows only"
    ) in err.splitlines()
    got = load_file(os.path.join(hf, "model.safetensors"))
    assert torch.equal(got["lm_head.weight"], table(src, "output_layer.weight", 2, 2)[:VOCAB])
    assert diff(src, hf)["identical"]  # against HF, the vocabulary rows are compared


def test_diff_compares_the_padding_rows(run, capsys):
    root, _, src = run
    tp1 = str(root / "diff_tp1")
    convert(src, tp1, "--tp", "1", "--pp", "1", "--no-optimizer")
    assert diff(src, tp1)["identical"]
    changed = str(root / "changed")
    shutil.copytree(tp1, changed)
    path = os.path.join(changed, "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    blob = torch.load(path, weights_only=False)
    blob["model"]["output_layer.weight"][253, 5] += 1.0
    torch.save(blob, path)
    report = diff(src, changed)
    assert not report["identical"]
    assert [(d["name"], d["first_max_at"], d["elements_differing"]) for d in report["different"]] == [
        ("lm_head.weight", [253, 5], 1)
    ]
    assert cli_main(["diff", src, changed]) == 1
    # a Megatron checkpoint without the padding rows differs from one with them
    unpadded = convert(src, str(root / "unpadded"), "--make-vocab-size-divisible-by", "1", "--no-optimizer")
    capsys.readouterr()
    assert cli_main(["diff", src, unpadded]) == 1
    assert "shape/dtype: embed.weight: A [256, 72] BF16 vs B [250, 72] BF16" in capsys.readouterr().out


def test_a_larger_padded_size_keeps_the_rows_and_fills_new_ones_from_the_last_token(run, capsys):
    root, _, src = run
    grown = str(root / "grown")
    capsys.readouterr()
    flags = ["--tp", "2", "--pp", "2", "--make-vocab-size-divisible-by", "256"]
    assert cli_main(["convert", src, grown, "--to", "mcore", *flags]) == 0
    err = capsys.readouterr().err
    note = (
        "vocabulary padding grown from 256 to 512 rows: rows 256-511 of embed.weight, lm_head.weight are "
        "new (copies of row 249, the vocabulary's last), rows 250-255 are the source's own"
    )
    assert f"note: {note} (recorded in ckpt-ir-notes.txt)" in err.splitlines()
    assert open(os.path.join(grown, "ckpt-ir-notes.txt")).read() == note + "\n"
    for key in VOCAB_KEYS:
        old, new = table(src, key, 2, 2), table(grown, key, 2, 2)
        assert new.shape[0] == 512 and torch.equal(new[:PADDED], old)
        assert torch.equal(new[PADDED:], old[VOCAB - 1].expand(512 - PADDED, -1))
    # in the optimizer state the kept rows are the source's; new rows are the last token's fp32
    # master copy, with zero Adam moments
    old_states = ck.run(ck.load(src, optimizer=True), "gather").states
    new_states = ck.run(ck.load(grown, optimizer=True), "gather").states
    with E.Reader() as reader:
        for which in ("param", "exp_avg", "exp_avg_sq"):
            old = E.evaluate(old_states[which]["lm_head.weight"].expr, reader)
            new = E.evaluate(new_states[which]["lm_head.weight"].expr, reader)
            assert torch.equal(new[:PADDED], old), which
            fill = old[VOCAB - 1] if which == "param" else torch.zeros_like(old[0])
            assert torch.equal(new[PADDED:], fill.expand(512 - PADDED, -1)), which


def test_a_smaller_padded_size_drops_only_padding_rows(run, capsys):
    root, _, src = run
    small = str(root / "small")
    capsys.readouterr()
    assert cli_main(["convert", src, small, "--to", "mcore", "--make-vocab-size-divisible-by", "1"]) == 0
    err = capsys.readouterr().err
    assert (
        "dropped: embed.weight[250:256] and 1 more like it: vocabulary padding rows beyond the padded size 250"
        in err.splitlines()
    )
    assert table(small, "embedding.word_embeddings.weight", 1, 1).shape[0] == VOCAB
    with pytest.raises(UsageError) as e:
        ck.run(ck.load(src), "gather,pad-vocab{size=200}")
    assert str(e.value) == "pad-vocab: size 200 is smaller than the vocabulary 250; only padding rows may go"


def test_an_odd_vocabulary_padded_for_tp_converts_back(hf_cache, tmp_path):
    """GPT-2's 50257 rows split over TP 2 only padded: the TP2 checkpoint (its args say the
    padded size) goes back to HF bit for bit and reshards to TP 1."""
    from tests.test_hf_roundtrip import assert_same_tensors

    src = hf_cache("llama", layers=2, vocab=127)
    mid = convert(src, str(tmp_path / "tp2"), "--tp", "2", "--make-vocab-size-divisible-by", "64")
    assert rank_file(mid, "mp_rank_00")["model"]["embedding.word_embeddings.weight"].shape[0] == 64
    back = str(tmp_path / "back")
    assert cli_main(["convert", mid, back, "--to", "hf", "--quiet"]) == 0
    assert_same_tensors(src, back)
    tp1 = convert(mid, str(tmp_path / "tp1"), "--tp", "1")
    assert rank_file(tp1, "mp_rank_00")["model"]["embedding.word_embeddings.weight"].shape[0] == 128
