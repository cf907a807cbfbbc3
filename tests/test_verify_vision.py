"""``ckpt-ir verify`` on vision-language models (qwen2_5_vl, qwen2_vl, gemma3, and the patch-row
towers of qwen3_vl, qwen3_vl_moe, qwen3_5_vl, qwen3_5_vl_moe, glm4v, glm4v_moe): both sides run
token ids around one generated image, laid out as the family's processor lays out a real one
(``Tower.image``), the tower compared unit by unit (patch embedding, each block, DeepStack merger,
merger or projector) like the language model's layers.

The oracle for the forward is transformers' own ``from_pretrained`` + forward on the same inputs;
the Megatron sides are ``ckpt-ir convert``'s Megatron-Bridge and MindSpeed-MM layouts."""

from __future__ import annotations

import json
import os
import shutil

import attrs
import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from ckpt_ir.commands.verify import (
    hf_side,
    image_inputs,
    image_token_ids,
    run_side,
    text_ids,
    transformers_config,
    verify,
)
from ckpt_ir.errors import UsageError
from tests.cli_contract import cli
from tests.test_families_glm4v import build as build_glm
from tests.test_families_qwen3vl import build as build_qwen3
from tests.test_families_qwen35vl import CONFIGS as QWEN35_CONFIGS
from tests.test_families_qwen35vl import add_mtp_layer
from tests.test_families_vlm import MM
from tests.test_families_vlm import build as build_vlm
from tests.test_hf_roundtrip import convert

