"""Qwen3-VL and Qwen3-VL-MoE (vision tower with learned positions and DeepStack mergers): HF ->
Megatron-Core -> HF is bit-exact with the side files back byte for byte and transformers' logits on
text plus a generated image equal, in Megatron-Bridge's layout (the tower in Megatron's modules
under ``vision_model.``, split over the language model's TP, on pipeline stage 0:
docs/reference/vision-language-models.md section 2.3) and MindSpeed-MM's (section 3.4, DeepStack
merger J under the blocks of vision layer ``deepstack_visual_indexes[J]``; experts per EP rank as
``local_experts``).  The expected rank-file tensors are computed here from the HF tensors by those
rules."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import ckpt_ir.api as ck
from ckpt_ir.errors import LayoutError
from tests.family_models import build_vlm, image_logits, model_cache, rank
from tests.test_families_vlm import SIDE_FILES, TEXT, TOKENS, VISION, assert_side_files, patch_inputs
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

# patch 4, temporal patch 2, 2x2 merge, 16 learned positions (a 4 x 4 grid, interpolated to the
# image's); DeepStack mergers on vision layers 1 and 0 (in that order: merger J reads layer
# deepstack_visual_indexes[J], so the renumbering shows)
Q3_VISION = dict(
    VISION,
    hidden_size=32,
    intermediate_size=48,
    out_hidden_size=64,
    num_position_embeddings=16,
    deepstack_visual_indexes=[1, 0],
)
Q3_TEXT = dict(TEXT, head_dim=16, num_hidden_layers=3)
Q3_TEXT["rope_parameters"] = dict(TEXT["rope_parameters"], mrope_interleaved=True)
CONFIGS = {
    "qwen3_vl": dict(text_config=Q3_TEXT, vision_config=Q3_VISION, **TOKENS),
    # experts 48 wide: the stacked gate_up_proj [4, 96, 64] is not square in its last two dims
    # (hidden 64 != 2 x 48), so its orientation shows; one DeepStack merger
    "qwen3_vl_moe": dict(
        text_config=dict(
            TEXT,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            decoder_sparse_step=1,
        ),
        vision_config=dict(Q3_VISION, deepstack_visual_indexes=[1]),
        tie_word_embeddings=False,
        **TOKENS,
    ),
}
MM = dict(mm_keys="mindspeed")
LAYOUTS = {
    "qwen3_vl": (
        dict(tp=1),
        dict(tp=2),
        dict(tp=2, pp=2, num_layer_list=(2, 1)),
        dict(MM, tp=2, pp=2, num_layer_list=(2, 1), vision_layer_list=(1, 1)),
    ),
    "qwen3_vl_moe": (
        dict(tp=1),
        dict(tp=2, ep=2),
        dict(pp=2, ep=2),
        dict(MM, tp=2, ep=2),
        dict(MM, pp=2, ep=2, num_layer_list=(1, 1), vision_layer_list=(2, 0)),
    ),
}


def build(path: str, model_type: str, configs: dict | None = None) -> str:
    """A tiny model of ``model_type`` (its config from ``configs``, default this module's CONFIGS)
    built and saved by transformers, every parameter random, with the side files."""
    return build_vlm(path, model_type, (configs or CONFIGS)[model_type], SIDE_FILES)


# a weight of the tower, scaled to show that the image reaches the logits
TOWER_WEIGHT = "model.visual.blocks.1.mlp.linear_fc2.weight"


def logits(path: str, scale: str | None = None) -> torch.Tensor:
    """transformers' logits on text + image (``scale``: a weight multiplied by 1.5 first)."""
    return image_logits(path, patch_inputs, scale)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "qwen3vl", build)


