"""Vision-language families (qwen2_5_vl, qwen2_vl, gemma3): a language model and a vision tower in one
checkpoint.  HF -> HF (a dtype cast) and HF -> Megatron-Core -> HF are bit-exact with every side file
(processor, chat template, tokenizer config) back byte for byte, and transformers' logits on text
plus a generated image are equal; the Megatron rank files hold Megatron-Bridge's layout
(``language_model.*`` with Transformer Engine's norm names, the tower as transformers' ``visual.*``
whole on every TP rank of pipeline stage 0: Megatron-Bridge ``qwen_vl/qwen25_vl_bridge.py``
mapping_registry and ``modeling_qwen25_vl.py``, which builds ``visual`` where ``pre_process``; for
gemma3 the SigLIP tower as transformers' ``vision_tower.*`` and the projector in Bridge's own module,
its weight transposed and split over TP: ``gemma_vl/gemma3_vl_bridge.py`` 119-127, 137)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.family_models import build_vlm, image_logits, model_cache, rank
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    num_hidden_layers=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    # M-RoPE over (temporal, height, width): sections sum to head_dim / 2
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
)
# patch 4, temporal patch 2, 2x2 merge; the tower narrower than the language model (32 vs 64)
VISION = dict(depth=2, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
TOKENS = dict(image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
CONFIGS = {
    # window attention in layer 0, full attention in layer 1 (window 8 pixels: 1 merged patch)
    "qwen2_5_vl": dict(
        text_config=TEXT,
        vision_config=dict(
            VISION,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
            window_size=8,
        ),
        **TOKENS,
    ),
    # Qwen2-VL's tower: embed_dim wide, an MLP mlp_ratio x wider, LayerNorms; hidden_size is the
    # language model's (the merger's output)
    "qwen2_vl": dict(
        text_config=TEXT, vision_config=dict(VISION, embed_dim=32, mlp_ratio=2, hidden_size=64), **TOKENS
    ),
    # Gemma 3: a gemma3_text language model (sliding window 8 in layer 0, q/k norms, sandwich norms,
    # tied embeddings); a SigLIP tower of 16 x 16 pixels in 4 x 4 patches (16 positions) without the
    # pooling head, as the hub's (vision_use_head defaults to True: test_gemma3_pooling_head_is_carried),
    # pooled 2 x 2 to mm_tokens_per_image 4
    "gemma3": dict(
        text_config=dict(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=160,
            num_hidden_layers=2,
            max_position_embeddings=128,
            sliding_window=8,
            query_pre_attn_scalar=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            vision_use_head=False,
        ),
        mm_tokens_per_image=4,
        image_token_id=150,
        boi_token_index=151,
        eoi_token_index=152,
    ),
}
# MindSpeed-MM's layout (text_decoder.*, image_encoder.*, a layer count per module and stage)
MM = dict(mm_keys="mindspeed")
# the Megatron layouts each family goes through (and back): Megatron-Bridge's at TP, and PP with
# the tower on stage 0; MindSpeed-MM's with the tower on stage 0 or split, and a first stage that
# holds no language-model layer (its converter loses the last layers there)
LAYOUTS: dict[str, tuple[dict, ...]] = {
    "qwen2_5_vl": (
        dict(tp=1),
        dict(tp=2),
        dict(tp=2, pp=2),
        dict(MM, tp=2, pp=2, num_layer_list=(1, 1), vision_layer_list=(2, 0)),
        dict(MM, pp=3, num_layer_list=(0, 1, 1), vision_layer_list=(2, 0, 0)),
    ),
    "qwen2_vl": (
        dict(tp=1),
        dict(tp=2, pp=2),
        dict(MM, tp=2, pp=2, num_layer_list=(1, 1), vision_layer_list=(1, 1)),
        dict(mm_keys="mindspeed-canonical", tp=2, pp=2, num_layer_list=(1, 1), vision_layer_list=(1, 1)),
    ),
    "gemma3": (dict(tp=1), dict(tp=2), dict(tp=2, pp=2)),
}
# Megatron-Bridge's keys of Gemma 3's projector (gemma3_vl_bridge.py 137, 152-156): key -> (HF
# name, transposed); the rest of its tower keeps the HF names
BRIDGE_OWN = {
    "gemma3": {
        "multi_modal_projector.mm_soft_embed_norm.weight": (
            "multi_modal_projector.mm_soft_emb_norm.weight",
            False,
        ),
        "multi_modal_projector.proj.weight": ("multi_modal_projector.mm_input_projection_weight", True),
    }
}
# side files a released Qwen2-VL directory carries, in both generations of transformers' names;
# odd spacing and no final newline, so a rewrite would show
SIDE_FILES = {
    "preprocessor_config.json": '{"image_processor_type": "Qwen2VLImageProcessor",  "patch_size": 4,'
    ' "merge_size": 2, "temporal_patch_size": 2}',
    "video_preprocessor_config.json": '{"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 4}',
    "processor_config.json": '{"processor_class": "Qwen2_5_VLProcessor"}\n\n',
    "chat_template.json": '{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}',
    "tokenizer_config.json": '{"model_max_length": 128, "padding_side":"left"}',
}
GEMMA3_SIDE_FILES = {
    "preprocessor_config.json": '{"image_processor_type": "Gemma3ImageProcessor",  "size": {"height": 16,'
    ' "width": 16}}',
    "processor_config.json": '{"processor_class": "Gemma3Processor", "image_seq_length": 4}\n\n',
    "tokenizer_config.json": '{"model_max_length": 128, "padding_side":"left"}',
}


def side_files(path: str) -> dict[str, str]:
    cfg = json.load(open(os.path.join(path, "config.json")))
    return GEMMA3_SIDE_FILES if cfg["model_type"] == "gemma3" else SIDE_FILES


# an image of 4 x 6 patches (one frame): 24 patch rows, 6 merged tokens
GRID = (1, 4, 6)


def build(path: str, model_type: str, config: dict | None = None) -> str:
    """A tiny model of ``model_type`` (``config``, default CONFIGS') built and saved by transformers,
    every parameter random, with its side files."""
    files = GEMMA3_SIDE_FILES if model_type == "gemma3" else SIDE_FILES
    return build_vlm(path, model_type, config or CONFIGS[model_type], files)


def patch_inputs(
    cfg: dict, start: str = "vision_start_token_id", end: str = "vision_end_token_id"
) -> dict[str, torch.Tensor]:
    """Token ids around one generated image of GRID patches between the ids of config keys
    ``start`` and ``end`` (pixel rows and grid as Qwen2VLImageProcessor lays them out: one row of
    channels x frames x patch^2 per patch, one placeholder per spatial_merge_size^2 patches)."""
    v = cfg["vision_config"]
    t, h, w = GRID
    width = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    pixels = torch.randn(t * h * w, width, generator=torch.Generator().manual_seed(0))
    image = cfg["image_token_id"]
    ids = [5, 7, cfg[start]] + [image] * (t * h * w // v["spatial_merge_size"] ** 2)
    ids = torch.tensor([ids + [cfg[end], 9, 11, 13]])
    return dict(
        input_ids=ids,
        pixel_values=pixels,
        image_grid_thw=torch.tensor([GRID]),
        mm_token_type_ids=(ids == image).long(),
    )


def config_inputs(cfg: dict) -> dict[str, torch.Tensor]:
    """Token ids around one generated image for the model of config ``cfg``: Gemma 3's one image of
    image_size^2 pixels (mm_tokens_per_image placeholders), else Qwen's patches."""
    if cfg["model_type"] != "gemma3":
        return patch_inputs(cfg)
    v, image = cfg["vision_config"], cfg["image_token_index"]
    ids = [5, 7, cfg["boi_token_index"]] + [image] * cfg["mm_tokens_per_image"]
    ids = torch.tensor([ids + [cfg["eoi_token_index"], 9, 11, 13]])
    size = (1, v["num_channels"], v["image_size"], v["image_size"])
    pixels = torch.randn(size, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == image).long())