# each family's tiny model (hidden 64, a tower 32 wide, 2 vision layers): its test module's builder
# and model_type; Qwen3.5's with the hub's MTP layer (mtp.*, which transformers ignores) and its
# gated-delta-net norm where megatron-core's zero-centred form is exact (add_mtp_layer)
BUILDERS = {
    **{f: (build_vlm, f) for f in ("qwen2_5_vl", "qwen2_vl", "gemma3")},
    **{f: (build_qwen3, f) for f in ("qwen3_vl", "qwen3_vl_moe")},
    **{
        f: (lambda path, model_type: add_mtp_layer(build_qwen3(path, model_type, QWEN35_CONFIGS)), m)
        for f, m in (("qwen3_5_vl", "qwen3_5"), ("qwen3_5_vl_moe", "qwen3_5_moe"))
    },
    **{f: (build_glm, f) for f in ("glm4v", "glm4v_moe")},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> the directory of its tiny HF model, built once per module."""
    root = tmp_path_factory.mktemp("vlms")
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            builder, model_type = BUILDERS[family]
            cache[family] = str(root / family)
            builder(cache[family], model_type)
        return cache[family]

    return get


# the tower's units of each family, in the order they run (Qwen: patch embedding, blocks, merger;
# SigLIP: embeddings with positions, layers, post-layernorm, then Gemma 3's projector)
TOWER_UNITS = {
    "qwen2_5_vl": ["vision.patch_embed", "vision.layers.0", "vision.layers.1", "vision.merger"],
    "qwen2_vl": ["vision.patch_embed", "vision.layers.0", "vision.layers.1", "vision.merger"],
    "gemma3": [
        "vision.patch_embed+pos_embed",
        "vision.layers.0",
        "vision.layers.1",
        "vision.final_norm",
        "vision.projector",
    ],
    # Qwen3-VL: learned positions (interpolated to the grid), then after each block listed in
    # deepstack_visual_indexes ([1, 0]; Qwen3-VL-MoE's [1]) its DeepStack merger, named by the layer
    # it reads
    "qwen3_vl": [
        "vision.patch_embed",
        "vision.pos_embed",
        "vision.layers.0",
        "vision.layers.0.deepstack",
        "vision.layers.1",
        "vision.layers.1.deepstack",
        "vision.merger",
    ],
    "qwen3_vl_moe": [
        "vision.patch_embed",
        "vision.pos_embed",
        "vision.layers.0",
        "vision.layers.1",
        "vision.layers.1.deepstack",
        "vision.merger",
    ],
    **{
        f: ["vision.patch_embed", "vision.pos_embed", "vision.layers.0", "vision.layers.1", "vision.merger"]
        for f in ("qwen3_5_vl", "qwen3_5_vl_moe")
    },
    # GLM-4.1V: a norm after the patch convolution, positions, blocks, the final norm, the
    # downsampling convolution that merges patches, the merger
    **{
        f: [
            "vision.patch_embed",
            "vision.patch_norm",
            "vision.pos_embed",
            "vision.layers.0",
            "vision.layers.1",
            "vision.final_norm",
            "vision.downsample",
            "vision.merger",
        ]
        for f in ("glm4v", "glm4v_moe")
    },
}
# the Megatron layouts verified against the HF source: Megatron-Bridge's at TP2 PP2 (every family)
# and MindSpeed-MM's at TP2 PP2 with the tower split over both stages (the Qwen families)
LAYOUTS = {
    "qwen2_5_vl": (dict(tp=2, pp=2), dict(MM, tp=2, pp=2, num_layer_list=(1, 1), vision_layer_list=(1, 1))),
    "qwen2_vl": (dict(tp=2, pp=2), dict(MM, tp=2, pp=2, num_layer_list=(1, 1), vision_layer_list=(1, 1))),
    "gemma3": (dict(tp=2, pp=2),),
    "qwen3_vl": (
        dict(tp=2, pp=2, num_layer_list=(2, 1)),
        dict(MM, tp=2, pp=2, num_layer_list=(2, 1), vision_layer_list=(1, 1)),
    ),
    "qwen3_vl_moe": (dict(tp=2, pp=2), dict(MM, tp=2, pp=2, vision_layer_list=(1, 1))),
    "qwen3_5_vl": (dict(tp=2, pp=2),),
    "qwen3_5_vl_moe": (dict(tp=2, pp=2),),
    "glm4v": (dict(tp=2, pp=2), dict(MM, tp=2, pp=2, vision_layer_list=(1, 1))),
    "glm4v_moe": (dict(tp=2, pp=2),),
}
# a weight of vision layer 1 of each family's HF checkpoint
LAYER1_WEIGHT = {
    "qwen2_5_vl": "visual.blocks.1.mlp.down_proj.weight",
    "qwen2_vl": "visual.blocks.1.mlp.fc2.weight",
    "gemma3": "vision_tower.encoder.layers.1.mlp.fc2.weight",
    **{f: "model.visual.blocks.1.mlp.linear_fc2.weight" for f in ("qwen3_vl", "qwen3_vl_moe")},
    **{f: "model.visual.blocks.1.mlp.linear_fc2.weight" for f in ("qwen3_5_vl", "qwen3_5_vl_moe")},
    **{f: "model.visual.blocks.1.mlp.down_proj.weight" for f in ("glm4v", "glm4v_moe")},
}


def report(*args: object) -> tuple[int, dict]:
    r = cli("verify", *args, "--json")
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


@pytest.mark.parametrize("family", sorted(TOWER_UNITS))
def test_unit_by_unit_forward_with_an_image_equals_transformers_forward(models, family):
    """Materialising one unit at a time (the tower's included) computes transformers' logits on the
    same token ids and image, and the image's placeholders are what the processor would write."""
    from transformers import AutoModelForImageTextToText

    path = models(family)
    side = hf_side(path)
    config = transformers_config(side[0])
    text = text_ids(160, 8, image_token_ids(side[0], config))
    ids, image, _ = image_inputs(side[0], config, text, None)
    cfg = json.load(open(os.path.join(path, "config.json")))
    v = cfg["vision_config"]
    if family == "gemma3":  # mm_tokens_per_image between <start_of_image> and <end_of_image>
        placeholders = [cfg["boi_token_index"]] + [cfg["image_token_index"]] * cfg["mm_tokens_per_image"]
        placeholders.append(cfg["eoi_token_index"])
        assert image["pixel_values"].shape == (1, 3, v["image_size"], v["image_size"])
        assert torch.equal(image["token_type_ids"], (ids == cfg["image_token_index"]).long())
    else:  # a 2 x 3 grid of merged patches: 4 x 6 patches of channels x frames x patch^2 values
        merge, patch = v["spatial_merge_size"], v["patch_size"]
        # between <|vision_start|> and <|vision_end|>; GLM-4.1V's <|begin_of_image|>, <|end_of_image|>
        around = "image" if family.startswith("glm4v") else "vision"
        placeholders = [cfg[f"{around}_start_token_id"], *[cfg["image_token_id"]] * 6]
        placeholders.append(cfg[f"{around}_end_token_id"])
        assert image["image_grid_thw"].tolist() == [[1, 2 * merge, 3 * merge]]
        assert image["pixel_values"].shape == (24, 3 * v["temporal_patch_size"] * patch**2)
        assert torch.equal(image["mm_token_type_ids"], (ids == cfg["image_token_id"]).long())
    assert ids[0, 4 : 4 + len(placeholders)].tolist() == placeholders and ids.shape[1] == 8 + len(
        placeholders
    )
    out, order = run_side(side, ids, torch.float32, torch.device("cpu"), image=image)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False, **image).logits
    assert torch.equal(out["logits"], want)
    tower = TOWER_UNITS[family]
    layers = cfg["text_config"]["num_hidden_layers"]
    assert order == ["embeddings", *tower, *(f"layer {i}" for i in range(layers)), "final norm", "logits"]


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_hf_vs_megatron_passes_and_a_changed_vision_weight_names_its_layer(models, tmp_path, family):
    """HF vs each Megatron layout agrees exactly on every unit; an HF copy with one vision layer-1
    weight changed diverges first at vision.layers.1 (exit 1), the tower's earlier units equal."""
    src = models(family)
    for n, layout in enumerate(LAYOUTS[family]):
        mid = str(tmp_path / f"mid{n}")
        convert(src, mid, ck.Target(to="mcore", **layout))
        r = verify(src, mid)
        assert r["ok"] and r["tolerance"] == "exact", layout
        names = [row["name"] for row in r["rows"]]
        assert set(TOWER_UNITS[family]) <= set(names) and all(row["max_abs_diff"] == 0 for row in r["rows"])
        # Qwen3.5's MTP layer (top-level mtp.*) has no transformers module: reported, not an error
        assert bool(r["not_compared"]) == family.startswith("qwen3_5"), r["not_compared"]
    changed = str(tmp_path / "changed")
    shutil.copytree(src, changed)
    f = os.path.join(changed, "model.safetensors")
    sd = load_file(f)
    sd[LAYER1_WEIGHT[family]] = sd[LAYER1_WEIGHT[family]] * 1.5
    save_file(sd, f, metadata={"format": "pt"})
    if family == "qwen2_5_vl":  # the command's exit code and JSON report, once
        code, r = report(mid, changed)
        assert code == 1
    else:
        r = verify(mid, changed)
    assert not r["ok"] and r["first_divergent"] == "vision.layers.1", r["first_divergent"]
    names = [row["name"] for row in r["rows"]]
    before = r["rows"][: names.index("vision.layers.1")]  # embeddings, tower units up to layer 0's
    assert "vision.layers.0" in names[: len(before)] and all(row["max_abs_diff"] == 0 for row in before)
    assert not r["rows"][-1]["ok"]  # the logits


def test_a_bf16_cast_passes_within_the_dtype_tolerance(models, tmp_path):
    """The tower's dtype is no model difference: an fp32 source and its bf16 cast are one model,
    every unit within 16 bf16 epsilons of its largest value."""
    qwen = models("qwen2_vl")
    cast = str(tmp_path / "bf16")
    convert(qwen, cast, ck.Target(to="hf", dtype="bf16"))
    r = verify(qwen, cast)
    assert r["ok"] and r["dtypes"] == ["F32", "BF16"] and r["tolerance"].startswith("0.125 x max|h|")
    assert 0 < max(row["max_abs_diff"] for row in r["rows"] if row["name"].startswith("vision."))


def test_image_requests_are_one_line_errors(models, monkeypatch):
    """A size the tower cannot take, an image token in the prompt, and a family whose image inputs
    verify cannot build are refused, each naming what to do; a size it can take sets the grid."""
    qwen, gemma = models("qwen2_5_vl"), models("gemma3")
    r = cli("verify", qwen, qwen, "--image-size", "16,20")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "16x20 is not a whole number of 8x8-pixel merged patches" in r.stderr
    cases = (
        ((gemma, dict(image_size=(32, 32))), "takes 16x16 images only"),
        ((qwen, dict(prompt_ids=(5, 150, 7))), "holds an image token id"),
        ((qwen, dict(image_size=(16,))), "takes the height and width, H,W"),
        # GLM-4.1V: one placeholder per spatial_merge_size^2 patches (its downsample_size)
        (
            (models("glm4v"), dict(image_size=(8, 12))),
            r"8x12 is not .* 8x8-pixel .* \(glm4v: patch 4, merge 2\)",
        ),
    )
    for (path, kwargs), message in cases:
        with pytest.raises(UsageError, match=message):
            verify(path, path, **kwargs)
    # 24 x 16 pixels in 4-pixel patches are 6 x 4 patches, 6 placeholders between start and end
    r = verify(qwen, qwen, image_size=(24, 16), tokens=4)
    assert r["ok"] and r["tokens"] == 4 + 6 + 2
    assert "image_grid_thw [1, 6, 4]" in r["image"] and "pixel_values [24, 96]" in r["image"]
    # a tower without an image description (a family being added): refused, naming it
    from ckpt_ir.families import _REGISTRY

    fam = _REGISTRY["qwen2_5_vl"]
    bare = attrs.evolve(fam, towers=tuple(attrs.evolve(t, image=None) for t in fam.towers))
    monkeypatch.setitem(_REGISTRY, "qwen2_5_vl", bare)
    with pytest.raises(UsageError, match="qwen2_5_vl is a vision-language model whose image inputs verify"):
        verify(qwen, qwen)
