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
# the other families, built by their own test modules: (builder, the torch-format layout a second
# torch_dist is written from, or None).  Megatron-Bridge keeps the tower of Qwen3-VL, Qwen3-VL-MoE
# and Qwen3.5-VL in Megatron's modules (vision_model.*), the others' in transformers' form;
# InternVL, whose default is MindSpeed-MM's naming, asks for Bridge's
MORE = {
    "qwen3_vl": ("qwen3vl", dict(tp=2, pp=2, num_layer_list=(2, 1))),
    "qwen3_vl_moe": ("qwen3vl", dict(tp=2, ep=2)),
    "qwen3_5_vl": ("qwen35vl", dict(tp=2)),
    "glm4v_moe": ("glm4v", dict(tp=2, ep=2)),
    "mistral3": ("vlm_more", None),
    "llama4": ("vlm_more", None),
    "kimi_k25": ("kimi_k25", None),
    "internvl": ("internvl", None),
}
MEGATRON_FORM = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5_vl")
LAYOUTS.update({family: (dict(ckpt_format="torch_dist"),) for family in MORE})
LAYOUTS["internvl"] = (dict(ckpt_format="torch_dist", mm_keys="bridge"),)
# the HF tensors of the language model (every other one is the tower's or the projector's)
LM_PREFIXES = ("model.language_model.", "language_model.", "lm_head.", "mtp.")


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


def _build_more(path: str, family: str) -> str:
    """A tiny model of ``family`` as its family test module builds it."""
    module, _ = MORE[family]
    if module == "qwen3vl":
        from tests.test_families_qwen3vl import build as build_qwen3

        return build_qwen3(path, family)
    if module == "qwen35vl":
        from tests.test_families_qwen3vl import build as build_qwen3
        from tests.test_families_qwen35vl import CONFIGS as Q35
        from tests.test_families_qwen35vl import add_mtp_layer

        build_qwen3(path, "qwen3_5", Q35)
        add_mtp_layer(path)
        return path
    if module == "glm4v":
        from tests.test_families_glm4v import build as build_glm

        return build_glm(path, family)
    if module == "vlm_more":
        from tests.test_families_vlm_more import build as build_more

        return build_more(path, family)
    if module == "kimi_k25":
        from tests.test_families_kimi_k25 import build as build_kimi

        return build_kimi(path)
    from tests.test_families_internvl import build as build_internvl

    return build_internvl(path)


@pytest.fixture(scope="module")
def written_more(tmp_path_factory):
    """family -> (HF source, its torch_dist written directly, from a torch-format layout or None)."""
    root = tmp_path_factory.mktemp("td-vlm-more")
    out = {}
    for family, (_, via_layout) in MORE.items():
        src = _build_more(str(root / family), family)
        (target,) = LAYOUTS[family]
        direct = str(root / f"{family}-td")
        convert(src, direct, ck.Target(to="mcore", **target))
        via = None
        if via_layout is not None:
            mid, via = str(root / f"{family}-mid"), str(root / f"{family}-td-via")
            convert(src, mid, ck.Target(to="mcore", **via_layout))
            convert(mid, via, ck.Target(to="mcore", **target))
        out[family] = (src, direct, via)
    return out