def vl_inputs(path: str) -> dict[str, torch.Tensor]:
    return config_inputs(json.load(open(os.path.join(path, "config.json"))))


def vl_logits(path: str, scale: str | None = None) -> torch.Tensor:
    return image_logits(path, config_inputs, scale)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "vlm", build)


def assert_side_files(src: str, out: str) -> None:
    for name in side_files(src):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(src, name), "rb").read(), name


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_hf_to_mcore_to_hf_bit_exact_with_same_image_logits(models, tmp_path, family):
    src = models(family)
    ckpt = ck.load(src)
    assert ckpt.spec.family == family and ckpt.spec.vision is not None
    want = vl_logits(src)
    hf = hf_state(src)
    own = BRIDGE_OWN.get(family, {})
    mine = {hf_name for hf_name, _ in own.values()}
    text = ("model.", "lm_head.", "language_model.")
    visual = {k for k in hf if not k.startswith(text) and k not in mine} | set(own)
    for n, layout in enumerate(LAYOUTS[family]):
        mid, back = str(tmp_path / f"mid{n}"), str(tmp_path / f"back{n}")
        convert(src, mid, ck.Target(to="mcore", **layout))
        convert(mid, back, ck.Target(to="hf"))
        assert_same_tensors(src, back)
        assert_side_files(src, back)
        assert torch.equal(vl_logits(back), want), layout
        assert (
            json.load(open(f"{back}/config.json"))["vision_config"]
            == json.load(open(f"{src}/config.json"))["vision_config"]
        )
        if layout.get("mm_keys") == "mindspeed":
            assert_mindspeed_mm_files(mid, hf, layout, json.load(open(f"{src}/config.json")))
            continue
        if layout.get("mm_keys") == "mindspeed-canonical":
            assert_canonical_files(
                mid, hf, layout["tp"], layout["num_layer_list"], layout["vision_layer_list"]
            )
            continue
        # Megatron-Bridge's layout: the tower whole on every TP rank of stage 0, nowhere else
        for t in range(layout["tp"]):
            for p in range(layout.get("pp", 1)):
                sd = rank(mid, f"mp_rank_{t:02d}" + (f"_{p:03d}" if layout.get("pp", 1) > 1 else ""))["model"]
                keys = {k for k in sd if not k.startswith("language_model.")}
                assert keys == (visual if p == 0 else set()), (t, p)
                for k in keys:
                    hf_name, transposed = own.get(k, (k, False))
                    want_k = hf[hf_name].T.chunk(layout["tp"])[t] if transposed else hf[hf_name]
                    assert torch.equal(sd[k], want_k), k
                qkv_norm = "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
                assert qkv_norm in sd, (t, p)


