"""``ckpt-ir verify`` with an image for the image-style families internvl (transformers' naming),
mistral3 (Pixtral: an image of any size, ``image_sizes``), llama4 (one tile, pixel shuffle) and
kimi_k25 (MoonViT: patches as [patches, channels, patch, patch] with ``image_grid_thw``, the
hub's names read through transformers' port): the unit-by-unit forward computes transformers'
``from_pretrained`` logits exactly, HF vs a Megatron layout agrees on every unit, and one changed
vision layer-1 weight diverges first at ``vision.layers.1``.  Also Llama 4's text model, which
moves its token ids to the embedding's device (meta under verify's hooks), verifies exactly."""

from __future__ import annotations

import json
import os
import shutil

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
from tests.test_families_internvl import sources  # noqa: F401  (the tiny InternVLs, built once per module)
from tests.test_families_kimi_k25 import model  # noqa: F401  (the tiny Kimi-K2.5)
from tests.test_families_vlm_more import CONFIGS, models  # noqa: F401  (tiny Mistral 3, Llama 4)
from tests.test_hf_roundtrip import convert

# each family's Megatron layout verified against its HF source: MindSpeed-MM's at TP2 PP2 with the
# vision layers split over both stages (internvl's default), Megatron-Bridge's at TP2 PP2 (mistral3),
# with the experts over EP 2 (llama4, kimi_k25); a weight of vision layer 1 in the HF checkpoint
CASES = {
    "internvl": (
        dict(mm_keys="mindspeed", tp=2, pp=2, num_layer_list=(1, 1), vision_layer_list=(1, 1)),
        "vision_tower.encoder.layer.1.mlp.fc2.weight",
    ),
    "mistral3": (dict(tp=2, pp=2), "vision_tower.transformer.layers.1.feed_forward.down_proj.weight"),
    "llama4": (dict(tp=2, pp=2, ep=2), "vision_model.model.layers.1.mlp.fc2.weight"),
    "kimi_k25": (dict(tp=2, pp=2, ep=2, mla_keys="mcore"), "vision_tower.encoder.blocks.1.mlp.fc1.weight"),
}
# the tower's units in the order they run: InternViT's embeddings (class token, patches,
# positions), layers, pixel-shuffle projector; Pixtral's patch convolution, ln_pre, layers, the
# projector with its patch merger; Llama 4's unfold embedding, layernorm_pre, layers,
# layernorm_post, pixel-shuffle adapter, projector; MoonViT's patch embedding with its position
# grid, blocks, final LayerNorm, projector
TOWER_UNITS = {
    "internvl": ["vision.patch_embed", "vision.layers.0", "vision.layers.1", "vision.shuffle_proj"],
    "mistral3": [
        "vision.patch_embed",
        "vision.pre_norm",
        "vision.layers.0",
        "vision.layers.1",
        "vision.patch_merger+projector",
    ],
    "llama4": [
        "vision.patch_embed",
        "vision.pre_norm",
        "vision.layers.0",
        "vision.layers.1",
        "vision.final_norm",
        "vision.adapter",
        "vision.projector.fc1",
    ],
    "kimi_k25": [
        "vision.patch_embed+pos_embed",
        "vision.layers.0",
        "vision.layers.1",
        "vision.final_norm",
        "vision.merger",
    ],
}


def source(family: str, sources, model, models) -> str:  # noqa: F811
    return {"internvl": lambda: sources["internvl"], "kimi_k25": lambda: model}.get(
        family, lambda: models(family)
    )()