def per_head(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """An HF [q; k; v] as Megatron's linear_qkv with one group per head: [q_h; k_h; v_h]."""
    q, k, v = (x.reshape(heads, -1, *qkv.shape[1:]) for x in qkv.chunk(3))
    return torch.cat([q, k, v], dim=1).reshape(qkv.shape)


def rank_models(mid: str, layout: dict) -> dict[tuple[int, int, int], dict]:
    """(TP, PP, EP) rank -> its model dict, the directories named as the layout's writer names them."""
    tp, pp, ep = layout.get("tp", 1), layout.get("pp", 1), layout.get("ep", 1)
    out = {}
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
                out[(t, p, e)] = rank(mid, name)["model"]
    return out


def check_bridge(mid: str, hf: dict, layout: dict, vision: dict) -> None:
    """Megatron-Bridge's tower (qwen3_vl_bridge.py:122-194): on stage 0 only, split over TP (qkv per
    head, fc1 rows, fc2 columns), norms fused into the linear after them, DeepStack merger J as
    deepstack_merger_list.J."""
    tp, heads = layout.get("tp", 1), vision["num_heads"]
    v = "vision_model.decoder."
    for (t, p, _), sd in rank_models(mid, layout).items():
        tower = {k for k in sd if k.startswith("vision_model.")}
        assert bool(tower) == (p == 0), (t, p)
        if p:
            continue
        want = {
            v + "layers.1.self_attention.linear_qkv.weight": per_head(
                hf["model.visual.blocks.1.attn.qkv.weight"], heads
            ).chunk(tp)[t],
            v + "layers.0.self_attention.linear_qkv.layer_norm_bias": hf["model.visual.blocks.0.norm1.bias"],
            v + "layers.0.mlp.linear_fc1.layer_norm_weight": hf["model.visual.blocks.0.norm2.weight"],
            v + "layers.1.mlp.linear_fc2.weight": hf["model.visual.blocks.1.mlp.linear_fc2.weight"].chunk(
                tp, 1
            )[t],
            "vision_model.pos_embed.weight": hf["model.visual.pos_embed.weight"],
            "vision_model.merger.patch_norm.weight": hf["model.visual.merger.norm.weight"],
        }
        for j in range(len(vision["deepstack_visual_indexes"])):
            hf_j = f"model.visual.deepstack_merger_list.{j}."
            want[v + f"deepstack_merger_list.{j}.patch_norm.bias"] = hf[hf_j + "norm.bias"]
            want[v + f"deepstack_merger_list.{j}.linear_fc1.weight"] = hf[hf_j + "linear_fc1.weight"].chunk(
                tp
            )[t]
            want[v + f"deepstack_merger_list.{j}.linear_fc2.bias"] = hf[hf_j + "linear_fc2.bias"]
        for k, x in want.items():
            assert torch.equal(sd[k], x), (k, t)
        assert not any(".deepstack" in k for k in tower if k.startswith(v + "layers."))


def check_mindspeed(mid: str, hf: dict, layout: dict, cfg: dict) -> None:
    """MindSpeed-MM's files (converters/qwen3vl_megatron.py): DeepStack merger J under vision layer
    deepstack_visual_indexes[J] as deepstack_layer.*, numbered from 0 on its stage; experts of EP
    rank r as local_experts 0.. (GLU split of [gate_e; up_e] over TP)."""
    assert open(f"{mid}/latest_checkpointed_iteration.txt").read() == "release"
    tp, ep = layout.get("tp", 1), layout.get("ep", 1)
    vision, text = cfg["vision_config"], cfg["text_config"]
    counts = layout.get("vision_layer_list") or (vision["depth"],)
    models = {}
    for t in range(tp):
        for p in range(layout.get("pp", 1)):
            for e in range(ep):
                stage = "" if layout.get("pp", 1) == 1 else f"_{p:03d}"
                expert = "" if ep == 1 else f"_{e:03d}"
                obj = torch.load(
                    f"{mid}/release/mp_rank_{t:02d}{stage}{expert}/model_optim_rng.pt", weights_only=False
                )
                assert list(obj) == ["model", "checkpoint_version"] and obj["checkpoint_version"] == 3.0
                models[(t, p, e)] = obj["model"]
    for j, layer in enumerate(vision["deepstack_visual_indexes"]):
        p = next(s for s in range(len(counts)) if sum(counts[: s + 1]) > layer)
        local = layer - sum(counts[:p])
        key = f"image_encoder.encoder.blocks.layers.{local}.deepstack_layer."
        for t in range(tp):
            sd = models[(t, p, 0)]
            fc1 = hf[f"model.visual.deepstack_merger_list.{j}.linear_fc1.weight"]
            assert torch.equal(sd[key + "encoder.linear_fc1.weight"], fc1.chunk(tp)[t])
            assert torch.equal(
                sd[key + "layernorm.weight"], hf[f"model.visual.deepstack_merger_list.{j}.norm.weight"]
            )
    assert torch.equal(
        models[(0, 0, 0)]["image_encoder.encoder.pos_embed.weight"], hf["model.visual.pos_embed.weight"]
    )
    if "num_experts" not in text:
        return
    per_rank = text["num_experts"] // ep
    gate_up, down = (
        hf[f"model.language_model.layers.0.mlp.experts.{n}"] for n in ("gate_up_proj", "down_proj")
    )
    for (t, p, e), sd in models.items():
        if p:
            continue
        prefix = "text_decoder.decoder.layers.0.mlp.experts.local_experts."
        assert {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)} == set(
            range(per_rank)
        )
        for j in range(per_rank):
            gate, up = gate_up[e * per_rank + j].chunk(2)
            fc1 = torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
            assert torch.equal(sd[f"{prefix}{j}.linear_fc1.weight"], fc1), (t, e, j)
            assert torch.equal(sd[f"{prefix}{j}.linear_fc2.weight"], down[e * per_rank + j].chunk(tp, 1)[t])


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_hf_to_mcore_to_hf_bit_exact_with_same_image_logits(models, tmp_path, family):
    src = models(family)
    cfg = json.load(open(f"{src}/config.json"))
    assert ck.load(src).spec.vision.deepstack_layers == tuple(
        cfg["vision_config"]["deepstack_visual_indexes"]
    )
    want, hf = logits(src), hf_state(src)
    back = src
    for n, layout in enumerate(LAYOUTS[family]):
        mid, back = str(tmp_path / f"mid{n}"), str(tmp_path / f"back{n}")
        convert(src, mid, ck.Target(to="mcore", **layout))
        if layout.get("mm_keys") == "mindspeed":
            check_mindspeed(mid, hf, layout, cfg)
        else:
            check_bridge(mid, hf, layout, cfg["vision_config"])
        convert(mid, back, ck.Target(to="hf"))
        assert_same_tensors(src, back)
        assert_side_files(src, back)
        assert json.load(open(f"{back}/config.json")) == cfg
    # equal tensors and config give equal logits; checked once, on the last layout's output, and
    # the image reaches them: one changed tower weight changes them
    assert torch.equal(logits(back), want)
    assert not torch.equal(logits(back, scale=TOWER_WEIGHT), want)