def _per_head(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's [q; k; v] as Megatron's linear_qkv with one group per head, [q_h; k_h; v_h]
    (docs/reference/vision-language-models.md section 2.3)."""
    q, k, v = (x.reshape(heads, -1, *qkv.shape[1:]) for x in qkv.chunk(3))
    return torch.cat([q, k, v], dim=1).reshape(qkv.shape)


def megatron_form_tower(
    hf: dict[str, torch.Tensor], vision: dict
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The torch_dist tensors and ``_extra_state`` objects of Megatron-Bridge's Qwen3-VL tower, from
    the HF tensors by the format facts: names and the per-head qkv of qwen3_vl_bridge.py:122-194
    (docs/reference/vision-language-models.md 2.3); Qwen3VLVisionTransformerBlock.sharded_state_dict
    (modelling_qwen3_vl/transformer_block.py:393-465) stacks the layers on a leading axis (offset
    ``(0, i, L)``) and the DeepStack mergers likewise (``(0, j, J)``), the patch embedding,
    positions and patch merger are whole; each TE linear and TENorm (model.py:348-353) saves an
    ``_extra_state`` object of shape (L,) at (i,) (megatron-core transformer/utils.py:178-191),
    (1,) at (0,) outside the stacks."""
    v, vm, heads = "model.visual.", "vision_model.", vision["num_heads"]
    depth, deepstack = vision["depth"], len(vision.get("deepstack_visual_indexes", ()))

    def stack(fmt: str, n: int, f=lambda x: x) -> torch.Tensor:
        return torch.stack([f(hf[v + fmt.format(i)]) for i in range(n)])

    layer = vm + "decoder.layers."
    want = {
        vm + "patch_embed.proj.weight": hf[v + "patch_embed.proj.weight"],
        vm + "patch_embed.proj.bias": hf[v + "patch_embed.proj.bias"],
        vm + "pos_embed.weight": hf[v + "pos_embed.weight"],
    }
    for w in ("weight", "bias"):
        want |= {
            layer + f"self_attention.linear_qkv.layer_norm_{w}": stack("blocks.{}.norm1." + w, depth),
            layer + f"self_attention.linear_qkv.{w}": stack(
                "blocks.{}.attn.qkv." + w, depth, lambda x: _per_head(x, heads)
            ),
            layer + f"self_attention.linear_proj.{w}": stack("blocks.{}.attn.proj." + w, depth),
            layer + f"mlp.linear_fc1.layer_norm_{w}": stack("blocks.{}.norm2." + w, depth),
            layer + f"mlp.linear_fc1.{w}": stack("blocks.{}.mlp.linear_fc1." + w, depth),
            layer + f"mlp.linear_fc2.{w}": stack("blocks.{}.mlp.linear_fc2." + w, depth),
            vm + f"merger.patch_norm.{w}": hf[v + "merger.norm." + w],
            vm + f"merger.linear_fc1.{w}": hf[v + "merger.linear_fc1." + w],
            vm + f"merger.linear_fc2.{w}": hf[v + "merger.linear_fc2." + w],
        }
        if deepstack:
            want |= {
                vm + f"decoder.deepstack_merger_list.{m}.{w}": stack(
                    "deepstack_merger_list.{}." + hf_m + "." + w, deepstack
                )
                for m, hf_m in (
                    ("patch_norm", "norm"),
                    ("linear_fc1", "linear_fc1"),
                    ("linear_fc2", "linear_fc2"),
                )
            }
    objects = {
        f"{layer}{m}._extra_state/shard_{i}_{depth}"
        for m in (
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        )
        for i in range(depth)
    }
    objects |= {
        f"{vm}decoder.deepstack_merger_list.{m}._extra_state/shard_{j}_{deepstack}"
        for m in ("patch_norm", "linear_fc1", "linear_fc2")
        for j in range(deepstack)
    }
    objects |= {f"{vm}merger.{m}._extra_state/shard_0_1" for m in ("patch_norm", "linear_fc1", "linear_fc2")}
    return want, objects


@pytest.mark.parametrize("family", sorted(MORE))
def test_torch_dist_of_every_bridge_layout_holds_its_keys_and_converts_back(written_more, tmp_path, family):
    """HF -> torch_dist (and HF -> torch-format layout -> torch_dist) -> HF bit for bit, side files
    byte for byte; the tower's .metadata keys, global shapes (whole tensors, one chunk at offset 0)
    and objects as Megatron-Bridge's model saves them, its tensors as torch's own DCP reader reads
    them.  Megatron-form towers by :func:`megatron_form_tower`; HF-form towers under their HF names
    (GLM-4.5V's model.visual.* as visual.*: glm_45v_bridge.py:146-149) with no objects; Kimi K2.5's
    language model in megatron-core's MLA modules (Bridge's DeepSeek mappings)."""
    src, direct, via = written_more[family]
    hf = hf_state(src)
    side = sorted(
        f
        for f in os.listdir(src)
        if not f.endswith(".safetensors") and f not in ("config.json", "model.safetensors.index.json")
    )
    assert side
    cfg = json.load(open(os.path.join(src, "config.json")))
    if family in MEGATRON_FORM:
        tower, objects = megatron_form_tower(hf, cfg["vision_config"])
    else:
        prefix = ("model.visual.", "visual.") if family == "glm4v_moe" else ("", "")
        tower = {prefix[1] + k[len(prefix[0]) :]: x for k, x in hf.items() if not k.startswith(LM_PREFIXES)}
        assert all(k.startswith(prefix[0]) for k in hf if not k.startswith(LM_PREFIXES))
        objects = set()
    for n, ckpt in enumerate(c for c in (direct, via) if c is not None):
        back = str(tmp_path / f"back{n}")
        convert(ckpt, back, ck.Target(to="hf"))
        assert_same_tensors(src, back)
        for f in side:
            assert open(os.path.join(back, f), "rb").read() == open(os.path.join(src, f), "rb").read(), f
        it_dir = os.path.join(ckpt, "iter_0000001")
        md = read_metadata(it_dir)
        shapes = {k: tuple(t.shape) for k, t in md.tensors.items() if not k.startswith("language_model.")}
        assert shapes == {k: tuple(x.shape) for k, x in tower.items()}
        for k in shapes:
            assert [tuple(c.offsets) for c in md.tensors[k].chunks] == [(0,) * len(shapes[k])], k
        assert {k for k in md.objects if not k.startswith("language_model.")} == objects
        got = _dcp_tensors(it_dir, shapes)
        for k, x in tower.items():
            assert torch.equal(got[k], x), k
        if family == "kimi_k25":
            attn = {k.rsplit(".", 2)[1] for k in md.tensors if ".self_attention." in k}
            assert {"linear_q_down_proj", "linear_kv_down_proj"} <= attn and "linear_qkv" not in attn


def test_megatron_core_loads_the_megatron_form_towers(written_more, tmp_path):
    """megatron-core's dist_checkpointing.load at TP 2 (two gloo ranks, one subprocess for all) of
    what Megatron-Bridge's Megatron-form tower asks for, built from megatron-core's modules
    (tests/vlm_dist_harness.py _vision_model: its ViT TransformerBlock under vision_model.decoder.,
    the layers stacked on a leading axis; the DeepStack mergers stacked likewise; the merger, patch
    embedding and positions), for each torch_dist of qwen3_vl, qwen3_vl_moe and qwen3_5_vl (written
    from HF and from a torch-format layout).  Nothing it asks for is absent (strict); what it does
    not ask for is the language model and the _extra_state of TE's norms (torch's LayerNorm has
    none); every tensor it loads on each TP rank is the HF tensor's piece at megatron-core's own
    offset (per-head qkv: megatron_form_tower), on megatron-core's TP axes."""
    vm = "vision_model."
    layer, ds = "decoder.layers.", "decoder.deepstack_merger_list."
    cases, wants = [], []
    for family in MEGATRON_FORM:
        src, direct, via = written_more[family]
        cfg = json.load(open(os.path.join(src, "config.json")))
        want, objects = megatron_form_tower(hf_state(src), cfg["vision_config"])
        base = dict(tp=2, pp=1, vpp=None, load_only=True, vision_model=True, config=cfg)
        for n, ckpt in (("direct", direct), ("via", via)):
            cases.append(dict(base, name=f"{family}-{n}", ckpt=ckpt, out=str(tmp_path / f"{family}-{n}")))
            wants.append((want, objects, bool(cfg["vision_config"].get("deepstack_visual_indexes"))))

    def module_key(obj: str) -> str:  # "<stack>.<m>._extra_state/shard_<i>_<n>" -> "<stack>.<i>.<m>..."
        key, shard = obj.split("/shard_")
        for stack in (vm + layer, vm + ds):
            if key.startswith(stack):
                return f"{stack}{shard.split('_')[0]}.{key[len(stack) :]}"
        return key

    for case, (want, objects, deepstack), (_, reports) in zip(
        cases, wants, run_job(tmp_path, cases, 2, script=HARNESS)
    ):
        te_norms = {k.split("/shard_")[0] for k in objects if ".patch_norm._extra_state" in k}
        # the local linears' _extra_state objects, one per stacked module, as TE's linears save them
        linears = sorted(module_key(k) for k in objects if ".patch_norm._extra_state" not in k)
        md = read_metadata(os.path.join(case["ckpt"], "iter_0000001"))
        lm = {k for k in md.tensors if k.startswith("language_model.")}
        lm |= {k.split("/shard_")[0] for k in md.objects if k.startswith("language_model.")}
        assert te_norms and lm
        split = set()
        for r, report in enumerate(reports):
            assert report["unexpected"] == [], (case["name"], report["unexpected"])
            assert set(report["missing"]) == lm | te_norms, case["name"]
            assert report["objects"] == linears, case["name"]
            got = torch.load(f"{case['out']}.rank{r}.pt")
            assert {key for key, _, _ in report["where"].values()} == set(want), case["name"]
            for name, (key, offset, prepended) in report["where"].items():
                piece = want[key][tuple(offset[:prepended])]
                for axis, (start, size) in enumerate(zip(offset[prepended:], got[name].shape)):
                    piece = piece.narrow(axis, start, size)
                    if size != want[key].shape[prepended + axis]:
                        split.add((key.removeprefix(vm), axis))
                assert torch.equal(got[name], piece), (case["name"], r, name)
        # megatron-core's TP axes: ColumnParallelLinear 0, RowParallelLinear's weight 1
        mergers = (ds, "merger.") if deepstack else ("merger.",)
        assert split == {
            *((layer + f"self_attention.linear_qkv.{w}", 0) for w in ("weight", "bias")),
            *((layer + f"mlp.linear_fc1.{w}", 0) for w in ("weight", "bias")),
            (layer + "self_attention.linear_proj.weight", 1),
            (layer + "mlp.linear_fc2.weight", 1),
            *((m + f"linear_fc1.{w}", 0) for m in mergers for w in ("weight", "bias")),
            *((m + "linear_fc2.weight", 1) for m in mergers),
        }, case["name"]
