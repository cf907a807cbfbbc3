"""Vision-language families mistral3 (a Pixtral tower, a projector with a patch merger, a mistral
language model) and llama4 (Llama 4's vision model, a one-layer projector, the llama4_text
language model with its experts): HF -> Megatron-Core -> HF is bit-exact with every side file back
byte for byte, and transformers' logits on text plus a generated image are equal.  The rank files
hold Megatron-Bridge's layout: ``language_model.*`` a GPTModel's keys, the tower and projector
under their HF names, whole on every TP rank of pipeline stage 0 and nowhere else
(Megatron-Bridge ``ministral3/ministral3_bridge.py`` 178-186, ``modeling_ministral3.py`` 117-157;
llama4, which Megatron-Bridge lacks, takes the same rule)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import ckpt_ir.api as ck
from tests.family_models import build_vlm, image_logits, model_cache
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=160,
    num_hidden_layers=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    # Pixtral tower 32 wide (the language model 64), patches of 4 pixels, merged 2 x 2, projector
    # biases; the top level's tie_word_embeddings (True) over text_config's (False) says the
    # embeddings are tied, as transformers reads it
    "mistral3": dict(
        text_config=dict(TEXT, model_type="mistral", sliding_window=None, tie_word_embeddings=False),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
            head_dim=8,
        ),
        spatial_merge_size=2,
        multimodal_projector_bias=True,
        image_token_index=150,
    ),
    # Llama 4: layer 1 a MoE layer (4 experts and a shared one), untied; a tower of 16 x 16
    # pixels in 4 x 4 patches (16 positions and the class embedding), pixel shuffle 0.5 (its MLP
    # input 4 x 32 = intermediate_size), adapter 48 wide, projector 48 -> 64
    "llama4": dict(
        text_config=dict(
            TEXT,
            intermediate_size=32,
            intermediate_size_mlp=80,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=2,
            attention_bias=True,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            pixel_shuffle_ratio=0.5,
            projector_input_dim=48,
            projector_output_dim=48,
            vision_output_dim=48,
        ),
        image_token_index=150,
        boi_token_index=151,
        eoi_token_index=152,
    ),
}
# each family's Megatron-Bridge layouts: TP alone, and TP with PP (the tower on stage 0); llama4's
# experts over EP 2 beside them (its MoE layer on stage 1)
LAYOUTS: dict[str, tuple[dict, ...]] = {
    "mistral3": (dict(tp=1), dict(tp=2), dict(tp=2, pp=2)),
    "llama4": (dict(tp=1), dict(tp=2, pp=2, ep=2)),
}
# the HF prefixes of the language model; every other tensor is the tower's or the projector's
TEXT_PREFIX = "language_model."
SIDE_FILES = {
    "mistral3": {
        "preprocessor_config.json": '{"image_processor_type": "PixtralImageProcessor",  "patch_size": 4,'
        ' "size": {"longest_edge": 32}}',
        "processor_config.json": '{"processor_class": "PixtralProcessor", "spatial_merge_size": 2}\n\n',
        "tokenizer_config.json": '{"model_max_length": 128, "padding_side":"left"}',
    },
    "llama4": {
        "preprocessor_config.json": '{"image_processor_type": "Llama4ImageProcessor",  "size": {"height": 16,'
        ' "width": 16}, "max_patches": 1}',
        "processor_config.json": '{"processor_class": "Llama4Processor", "patch_size": 4}\n\n',
        "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
    },
}
# a weight of each tower, scaled to show that the image reaches the logits
TOWER_WEIGHT = {
    "mistral3": "vision_tower.transformer.layers.1.feed_forward.down_proj.weight",
    "llama4": "vision_model.model.layers.1.mlp.fc2.weight",
}


def build(path: str, model_type: str) -> str:
    """A tiny model built and saved by transformers, every parameter random, with side files."""
    return build_vlm(path, model_type, CONFIGS[model_type], SIDE_FILES[model_type])


def vl_inputs(cfg: dict) -> dict[str, torch.Tensor]:
    """Token ids around one generated image: Mistral 3's of 16 x 24 pixels (4 x 6 patches, 2 x 3
    merged tokens, its size in image_sizes); Llama 4's one tile of image_size^2 pixels,
    (image_size / patch)^2 x pixel_shuffle_ratio^2 tokens between its begin / end tokens."""
    v, image = cfg["vision_config"], cfg["image_token_index"]
    gen = torch.Generator().manual_seed(0)
    if cfg["model_type"] == "mistral3":
        h, w, m = 16, 24, cfg["spatial_merge_size"] * v["patch_size"]
        ids = torch.tensor([[5, 7] + [image] * ((h // m) * (w // m)) + [9, 11, 13]])
        pixels = torch.randn((1, v["num_channels"], h, w), generator=gen)
        return dict(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[h, w]]))
    n = int((v["image_size"] // v["patch_size"]) ** 2 * v["pixel_shuffle_ratio"] ** 2)
    ids = torch.tensor([[5, 7, cfg["boi_token_index"]] + [image] * n + [cfg["eoi_token_index"], 9, 11]])
    pixels = torch.randn((1, v["num_channels"], v["image_size"], v["image_size"]), generator=gen)
    return dict(input_ids=ids, pixel_values=pixels)


def vl_logits(path: str, scale: str | None = None) -> torch.Tensor:
    """transformers' logits on text + image (``scale``: an HF weight multiplied by 1.5 first)."""
    return image_logits(path, vl_inputs, scale)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "vlm_more", build)