def test_bridge_refuses_a_first_stage_without_every_deepstack_layer(models, tmp_path):
    """Megatron-Bridge adds DeepStack merger J after language-model layer J, all on stage 0
    (modelling_qwen3_vl/model.py:403-409): two mergers need two layers there."""
    with pytest.raises(LayoutError, match="DeepStack"):
        convert(models("qwen3_vl"), str(tmp_path / "mid"), ck.Target(to="mcore", pp=2, num_layer_list=(1, 2)))


def test_mm_convert_qwen3vl_megatron_converter_with_experts(models, tmp_path):
    """``ckpt-ir mm-convert Qwen3VLMegatronConverter`` with ep_size: MindSpeed-MM's directories
    mp_rank_TT_EEE (no _PPP at PP 1), read back with the flat lists and bit-exact."""
    from ckpt_ir.commands.cli import main

    src = models("qwen3_vl_moe")
    mm, back = str(tmp_path / "mm"), str(tmp_path / "back")

    def par(llm, vit) -> list[str]:
        return [
            *("--cfg.parallel_config.llm_pp_layers", json.dumps(llm)),
            *("--cfg.parallel_config.vit_pp_layers", json.dumps(vit)),
            *("--cfg.parallel_config.tp_size", "1", "--cfg.parallel_config.ep_size", "2"),
        ]

    run = ["mm-convert", "Qwen3VLMegatronConverter"]
    assert (
        main([*run, "hf_to_mm", "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", src, *par([[2]], [[2]])]) == 0
    )
    assert sorted(os.listdir(f"{mm}/release")) == ["mp_rank_00_000", "mp_rank_00_001"]
    check_mindspeed(mm, hf_state(src), dict(MM, ep=2), json.load(open(f"{src}/config.json")))
    flat = ("--cfg.save_hf_dir", back, "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", src)
    assert main([*run, "mm_to_hf", *flat, *par([2], [2])]) == 0
    assert_same_tensors(src, back)
    assert_side_files(src, back)