def assert_mindspeed_mm_files(mid: str, hf: dict, layout: dict, cfg: dict) -> None:
    """MindSpeed-MM's files (its checkpoint/vlm_model/hf_to_mm.py and converters/qwen2vl.py):
    release/, no args; each module's layers where its list puts them, numbered from 0 on each
    stage, its first / last tensors on its first / last stage with layers; the tower's qkv one head
    after another ([q_h; k_h; v_h], its RelocateOp), split over TP by whole heads."""
    assert open(f"{mid}/latest_checkpointed_iteration.txt").read() == "release"
    tp, pp = layout.get("tp", 1), layout["pp"]
    vision = cfg["vision_config"]
    heads, width = vision["num_heads"], vision.get("embed_dim") or vision["hidden_size"]
    modules = (
        (
            "text_decoder.decoder.layers.",
            layout["num_layer_list"],
            "text_decoder.embedding.",
            "text_decoder.output_layer.",
        ),
        (
            "image_encoder.encoder.blocks.layers.",
            layout["vision_layer_list"],
            "image_encoder.encoder.patch_embed.",
            "image_encoder.projector.",
        ),
    )
    # vision layer 1: on the stage its list puts it, as the stage's own layer number
    counts = layout["vision_layer_list"]
    stage = next(p for p in range(pp) if sum(counts[: p + 1]) > 1)
    key = f"image_encoder.encoder.blocks.layers.{1 - sum(counts[:stage])}.self_attention.linear_qkv.weight"
    qkv, d = hf["visual.blocks.1.attn.qkv.weight"], width // heads
    per_head = torch.cat([qkv[part * width + h * d :][:d] for h in range(heads) for part in range(3)])
    for t in range(tp):
        models = {}
        for p in range(pp):
            obj = torch.load(f"{mid}/release/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt", weights_only=False)
            assert list(obj) == ["model", "checkpoint_version"] and obj["checkpoint_version"] == 3.0
            models[p] = obj["model"]
        for prefix, counts, first, last in modules:
            filled = [p for p, n in enumerate(counts) if n]
            for p, sd in models.items():
                assert {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)} == set(
                    range(counts[p])
                ), (prefix, p)
                assert any(k.startswith(first) for k in sd) == (p == filled[0]), (first, p)
                assert any(k.startswith(last) for k in sd) == (p == filled[-1]), (last, p)
        assert torch.equal(models[stage][key], per_head.chunk(tp)[t])