def rank_files(mid: str) -> dict[tuple[int, int], list[dict]]:
    """(TP rank, pipeline stage) -> the model state of each rank directory there (one per EP rank)."""
    out: dict[tuple[int, int], list[dict]] = {}
    it = os.path.join(mid, "iter_0000001")
    for d in sorted(os.listdir(it)):
        m = re.fullmatch(r"mp_rank_(\d\d)(?:_(\d\d\d))?(?:_(\d\d\d))?", d)
        assert m, d
        sd = torch.load(os.path.join(it, d, "model_optim_rng.pt"), weights_only=False)["model"]
        out.setdefault((int(m[1]), int(m[2] or 0)), []).append(sd)
    return out


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_hf_to_mcore_to_hf_bit_exact_with_same_image_logits(models, tmp_path, family):
    src = models(family)
    ckpt = ck.load(src)
    assert ckpt.spec.family == family and ckpt.spec.vision is not None
    want = vl_logits(src)
    # the image reaches the logits: one changed tower weight changes them
    assert not torch.equal(vl_logits(src, scale=TOWER_WEIGHT[family]), want)
    hf = hf_state(src)
    tower = {k for k in hf if not k.startswith(TEXT_PREFIX)}
    cfg = json.load(open(f"{src}/config.json"))
    # the embeddings are tied where the top level says so (mistral3 here: no lm_head saved)
    assert ("language_model.lm_head.weight" not in hf) == cfg["tie_word_embeddings"]
    for n, layout in enumerate(LAYOUTS[family]):
        mid, back = str(tmp_path / f"mid{n}"), str(tmp_path / f"back{n}")
        convert(src, mid, ck.Target(to="mcore", **layout))
        convert(mid, back, ck.Target(to="hf"))
        assert_same_tensors(src, back)
        for name in SIDE_FILES[family]:
            assert open(f"{back}/{name}", "rb").read() == open(f"{src}/{name}", "rb").read(), name
        assert json.load(open(f"{back}/config.json")) == cfg
        assert torch.equal(vl_logits(back), want), layout
        # Megatron-Bridge's layout: the tower and projector whole under their HF names on every
        # rank of stage 0 (each TP and EP rank), nowhere else
        files = rank_files(mid)
        assert sorted(files) == [(t, p) for t in range(layout["tp"]) for p in range(layout.get("pp", 1))]
        for (t, p), sds in files.items():
            assert len(sds) == layout.get("ep", 1)
            for sd in sds:
                keys = {k for k in sd if not k.startswith("language_model.")}
                assert keys == (tower if p == 0 else set()), (t, p)
                for k in keys:
                    assert torch.equal(sd[k], hf[k]), k
                assert any(k.startswith("language_model.decoder.layers.") for k in sd), (t, p)


@pytest.mark.parametrize(
    "text_type,given,head_dim",
    [("mistral", {}, 64 // 4), ("ministral3", {}, 128), ("ministral3", {"head_dim": None}, 64 // 4)],
)
def test_mistral3_head_dim_when_text_config_lacks_it(text_type, given, head_dim):
    """A text_config without head_dim takes its own class's default: MistralConfig's hidden /
    heads, Ministral3Config's 128 when the key is absent and hidden / heads when it is null
    (configuration_mistral.py 68, 83; configuration_ministral3.py 79, 108)."""
    from ckpt_ir.families import by_name

    text = {k: v for k, v in CONFIGS["mistral3"]["text_config"].items() if k != "head_dim"}
    text = dict(text, model_type=text_type, **given)
    cfg = dict(CONFIGS["mistral3"], model_type="mistral3", text_config=text)
    cfg["vision_config"] = dict(cfg["vision_config"], hidden_act="gelu", num_channels=3)
    assert by_name("mistral3").spec_from_config(cfg).head_dim == head_dim