def hub_copy(src: str, dst: str) -> str:
    """``src`` with Qwen3-VL-MoE's stacked experts as the hub stores them: each expert's matrix
    transposed, gate_up_proj [Ex, T, 2Im] and down_proj [Ex, Im, T]
    (docs/reference/vision-language-models.md section 1.2)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if name.endswith(".safetensors"):
            sd = load_file(f"{dst}/{name}")
            sd = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in sd.items()}
            save_file(sd, f"{dst}/{name}", metadata={"format": "pt"})
    return dst


def test_hub_expert_orientation_read_and_written_back(models, tmp_path):
    """The hub's orientation of the experts reads as the same model as transformers' (identical
    Megatron-Bridge rank files) and is written back as read: through Megatron-Bridge's layout (the
    naming recorded in the args) and through MindSpeed-MM's, whose rank files record nothing, so
    ``mm-convert mm_to_hf`` takes it from the HF directory's weights."""
    from ckpt_ir.commands.cli import main

    src = models("qwen3_vl_moe")
    hub = hub_copy(src, str(tmp_path / "hub"))
    assert ck.load(hub).meta.get("hf_naming") == "hub" and "hf_naming" not in ck.load(src).meta
    layout = dict(tp=2, ep=2)
    mids = {}
    for name, path in (("transformers", src), ("hub", hub)):
        mids[name] = str(tmp_path / f"mid-{name}")
        convert(path, mids[name], ck.Target(to="mcore", **layout))
    for key, sd in rank_models(mids["hub"], layout).items():
        theirs = rank_models(mids["transformers"], layout)[key]
        assert sorted(sd) == sorted(theirs) and all(torch.equal(sd[k], theirs[k]) for k in sd), key
    convert(mids["hub"], str(tmp_path / "back"), ck.Target(to="hf"))
    assert_same_tensors(hub, str(tmp_path / "back"))
    mm, back = str(tmp_path / "mm"), str(tmp_path / "mm-back")
    par = ("--cfg.parallel_config.tp_size", "1", "--cfg.parallel_config.ep_size", "2")
    run = ["mm-convert", "Qwen3VLMegatronConverter"]
    layers = ("--cfg.parallel_config.llm_pp_layers", "[[2]]", "--cfg.parallel_config.vit_pp_layers", "[[2]]")
    assert main([*run, "hf_to_mm", "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", hub, *layers, *par]) == 0
    check_mindspeed(mm, hf_state(src), dict(MM, ep=2), json.load(open(f"{src}/config.json")))
    flat = ("--cfg.parallel_config.llm_pp_layers", "[2]", "--cfg.parallel_config.vit_pp_layers", "[2]")
    args = ("--cfg.save_hf_dir", back, "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", hub)
    assert main([*run, "mm_to_hf", *args, *flat, *par]) == 0
    assert_same_tensors(hub, back)