# MindSpeed-MM's canonical layout (enable_canonical_hf_struct; checkpoint/vlm_model/converters/
# qwen2vl.py:16-149, qwen2_5vl.py:36-47, 103-111): HF name below the layer -> (its key below the
# layer, how TP rank r's tensor is cut from the HF one): "rows" / "cols" in TP equal blocks,
# "qkv" [q_r; k_r; v_r] of HF's [q; k; v] (what MindSpeed-MM's canonical attention reads,
# mindspeed_mm/patchs/canonical_layer_patch.py:344-353; its converter cuts plain rows), else whole
CANONICAL_TEXT = {
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "post_attention_layernorm.weight": ("pre_mlp_layernorm.weight", None),
    **{
        f"self_attn.{p}_proj.{k}": (f"self_attention.{p}_proj.{k}", "rows")
        for p in "qkv"
        for k in ("weight", "bias")
    },
    "self_attn.o_proj.weight": ("self_attention.linear_proj.weight", "cols"),
    "mlp.gate_proj.weight": ("mlp.gate_proj.weight", "rows"),
    "mlp.up_proj.weight": ("mlp.up_proj.weight", "rows"),
    "mlp.down_proj.weight": ("mlp.linear_fc2.weight", "cols"),
}
CANONICAL_VISION = {
    **{
        f"norm{n}.{k}": (f"{m}.{k}", None)
        for n, m in ((1, "input_layernorm"), (2, "pre_mlp_layernorm"))
        for k in ("weight", "bias")
    },
    "attn.qkv.weight": ("self_attention.linear_qkv.weight", "qkv"),
    "attn.qkv.bias": ("self_attention.linear_qkv.bias", "qkv"),
    "attn.proj.weight": ("self_attention.linear_proj.weight", "cols"),
    "attn.proj.bias": ("self_attention.linear_proj.bias", None),
    **{
        f"mlp.{p}_proj.{k}": (f"mlp.{p}_proj.{k}", "rows") for p in ("gate", "up") for k in ("weight", "bias")
    },
    "mlp.down_proj.weight": ("mlp.linear_fc2.weight", "cols"),
    "mlp.down_proj.bias": ("mlp.linear_fc2.bias", None),
    "mlp.fc1.weight": ("mlp.linear_fc1.weight", "rows"),
    "mlp.fc1.bias": ("mlp.linear_fc1.bias", "rows"),
    "mlp.fc2.weight": ("mlp.linear_fc2.weight", "cols"),
    "mlp.fc2.bias": ("mlp.linear_fc2.bias", None),
}
# the rest: HF name -> (key, cut, first or last stage holding the module's layers)
CANONICAL_OTHER = {
    "model.embed_tokens.weight": ("text_decoder.embedding.word_embeddings.weight", "rows", "first"),
    "model.norm.weight": ("text_decoder.decoder.final_layernorm.weight", None, "last"),
    "lm_head.weight": ("text_decoder.output_layer.weight", "rows", "last"),
    "visual.patch_embed.proj.weight": ("image_encoder.encoder.patch_embed.proj.weight", None, "first"),
    "visual.merger.ln_q.weight": ("image_encoder.projector.layernorm.weight", None, "last"),
    "visual.merger.ln_q.bias": ("image_encoder.projector.layernorm.bias", None, "last"),
    "visual.merger.mlp.0.weight": ("image_encoder.projector.encoder.linear_fc1.weight", "rows", "last"),
    "visual.merger.mlp.0.bias": ("image_encoder.projector.encoder.linear_fc1.bias", "rows", "last"),
    "visual.merger.mlp.2.weight": ("image_encoder.projector.encoder.linear_fc2.weight", "cols", "last"),
    "visual.merger.mlp.2.bias": ("image_encoder.projector.encoder.linear_fc2.bias", None, "last"),
}


def cut(x: torch.Tensor, how: str | None, tp: int, t: int) -> torch.Tensor:
    if how == "qkv":
        return torch.cat([part.chunk(tp)[t] for part in x.chunk(3)])
    return x.chunk(tp, dim=1)[t] if how == "cols" else x.chunk(tp)[t] if how == "rows" else x


