"""Vision-language models in ``torch_dist`` (Megatron-Bridge's default save format,
``save_megatron_model(..., ckpt_format="torch_dist")``, Megatron-Bridge
``training/model_load_save.py:508``): HF -> Megatron-Core TP2 PP2 (torch) -> torch_dist -> HF is
bit-exact for qwen2_5_vl, qwen2_vl and gemma3, with the side files; the ``.metadata`` holds
the keys and global shapes megatron-core's sharded state dict of Megatron-Bridge's model gives
(rules below, derived from the HF tensors), and megatron-core's ``dist_checkpointing.load``
fills a model built on CPU from it (``tests/vlm_dist_harness.py``).

The rules (megatron-core 0.16.1; docs/formats.md, torch_dist):

* the language model is a GPTModel under ``language_model.``: its decoder layers stacked on a
  leading layer axis (``language_model.decoder.layers.<param>`` ``[L, ...]``);
* transformers' tower module has no ``sharded_state_dict``, so megatron-core's
  ``sharded_state_dict_default`` (``transformer/utils.py:209-252``) saves its plain state dict
  replicated (``make_sharded_tensors_for_checkpoint``, ``transformer/utils.py:75-148``): one key per
  HF tensor (``visual.*``, ``vision_tower.*``), global shape the HF tensor's own, not stacked, no
  ``_extra_state``;
* Gemma 3's projector is Megatron-Bridge's module: ``multi_modal_projector.proj.weight`` is
  ``[T, E]`` (HF's ``mm_input_projection_weight`` transposed, ``gemma3_vl_bridge.py:152-156``), a
  ColumnParallelLinear split on axis 0 (``tensor_parallel/layers.py:1060-1070``), and it and the
  norm save an ``_extra_state`` object, ``<module>._extra_state/shard_0_1``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckpt_ir.api as ck
from ckpt_ir.errors import UsageError
from ckpt_ir.io.dcp import read_metadata
from tests.mcore_harness import run_job
from tests.test_families_vlm import BRIDGE_OWN, CONFIGS, assert_side_files, build
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

HARNESS = os.path.join(os.path.dirname(__file__), "vlm_dist_harness.py")
TEXT = ("model.", "lm_head.", "language_model.")
FAMILIES = ("qwen2_5_vl", "qwen2_vl", "gemma3")
# the round trips each family's Family.tested claims (tests/test_support_matrix.py): HF ->
# torch_dist -> HF, written from HF and from a TP2 PP2 torch-format checkpoint
LAYOUTS = {family: (dict(ckpt_format="torch_dist"),) for family in FAMILIES}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """family -> (HF source, its torch_dist via TP2 PP2, its torch_dist written directly)."""
    root = tmp_path_factory.mktemp("td-vlm")
    out = {}
    for family in FAMILIES:
        src = build(str(root / family), family)
        mid, via, direct = (str(root / f"{family}-{n}") for n in ("tp2pp2", "td", "td-direct"))
        convert(src, mid, ck.Target(to="mcore", tp=2, pp=2))
        (target,) = LAYOUTS[family]
        convert(mid, via, ck.Target(to="mcore", **target))
        convert(src, direct, ck.Target(to="mcore", **target))
        out[family] = (src, via, direct)
    return out


def _dcp_tensors(it_dir: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors ``shapes`` names, read by torch.distributed.checkpoint itself."""
    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty(s) for k, s in shapes.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(it_dir), no_dist=True)
    return state


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_dist_holds_megatron_bridges_keys_and_converts_back_bit_exact(written, tmp_path, family):
    src, via, direct = written[family]
    for n, ckpt in enumerate((via, direct)):
        back = str(tmp_path / f"back{n}")
        convert(ckpt, back, ck.Target(to="hf"))  # no HF config given: the args carry it
        assert_same_tensors(src, back)
        assert_side_files(src, back)
    hf = hf_state(src)
    own = BRIDGE_OWN.get(family, {})
    theirs = {hf_name: (key, transposed) for key, (hf_name, transposed) in own.items()}
    # the tower: every HF tensor outside the language model, under its HF name (Bridge's own
    # modules: their keys), its own shape as the global shape
    tower = {}
    for name, x in hf.items():
        if name.startswith(TEXT):
            continue
        key, transposed = theirs.get(name, (name, False))
        tower[key] = x.T if transposed else x
    cfg = json.load(open(os.path.join(src, "config.json")))
    text = cfg["text_config"]
    layers = text["num_hidden_layers"]
    for ckpt in (via, direct):
        it_dir = os.path.join(ckpt, "iter_0000001")
        md = read_metadata(it_dir)
        shapes = {k: tuple(t.shape) for k, t in md.tensors.items()}
        assert {k: s for k, s in shapes.items() if not k.startswith("language_model.")} == {
            k: tuple(x.shape) for k, x in tower.items()
        }
        for k, t in md.tensors.items():  # whole tensors (megatron-core reshards on load)
            assert [tuple(c.offsets) for c in t.chunks] == [(0,) * len(t.shape)], k
        lm = {k: s for k, s in shapes.items() if k.startswith("language_model.")}
        stacked = [k for k in lm if k.startswith("language_model.decoder.layers.")]
        assert stacked and all(lm[k][0] == layers for k in stacked)
        assert lm["language_model.embedding.word_embeddings.weight"] == (
            text["vocab_size"],
            text["hidden_size"],
        )
        objects = {k.split("/shard_")[0] for k in md.objects}
        assert {k for k in objects if not k.startswith("language_model.")} == {
            k[: -len("weight")] + "_extra_state" for k in own
        }
        got = _dcp_tensors(it_dir, {k: shapes[k] for k in tower})
        for k, x in tower.items():
            assert torch.equal(got[k], x), k
        embed = "model.embed_tokens.weight" if "model.embed_tokens.weight" in hf else None
        embed = embed or "language_model.model.embed_tokens.weight"
        key = "language_model.embedding.word_embeddings.weight"
        assert torch.equal(_dcp_tensors(it_dir, {key: lm[key]})[key], hf[embed])