def test_expert_orientation_told_from_shapes_or_refused(models):
    """Every expert stack votes by its shape unless square in its last two dims: with hidden = 2 x
    expert width gate_up_proj is square either way and down_proj decides; a checkpoint whose only
    stacks are square, or whose stacks disagree, is refused in one line."""
    from types import SimpleNamespace

    import attrs

    from ckpt_ir.errors import FormatError
    from ckpt_ir.families import by_name

    family, spec = by_name("qwen3_vl_moe"), ck.load(models("qwen3_vl_moe")).spec
    lm = "model.language_model.layers.0.mlp.experts."

    def naming(shapes: dict[str, tuple[int, ...]], width: int) -> str | None:
        tensors = {lm + k: SimpleNamespace(shape=s) for k, s in shapes.items()}
        return family.naming_of(tensors, "ckpt", attrs.evolve(spec, moe_ffn_hidden_size=width))

    hidden, ex = spec.hidden_size, spec.num_experts
    half = hidden // 2  # gate_up_proj [Ex, 2 x half, hidden] is square
    assert naming({"gate_up_proj": (ex, hidden, hidden), "down_proj": (ex, half, hidden)}, half) == "hub"
    assert naming({"gate_up_proj": (ex, hidden, hidden), "down_proj": (ex, hidden, half)}, half) is None
    assert naming({"gate_up_proj": (ex, hidden, 96), "down_proj": (ex, 48, hidden)}, 48) == "hub"
    assert naming({"gate_up_proj": (ex, 96, hidden), "down_proj": (ex, hidden, 48)}, 48) is None
    with pytest.raises(FormatError, match="is square in its last two dims"):
        naming({"gate_up_proj": (ex, hidden, hidden)}, half)
    with pytest.raises(FormatError, match="mix the hub orientation"):
        naming({"gate_up_proj": (ex, hidden, 96), "down_proj": (ex, hidden, 48)}, 48)


def test_bridge_tower_layers_load_strictly_into_megatron_core(models, tmp_path):
    """Megatron-Bridge's tower layers (megatron-core's ViT layer spec, TE names) in each TP rank file
    load with strict=True into megatron-core's own TransformerBlock of ViT layers
    (tests/mcore_vision.py: one subprocess, two gloo ranks, both families), and its output equals
    transformers' vision blocks on the same input (no rotary embedding on either side: identity
    cos / sin for transformers)."""
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText

    torch.manual_seed(1)
    cases, inputs = [], {}
    for family, layout in (("qwen3_vl", dict(tp=2)), ("qwen3_vl_moe", dict(tp=2, ep=2))):
        src, mid = models(family), str(tmp_path / family)
        convert(src, mid, ck.Target(to="mcore", **layout))
        vision = json.load(open(f"{src}/config.json"))["vision_config"]
        inputs[family] = x = torch.randn(12, vision["hidden_size"])
        torch.save(x, tmp_path / f"{family}.x.pt")
        cases.append(
            {
                "ckpt": f"{mid}/release" if os.path.isdir(f"{mid}/release") else f"{mid}/iter_0000001",
                "tp": layout["tp"],
                "ep": layout.get("ep", 1),
                "out": str(tmp_path / f"{family}.out.pt"),
                "input": str(tmp_path / f"{family}.x.pt"),
                "layers": vision["depth"],
                "hidden": vision["hidden_size"],
                "heads": vision["num_heads"],
                "ffn": vision["intermediate_size"],
                "eps": 1e-6,
            }
        )
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"store": str(tmp_path / "store"), "cases": cases}))
    proc = subprocess.run(
        [sys.executable, "tests/mcore_vision.py", str(job), "2"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for family, x in inputs.items():
        got = torch.load(tmp_path / f"{family}.out.pt")
        vision = json.load(open(f"{models(family)}/config.json"))["vision_config"]
        # per layer: 2 LayerNorms (weight, bias), linear_qkv, linear_proj, fc1, fc2 (weight, bias)
        assert len(got["loaded"]) == vision["depth"] * 12, family
        model = AutoModelForImageTextToText.from_pretrained(models(family), dtype=torch.float32)
        head_dim = vision["hidden_size"] // vision["num_heads"]
        identity = (torch.ones(len(x), head_dim), torch.zeros(len(x), head_dim))
        h = x
        with torch.no_grad():
            for blk in model.model.visual.blocks:
                h = blk(
                    h, cu_seqlens=torch.tensor([0, len(x)], dtype=torch.int32), position_embeddings=identity
                )
        torch.testing.assert_close(got["out"], h, rtol=1e-5, atol=1e-5, msg=family)