def assert_canonical_files(mid: str, hf: dict, tp: int, text: tuple, vision: tuple) -> None:
    """Every rank file of MindSpeed-MM's canonical layout (no VPP) holds exactly the tensors the
    tables above derive from the HF tensors: each layer on the stage its module's list puts it,
    numbered from 0 there; the first / last tensors on the first / last stage with layers."""
    assert open(f"{mid}/latest_checkpointed_iteration.txt").read() == "release"
    pp = len(text)
    want: dict[tuple[int, int], dict[str, torch.Tensor]] = {(t, p): {} for t in range(tp) for p in range(pp)}

    def place(counts: tuple, layer: int) -> tuple[int, int]:
        stage = next(p for p in range(pp) if sum(counts[: p + 1]) > layer)
        return stage, layer - sum(counts[:stage])

    for name, x in hf.items():
        parts = name.split(".")
        if name.startswith("model.layers."):
            (stage, local), (key, how) = place(text, int(parts[2])), CANONICAL_TEXT[".".join(parts[3:])]
            key = f"text_decoder.decoder.layers.{local}.{key}"
        elif name.startswith("visual.blocks."):
            (stage, local), (key, how) = place(vision, int(parts[2])), CANONICAL_VISION[".".join(parts[3:])]
            key = f"image_encoder.encoder.blocks.layers.{local}.{key}"
        else:
            key, how, end = CANONICAL_OTHER[name]
            filled = [p for p, n in enumerate(text if key.startswith("text_") else vision) if n]
            stage = filled[0] if end == "first" else filled[-1]
        for t in range(tp):
            want[(t, stage)][key] = cut(x, how, tp, t)
    for (t, p), tensors in want.items():
        obj = torch.load(f"{mid}/release/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt", weights_only=False)
        assert list(obj) == ["model", "checkpoint_version"] and obj["checkpoint_version"] == 3.0
        assert set(obj["model"]) == set(tensors), (t, p, set(obj["model"]) ^ set(tensors))
        for key, x in tensors.items():
            assert obj["model"][key].dtype == x.dtype and torch.equal(obj["model"][key], x), (t, p, key)


@pytest.mark.parametrize(
    "family,weight",
    [
        ("qwen2_5_vl", "visual.blocks.1.mlp.down_proj.weight"),
        ("qwen2_vl", "visual.blocks.1.mlp.fc2.weight"),
        ("gemma3", "vision_tower.encoder.layers.1.mlp.fc2.weight"),
    ],
)
def test_the_image_reaches_the_logits(models, tmp_path, family, weight):
    """One changed vision weight changes the logits on text + image (the comparisons above see the tower)."""
    src = models(family)
    changed = str(tmp_path / "changed")
    convert(src, changed, ck.Target(to="hf"))
    f = os.path.join(changed, "model.safetensors")
    sd = load_file(f)
    sd[weight] = sd[weight] * 1.5
    save_file(sd, f, metadata={"format": "pt"})
    assert not torch.equal(vl_logits(changed), vl_logits(src))


def test_gemma3_in_the_hubs_names(models, tmp_path):
    """A hub Gemma 3 keeps SigLIP's inner module in its tower names (vision_tower.vision_model.*):
    transformers loads it to the same model; through Megatron (TP2, the tower in Megatron-Bridge's
    vision_tower.* names) it comes back in the hub's names, bit for bit."""
    src, hub = models("gemma3"), str(tmp_path / "hub")
    convert(src, hub, ck.Target(to="hf"))
    f = os.path.join(hub, "model.safetensors")
    prefix = "vision_tower."
    renamed = {
        ("vision_tower.vision_model." + k[len(prefix) :] if k.startswith(prefix) else k): x
        for k, x in load_file(f).items()
    }
    save_file(renamed, f, metadata={"format": "pt"})
    assert torch.equal(vl_logits(hub), vl_logits(src))
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(hub, mid, ck.Target(to="mcore", tp=2))
    sd = rank(mid, "mp_rank_01")["model"]
    tower = {k for k in sd if k.startswith(prefix)}
    assert tower == {k for k in hf_state(src) if k.startswith(prefix)}
    for k in tower:
        assert torch.equal(sd[k], renamed["vision_tower.vision_model." + k[len(prefix) :]]), k
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(hub, back)
    assert sorted(load_file(os.path.join(back, "model.safetensors"))) == sorted(renamed)