def placeholders(family: str, cfg: dict) -> tuple[list[int], dict[str, tuple[int, ...]]]:
    """What the family's processor writes for verify's default image, from the config: the ids
    from the image's first to its last token, and each image keyword's shape."""
    v = cfg["vision_config"]
    if family == "internvl":  # one tile of image_size^2, image_seq_length tokens
        size = tuple(v["image_size"])
        return [cfg["image_token_id"]] * cfg["image_seq_length"], {"pixel_values": (1, 3, *size)}
    if family == "mistral3":  # 2 x 3 merged patches of (patch x spatial_merge_size) pixels
        unit = v["patch_size"] * cfg["spatial_merge_size"]
        shapes = {"pixel_values": (1, 3, 2 * unit, 3 * unit), "image_sizes": (1, 2)}
        return [cfg["image_token_index"]] * 6, shapes
    if family == "llama4":  # one tile; (side / patch)^2 x pixel_shuffle_ratio^2 tokens
        n = int((v["image_size"] // v["patch_size"]) ** 2 * v["pixel_shuffle_ratio"] ** 2)
        ids = [cfg["boi_token_index"], *[cfg["image_token_index"]] * n, cfg["eoi_token_index"]]
        return ids, {"pixel_values": (1, 3, v["image_size"], v["image_size"])}
    k, p = v["merge_kernel_size"][0], v["patch_size"]  # kimi_k25: 2k x 3k patches, one token per k^2
    shapes = {"pixel_values": (6 * k * k, 3, p, p), "image_grid_thw": (1, 3)}
    return [cfg["image_token_id"]] * 6, shapes


@pytest.mark.parametrize("family", sorted(CASES))
def test_verify_with_an_image_equals_transformers_and_names_a_changed_vision_layer(
    sources,  # noqa: F811
    model,  # noqa: F811
    models,  # noqa: F811
    tmp_path,
    family,
):
    """The image's placeholders and pixel tensors are what the family's processor writes; one unit
    at a time computes transformers' from_pretrained logits; HF vs the Megatron layout is exact on
    every unit; an HF copy with one vision layer-1 weight changed diverges first at vision.layers.1,
    the tower's earlier units equal."""
    from transformers import AutoModelForImageTextToText

    src = source(family, sources, model, models)
    side = hf_side(src)
    config = transformers_config(side[0])
    text = text_ids(160, 8, image_token_ids(side[0], config))
    ids, image, _ = image_inputs(side[0], config, text, None)
    want_ids, shapes = placeholders(family, json.load(open(os.path.join(src, "config.json"))))
    assert ids[0, 4 : 4 + len(want_ids)].tolist() == want_ids and ids.shape[1] == 8 + len(want_ids)
    assert {k: tuple(t.shape) for k, t in image.items()} == shapes
    out, order = run_side(side, ids, torch.float32, torch.device("cpu"), image=image)
    hf = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(out["logits"], hf(input_ids=ids, use_cache=False, **image).logits)
    del hf
    assert [n for n in order if n.startswith("vision.")] == TOWER_UNITS[family]
    assert order[-4:] == ["layer 0", "layer 1", "final norm", "logits"]

    layout, weight = CASES[family]
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", **layout))
    r = verify(src, mid)
    assert r["ok"] and r["tolerance"] == "exact" and all(row["max_abs_diff"] == 0 for row in r["rows"])
    assert [row["name"] for row in r["rows"]] == order
    changed = str(tmp_path / "changed")
    shutil.copytree(src, changed)
    f = os.path.join(changed, "model.safetensors")
    sd = load_file(f)
    sd[weight] = sd[weight] * 1.5
    save_file(sd, f, metadata={"format": "pt"})
    r = verify(mid, changed)
    assert not r["ok"] and r["first_divergent"] == "vision.layers.1", r["first_divergent"]
    rows = {row["name"]: row for row in r["rows"]}
    assert rows["vision.layers.0"]["max_abs_diff"] == 0 and not rows["logits"]["ok"]


def test_llama4_text_model_reading_its_embedding_device_verifies(tmp_path):
    """Llama4TextModel moves its token ids to embed_tokens.weight's device before the embedding
    runs; verify materialises the embedding first, so the forward is transformers' (equal logits,
    every unit finite and exact) and the units are labelled as for any decoder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama4_text", **CONFIGS["llama4"]["text_config"])
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    path = str(tmp_path / "llama4_text")
    lm.save_pretrained(path)
    ids = text_ids(cfg.vocab_size, 8, set())
    out, order = run_side(hf_side(path), ids, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(out["logits"], lm(input_ids=ids, use_cache=False).logits)
    assert order == ["embeddings", "layer 0", "layer 1", "final norm", "logits"]
    r = verify(path, path, tokens=8)
    assert r["ok"] and all(row["max_abs_diff"] == 0 for row in r["rows"])


def test_configs_transformers_reads_otherwise_are_one_line_errors(sources, model, tmp_path):  # noqa: F811
    """InternVL's remote naming (model_type internvl_chat) has no transformers config: refused,
    naming it.  Kimi-K2.5's release config (auto_map to its remote code, the tower's vt_* /
    init_pos_emb_* keys) is transformers' kimi_k25 model, built without remote code, but
    transformers reads none of those keys: the first tensor whose shape differs is named."""
    from ckpt_ir.errors import FormatError

    with pytest.raises(UsageError, match="internvl in the internvl_chat naming, which transformers"):
        verify(sources["internvl_chat"], sources["internvl"])
    release = str(tmp_path / "release")
    shutil.copytree(model, release)
    cfg = json.load(open(os.path.join(release, "config.json")))
    v = cfg["vision_config"]
    cfg["auto_map"] = {"AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration"}
    json.dump(cfg, open(os.path.join(release, "config.json"), "w"))
    assert transformers_config(hf_side(release)[0]).vision_config.hidden_size == v["hidden_size"]
    spelled = {"hidden_size": "vt_hidden_size", "pos_emb_height": "init_pos_emb_height"}
    spelled |= {"pos_emb_width": "init_pos_emb_width"}
    cfg["vision_config"] = {spelled.get(k, k): x for k, x in v.items()}
    json.dump(cfg, open(os.path.join(release, "config.json"), "w"))
    grid = ", ".join(str(v[k]) for k in ("pos_emb_height", "pos_emb_width", "hidden_size"))
    with pytest.raises(FormatError, match=rf"position_embeddings: the checkpoint's is \[{grid}\] but"):
        verify(release, release)