def test_megatron_core_loads_the_torch_dist_of_a_vlm(written, tmp_path):
    """megatron-core's dist_checkpointing.load at TP 2 of what Megatron-Bridge's models ask for:
    Qwen2.5-VL's GPTModel under language_model. plus transformers' tower under visual.; Gemma 3's
    SigLIP tower under vision_tower. plus Bridge's projector (ColumnParallelLinear split over TP,
    the norm's _extra_state)."""
    qwen, _, qwen_td = written["qwen2_5_vl"]
    gemma, gemma_td, _ = written["gemma3"]
    text = json.load(open(os.path.join(qwen, "config.json")))["text_config"]
    gemma_text = CONFIGS["gemma3"]["text_config"]
    base = dict(tp=2, pp=1, vpp=None, load_only=True)
    cases = [
        dict(
            base,
            name="qwen2_5_vl",
            ckpt=qwen_td,
            lm=True,
            hf_config=text,
            padded_vocab=text["vocab_size"],
            tied=False,
            qkv_bias=True,
            qk_norm=False,
            model_type="qwen2_5_vl",
            config=CONFIGS["qwen2_5_vl"],
            tower="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel",
            prefix="visual.",
            out=str(tmp_path / "qwen"),
        ),
        dict(
            base,
            name="gemma3",
            ckpt=gemma_td,
            model_type="gemma3",
            config=CONFIGS["gemma3"],
            tower="auto",
            prefix="vision_tower.",
            projector=(CONFIGS["gemma3"]["vision_config"]["hidden_size"], gemma_text["hidden_size"]),
            out=str(tmp_path / "gemma"),
        ),
    ]
    reports = [r for _, r in run_job(tmp_path, cases, 2, script=HARNESS)]
    for case, (src, own) in zip(cases, ((qwen, {}), (gemma, BRIDGE_OWN["gemma3"]))):
        hf = hf_state(src)
        for r, report in enumerate(reports[cases.index(case)]):
            tp = report["tp_rank"]
            got = torch.load(f"{case['out']}.rank{r}.pt")
            tower = {k: v for k, v in got.items() if k.startswith(case["prefix"])}
            assert tower and all(torch.equal(v, hf[k]) for k, v in tower.items())
            for key, (hf_name, transposed) in own.items():
                want = hf[hf_name].T.chunk(2)[tp] if transposed else hf[hf_name]
                assert torch.equal(got[key], want), key
            if own:  # ColumnParallelLinear asks for its _extra_state itself; the norm's is TE's
                assert report["objects"] == sorted(k[: -len("weight")] + "_extra_state" for k in own)
            if case.get("lm"):
                embed = got["language_model.embedding.word_embeddings.weight"]
                assert torch.equal(embed, hf["model.embed_tokens.weight"].chunk(2)[tp])
                assert torch.equal(
                    got["language_model.decoder.final_layernorm.weight"], hf["model.norm.weight"]
                )


def test_mindspeed_mm_layout_and_fsdp_dtensor_are_refused_in_one_line(written, tmp_path):
    src, _, _ = written["qwen2_5_vl"]
    with pytest.raises(UsageError, match="MindSpeed-MM's layout .* only as torch-format release/ rank files"):
        convert(
            src, str(tmp_path / "mm"), ck.Target(to="mcore", ckpt_format="torch_dist", mm_keys="mindspeed")
        )
    with pytest.raises(UsageError, match="as torch or torch_dist .* only") as e:
        convert(src, str(tmp_path / "fsdp"), ck.Target(to="mcore", ckpt_format="fsdp_dtensor"))
    assert "\n" not in str(e.value)


def test_a_save_without_args_reads_with_the_hf_config(written, tmp_path, capsys):
    """megatron-core's dist_checkpointing.save keeps no args (Megatron-Bridge's model alone): the
    model comes from --hf-config, else one line asks for it."""
    import shutil

    from ckpt_ir.commands.cli import main

    src, _, direct = written["gemma3"]
    bare = str(tmp_path / "bare")
    shutil.copytree(direct, bare, ignore=shutil.ignore_patterns("hf"))
    common = os.path.join(bare, "iter_0000001", "common.pt")
    state = torch.load(common, weights_only=False)
    del state["args"]
    torch.save(state, common)
    back = str(tmp_path / "back")
    assert main(["convert", bare, back, "--to", "hf", "--quiet"]) == 1
    assert "has no 'args'" in capsys.readouterr().err
    assert main(["convert", bare, back, "--to", "hf", "--quiet", "--hf-config", src]) == 0
    assert_same_tensors(src, back)