def test_gemma3_pooling_head_is_carried(tmp_path):
    """SigLIP's attention-pooling head (vision_use_head left at its default, True) is the user's
    data though Gemma 3 never uses its output: through Megatron (TP2 PP2, Megatron-Bridge's layout: in the
    tower's HF form, whole on every TP rank of stage 0) it comes back bit for bit, the config with
    it, and the logits on text + image are equal."""
    vision = {k: v for k, v in CONFIGS["gemma3"]["vision_config"].items() if k != "vision_use_head"}
    src = build(str(tmp_path / "hf"), "gemma3", dict(CONFIGS["gemma3"], vision_config=vision))
    hf = hf_state(src)
    head = {k for k in hf if k.startswith("vision_tower.head.")}
    assert len(head) == 11 and json.load(open(f"{src}/config.json"))["vision_config"]["vision_use_head"]
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2))
    for t in range(2):
        for p in range(2):
            sd = rank(mid, f"mp_rank_{t:02d}_{p:03d}")["model"]
            assert {k for k in sd if k.startswith("vision_tower.head.")} == (head if p == 0 else set()), (
                t,
                p,
            )
            assert all(torch.equal(sd[k], hf[k]) for k in head if p == 0)
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)
    assert_side_files(src, back)
    assert json.load(open(f"{back}/config.json")) == json.load(open(f"{src}/config.json"))
    assert torch.equal(vl_logits(back), vl_logits(src))


def test_hf_to_hf_cast_and_reshard_through_megatron(models, tmp_path):
    """A bf16 cast writes each tensor as torch rounds it and the dtype into every sub-config; a
    Megatron checkpoint reshards (TP2 PP2 -> TP1) with the tower and the side files along."""
    src = models("qwen2_5_vl")
    bf16 = str(tmp_path / "bf16")
    convert(src, bf16, ck.Target(to="hf", dtype="bf16"))
    ours, theirs = hf_state(bf16), hf_state(src)
    assert sorted(ours) == sorted(theirs)
    for k, x in ours.items():
        assert x.dtype == torch.bfloat16 and torch.equal(x, theirs[k].to(torch.bfloat16)), k
    cfg = json.load(open(f"{bf16}/config.json"))
    assert {cfg["dtype"], cfg["text_config"]["dtype"], cfg["vision_config"]["dtype"]} == {"bfloat16"}
    assert_side_files(src, bf16)
    mid, mid2, back = (str(tmp_path / n) for n in ("mid", "mid2", "back"))
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2))
    convert(mid, mid2, ck.Target(to="mcore", tp=1))
    one, stages = rank(mid2, "mp_rank_00")["model"], [rank(mid, f"mp_rank_00_00{p}")["model"] for p in (0, 1)]
    assert len(one) == sum(map(len, stages))
    assert {k for k in one if k.startswith("visual.")} == {k for k in stages[0] if k.startswith("visual.")}
    convert(mid2, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)
    assert_side_files(src, back)


def mm_convert(method: str, *cfg: str) -> int:
    from ckpt_ir.commands.cli import main

    return main(["mm-convert", "Qwen2_5_VLConverter", method, *cfg])


def layers(llm, vit, tp: int) -> list[str]:
    return [
        "--cfg.parallel_config.llm_pp_layers",
        json.dumps(llm),
        "--cfg.parallel_config.vit_pp_layers",
        json.dumps(vit),
        "--cfg.parallel_config.tp_size",
        str(tp),
    ]


def test_mm_convert_is_a_drop_in_for_mindspeed_mm(models, tmp_path, capsys):
    """``ckpt-ir mm-convert`` with MindSpeed-MM's arguments: nested lists (virtual chunks) one way,
    flat ones back, the settings checked against the files; the way back bit-exact with the side
    files of the HF directory."""
    src = models("qwen2_5_vl")
    mm, back = str(tmp_path / "mm"), str(tmp_path / "back")
    assert (
        mm_convert("hf_to_mm", "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", src, *layers([[2]], [2], 1)) == 2
    )
    assert "--cfg.parallel_config.vit_pp_layers must be a list of lists" in capsys.readouterr().err
    vpp = layers([[1, 0], [0, 1]], [[2, 0], [0, 0]], 1)
    assert mm_convert("hf_to_mm", "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", src, *vpp) == 0
    obj = torch.load(f"{mm}/release/mp_rank_00_000/model_optim_rng.pt", weights_only=False)
    assert list(obj) == ["model0", "model1", "checkpoint_version"]  # virtual chunk v: model<v>
    assert (
        any(k.startswith("image_encoder.") for k in obj["model0"])
        and "text_decoder.embedding.word_embeddings.weight" in obj["model0"]
    )
    assert not any(k.startswith("image_encoder.") for k in obj["model1"])
    flat = ("--cfg.save_hf_dir", back, "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", src)
    assert mm_convert("mm_to_hf", *flat, *layers([1, 0, 0, 1], [2, 0, 0, 0], 2)) == 2
    assert "holds tp_size 1, but --cfg.parallel_config.tp_size is 2" in capsys.readouterr().err
    assert mm_convert("mm_to_hf", *flat, *layers([1, 0, 0, 1], [2, 0, 0, 0], 1)) == 0
    assert_same_tensors(src, back)
    assert_side_files(src, back)
    # MindSpeed-MM's canonical layout, TP 2 / PP 2 (the tower on stage 0): there and back bit-exact;
    # the way back reads the layout off the keys and checks the flag against it
    canon, back2 = str(tmp_path / "canon"), str(tmp_path / "back2")
    flag = ("--cfg.common_model_config.enable_canonical_hf_struct", "true")
    argv = ("--cfg.mm_dir", canon, "--cfg.hf_config.hf_dir", src, *layers([[1, 1]], [[2, 0]], 2), *flag)
    assert mm_convert("hf_to_mm", *argv) == 0
    assert_canonical_files(canon, hf_state(src), 2, (1, 1), (2, 0))
    flat = ("--cfg.save_hf_dir", back2, "--cfg.mm_dir", canon, "--cfg.hf_config.hf_dir", src)
    assert mm_convert("mm_to_hf", *flat, *layers([1, 1], [2, 0], 2)) == 2
    assert "holds enable_canonical_hf_struct true, but --cfg.common_model_config" in capsys.readouterr().err
    assert mm_convert("mm_to_hf", *flat, *layers([1, 1], [2, 0], 2), *flag) == 0
    assert_same_tensors(src, back2)
    assert_side_files(src, back2)


def test_a_vocabulary_tp_does_not_divide_is_padded_not_cut(tmp_path):
    """MindSpeed-MM cuts floor(V / TP) rows per rank and loses the rest; ckpt-ir pads to a multiple
    of TP with copies of the last row (as Megatron-LM's tools pad) and trims them on the way back."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = dict(CONFIGS["qwen2_5_vl"], text_config=dict(TEXT, vocab_size=161))
    src = str(tmp_path / "hf")
    AutoModelForImageTextToText.from_config(AutoConfig.for_model("qwen2_5_vl", **cfg)).save_pretrained(src)
    mm, back = str(tmp_path / "mm"), str(tmp_path / "back")
    assert (
        mm_convert("hf_to_mm", "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", src, *layers([[2]], [[2]], 2))
        == 0
    )
    embed = hf_state(src)["model.embed_tokens.weight"]
    padded = torch.cat([embed, embed[-1:]])
    for t in range(2):
        sd = torch.load(f"{mm}/release/mp_rank_{t:02d}/model_optim_rng.pt", weights_only=False)["model"]
        assert torch.equal(sd["text_decoder.embedding.word_embeddings.weight"], padded.chunk(2)[t])
    flat = ("--cfg.save_hf_dir", back, "--cfg.mm_dir", mm, "--cfg.hf_config.hf_dir", src)
    assert mm_convert("mm_to_hf", *flat, *layers([2], [2], 2)) == 0
    assert_same_tensors(src, back)


def test_an_fp8_release_reads_like_a_text_models(models, tmp_path):
    """An FP8 block-scaled release (every 2-D linear of the language model and the tower quantized,
    ``weight_scale_inv`` beside it) reads as transformers dequantizes it, bit for bit, to HF and
    through Megatron."""
    from tests.test_quantized import check_against_transformers, make_fp8

    fp8 = make_fp8(models("qwen2_5_vl"), str(tmp_path / "fp8"), block=(16, 16))
    assert any(k.startswith("visual.") and k.endswith("_scale_inv") for k in hf_state(fp8))
    out, mid, back = (str(tmp_path / n) for n in ("out", "mid", "back"))
    convert(fp8, out, ck.Target(to="hf", dtype="bf16"))
    assert check_against_transformers(fp8, out) > 0
    convert(fp8, mid, ck.Target(to="mcore", tp=2, pp=2, dtype="bf16"))
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(out, back)
