"""InternVL (family internvl) in both HF namings: transformers 5.25's InternVLForConditionalGeneration
(model_type internvl) and OpenGVLab's remote code (model_type internvl_chat, InternVLChatModel,
which MindSpeed-MM's InternVLConverter reads).  HF -> Megatron-Core (MindSpeed-MM's layout, the
default: Megatron-Bridge has no InternVL bridge; and Megatron-Bridge-style, the tower in its HF
form) -> HF is bit-exact in the source's naming with the side files back byte for byte, and
transformers' logits on text plus a generated image are equal for the transformers naming.  The
remote naming has no transformers model: its tensors are written here from the transformers
model's by the correspondence of docs/reference/vision-language-models.md section 1.4 (transformers'
convert_internvl_weights_to_hf.py), and its rank files must equal the transformers naming's.
MindSpeed-MM's layout (its checkpoint/vlm_model/converters/internvl.py): the tower under
``image_encoder.encoder.``, each layer's ``self_attention.linear_qkv`` the remote ``attn.qkv``
([q; k; v]) split over TP part by part (rank r: [q_r; k_r; v_r], UnalignedRowSplit)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from ckpt_ir.errors import VerifyError
from tests.test_families_vlm import layers
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

# a Qwen2 language model (q/k/v biases) and an InternViT tower of 16 x 16 pixels in 4 x 4 patches
# (16 patches + the class token), with q/k/v biases and q/k norms; a pixel shuffle of 2 x 2
# (downsample_ratio 0.5) gives 4 image tokens per tile
TEXT = dict(
    model_type="qwen2",
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    num_hidden_layers=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
    attention_bias=True,
    use_qk_norm=True,
)
CONFIG = dict(
    text_config=TEXT,
    vision_config=VISION,
    image_token_id=150,
    image_seq_length=4,
    downsample_ratio=0.5,
    tie_word_embeddings=False,
)
# the other variants, batched in one model: a Llama language model with tied embeddings, a tower of
# RMSNorms without q/k/v biases or q/k norms, and a LayerNorm after its layers (use_mean_pooling
# false), which MindSpeed-MM's layout has no key for: Megatron-Bridge-style only
LLAMA = dict(
    CONFIG,
    text_config=dict(TEXT, model_type="llama", tie_word_embeddings=True),
    vision_config=dict(
        VISION, attention_bias=False, use_qk_norm=False, norm_type="rms_norm", use_mean_pooling=False
    ),
    tie_word_embeddings=True,
)
SIDE_FILES = {
    "preprocessor_config.json": '{"image_processor_type": "GotOcr2ImageProcessor",  "size": {"height": 16,'
    ' "width": 16}}',
    "processor_config.json": '{"processor_class": "InternVLProcessor", "image_seq_length": 4}\n\n',
    "tokenizer_config.json": '{"model_max_length": 128, "padding_side":"left"}',
}
# transformers' names -> the remote code's (section 1.4: convert_internvl_weights_to_hf.py's tables
# read the other way); q_proj / k_proj / v_proj are the rows of the remote attn.qkv, in that order
VIT = "vision_tower.encoder.layer."
REMOTE = (
    ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
    ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("multi_modal_projector.layer_norm.", "mlp1.0."),
    ("multi_modal_projector.linear_1.", "mlp1.1."),
    ("multi_modal_projector.linear_2.", "mlp1.3."),
)
REMOTE_LAYER = (
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.q_norm.", "attn.q_norm."),
    ("attention.k_norm.", "attn.k_norm."),
    ("attention.projection_layer.", "attn.proj."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("lambda_1", "ls1"),
    ("lambda_2", "ls2"),
)


def build(path: str, shard: str | None = None, config: dict = CONFIG) -> str:
    """A tiny InternVL built and saved by transformers, every parameter random."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(
        AutoConfig.for_model("internvl", **config), dtype=torch.float32
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    for name, text in SIDE_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return path


def assert_side_files(src: str, out: str) -> None:
    for name in SIDE_FILES:
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(src, name), "rb").read(), name


def remote_name(key: str) -> str:
    if key.startswith(VIT):
        n, rest = key[len(VIT) :].split(".", 1)
        for hf, remote in REMOTE_LAYER:
            if rest.startswith(hf):
                return f"vision_model.encoder.layers.{n}.{remote}{rest[len(hf) :]}"
        raise KeyError(key)
    for hf, remote in REMOTE:
        if key.startswith(hf):
            return remote + key[len(hf) :]
    assert key.startswith("language_model."), key
    return key


def write_remote(hf: str, path: str) -> str:
    """The same model in the remote code's layout: its tensor names, attn.qkv = [q; k; v], and its
    config (llm_config, vision_config with the remote keys), written as JSON without auto_map."""
    os.makedirs(path)
    sd = hf_state(hf)
    out = {}
    for key, x in sd.items():
        if (
            key.startswith(VIT)
            and ".attention." in key
            and key.split(".")[-2] in ("q_proj", "k_proj", "v_proj")
        ):
            if key.split(".")[-2] == "q_proj":
                kind = key.split(".")[-1]
                stem = key[: -len("q_proj." + kind)]
                qkv = torch.cat([sd[f"{stem}{p}_proj.{kind}"] for p in "qkv"])
                n = key[len(VIT) :].split(".")[0]
                out[f"vision_model.encoder.layers.{n}.attn.qkv.{kind}"] = qkv
            continue
        out[remote_name(key)] = x
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    llm = dict(
        TEXT,
        architectures=["Qwen2ForCausalLM"],
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        torch_dtype="float32",
    )
    vision = dict(
        architectures=["InternVisionModel"],
        model_type="intern_vit_6b",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
        num_channels=3,
        qkv_bias=True,
        qk_normalization=True,
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        torch_dtype="float32",
    )
    cfg = dict(
        architectures=["InternVLChatModel"],
        model_type="internvl_chat",
        downsample_ratio=0.5,
        force_image_size=16,
        select_layer=-1,
        template="internvl2_5",
        ps_version="v2",
        llm_config=llm,
        vision_config=vision,
        torch_dtype="float32",
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name, text in SIDE_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return path


def vl_logits(path: str) -> torch.Tensor:
    """transformers' logits on token ids around one generated 16 x 16 image (image_seq_length image
    tokens)."""
    from transformers import AutoModelForImageTextToText

    cfg = json.load(open(os.path.join(path, "config.json")))
    v = cfg["vision_config"]
    ids = torch.tensor([[5, 7] + [cfg["image_token_id"]] * cfg["image_seq_length"] + [9, 11, 13]])
    size = (1, v["num_channels"], *v["image_size"])
    pixels = torch.randn(size, generator=torch.Generator().manual_seed(0))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    hf = build(str(root / "hf"))
    return {
        "internvl": hf,
        "internvl_chat": write_remote(hf, str(root / "remote")),
        "internvl_llama": build(str(root / "llama"), config=LLAMA),
    }


MM = dict(mm_keys="mindspeed")
# the Megatron layouts each naming goes through (and back): MindSpeed-MM's (the family's default,
# which the first layout reaches with no mm_keys asked) at TP 1 and TP 2, PP 2 with the tower on
# stage 0, TP 2 PP 2 with the vision layers split; and the Megatron-Bridge-style layout (the tower
# in the transformers naming's HF form on stage 0)
LAYOUTS = {
    "internvl": (
        dict(MM, tp=1),
        dict(MM, tp=2),
        dict(MM, pp=2, num_layer_list=(1, 1), vision_layer_list=(2, 0)),
        dict(MM, tp=2, pp=2, num_layer_list=(1, 1), vision_layer_list=(1, 1)),
        dict(mm_keys="bridge", tp=2),
    ),
    "internvl_chat": (
        dict(MM, tp=2),
        dict(MM, tp=2, pp=2, num_layer_list=(1, 1), vision_layer_list=(1, 1)),
    ),
    "internvl_llama": (dict(mm_keys="bridge", tp=2, pp=2),),
}
# the LAYOUTS cases of the remote naming and the variants: the family they are
FAMILY = {"internvl_chat": "internvl", "internvl_llama": "internvl"}


def mm_files(mid: str) -> dict[str, dict]:
    """MindSpeed-MM's rank files: rank directory -> its model dict."""
    out = {}
    for d in sorted(os.listdir(f"{mid}/release")):
        obj = torch.load(f"{mid}/release/{d}/model_optim_rng.pt", weights_only=False)
        assert list(obj) == ["model", "checkpoint_version"] and obj["checkpoint_version"] == 3.0
        out[d] = obj["model"]
    return out


@pytest.mark.parametrize("naming", sorted(LAYOUTS))
def test_hf_to_mcore_to_hf_bit_exact_in_the_source_naming(sources, tmp_path, naming):
    src = sources[naming]
    ckpt = ck.load(src)
    assert ckpt.spec.family == "internvl" and ckpt.spec.vision is not None
    want = vl_logits(src) if naming != "internvl_chat" else None
    for n, layout in enumerate(LAYOUTS[naming]):
        mid, back = str(tmp_path / f"mid{n}"), str(tmp_path / f"back{n}")
        # the first layout with no mm_keys asked: MindSpeed-MM's (Megatron-Bridge has no InternVL bridge)
        asked = {k: v for k, v in layout.items() if n or (k, v) != ("mm_keys", "mindspeed")}
        convert(src, mid, ck.Target(to="mcore", **asked))
        assert os.path.isdir(f"{mid}/release") == (layout["mm_keys"] == "mindspeed")
        convert(mid, back, ck.Target(to="hf"))
        assert_same_tensors(src, back)
        assert_side_files(src, back)
        ours, theirs = json.load(open(f"{back}/config.json")), json.load(open(f"{src}/config.json"))
        # the source's config in its own shape (llm_config stays llm_config); the language model's
        # gains its head_dim, as every family's written config does
        text = "llm_config" if naming == "internvl_chat" else "text_config"
        assert sorted(ours) == sorted(theirs) and ours["vision_config"] == theirs["vision_config"]
        assert ours[text] == {**theirs[text], "head_dim": 16}
        assert {k: ours[k] for k in ours if k != text} == {k: theirs[k] for k in theirs if k != text}
        if want is not None:
            assert torch.equal(vl_logits(back), want), layout
        if layout["mm_keys"] == "mindspeed" and naming == "internvl_chat":
            assert_mindspeed_mm_files(mid, hf_state(src), layout)
            # the same model in transformers' naming gives the same rank files, tensor for tensor
            other = str(tmp_path / f"other{n}")
            convert(sources["internvl"], other, ck.Target(to="mcore", **layout))
            ours, theirs = mm_files(mid), mm_files(other)
            assert sorted(ours) == sorted(theirs)
            for d in ours:
                assert sorted(ours[d]) == sorted(theirs[d]), d
                assert all(torch.equal(ours[d][k], theirs[d][k]) for k in ours[d]), d


def assert_mindspeed_mm_files(mid: str, remote: dict, layout: dict) -> None:
    """MindSpeed-MM's files of the remote model (converters/internvl.py): each vision layer's
    linear_qkv on TP rank r = [q_r; k_r; v_r] of the remote attn.qkv's thirds (UnalignedRowSplit by
    whole heads), linear_proj its columns' r-th part, the embeddings on the first stage with vision
    layers and the projector on the last, both whole; ls1 / ls2 and the q/k norms whole."""
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    counts = layout.get("vision_layer_list", (2,))
    files = mm_files(mid)
    for t in range(tp):
        for p in range(pp):
            sd = files[f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")]
            first = sum(counts[:p])
            for local in range(counts[p]):
                at, g = (
                    f"image_encoder.encoder.encoder.layers.{local}.",
                    f"vision_model.encoder.layers.{first + local}.",
                )
                for kind in ("weight", "bias"):
                    thirds = remote[f"{g}attn.qkv.{kind}"].chunk(3)
                    want = torch.cat([part.chunk(tp)[t] for part in thirds])
                    assert torch.equal(sd[f"{at}self_attention.linear_qkv.{kind}"], want), (t, p, kind)
                assert torch.equal(
                    sd[f"{at}self_attention.linear_proj.weight"],
                    remote[f"{g}attn.proj.weight"].chunk(tp, 1)[t],
                )
                for mm, hf in (
                    ("ls1", "ls1"),
                    ("ls2", "ls2"),
                    ("self_attention.q_layernorm.weight", "attn.q_norm.weight"),
                ):
                    assert torch.equal(sd[at + mm], remote[g + hf]), mm
            assert ("image_encoder.encoder.embeddings.class_embedding" in sd) == (p == 0)
            assert ("image_encoder.projector.linear_fc1.weight" in sd) == (
                p == max(q for q in range(pp) if counts[q])
            )
            if p == 0:
                assert torch.equal(
                    sd["image_encoder.encoder.embeddings.position_embedding"],
                    remote["vision_model.embeddings.position_embedding"],
                )


def test_a_tower_mindspeed_mm_has_no_key_for_is_refused(sources, tmp_path):
    """The LayerNorm after the tower (use_mean_pooling false) has no key in MindSpeed-MM's layout: a
    one-line error naming it and the layout that holds it, nothing written."""
    out = str(tmp_path / "mm")
    with pytest.raises(VerifyError, match=r"^vision\.final_norm\.weight: MindSpeed-MM's .* use .*bridge"):
        convert(sources["internvl_llama"], out, ck.Target(to="mcore"))
    assert not os.path.exists(f"{out}/release")


def test_the_layer_scale_reaches_the_logits(sources, tmp_path):
    """One changed layer scale changes the logits on text + image (the comparisons above see it)."""
    changed = str(tmp_path / "changed")
    convert(sources["internvl"], changed, ck.Target(to="hf"))
    f = os.path.join(changed, "model.safetensors")
    sd = load_file(f)
    sd["vision_tower.encoder.layer.1.lambda_2"] = sd["vision_tower.encoder.layer.1.lambda_2"] * 1.5
    save_file(sd, f, metadata={"format": "pt"})
    assert not torch.equal(vl_logits(changed), vl_logits(sources["internvl"]))


def mm_convert(method: str, *cfg: str) -> int:
    from ckpt_ir.commands.cli import main

    return main(["mm-convert", "InternVLConverter", method, *cfg])


def test_mm_convert_internvl_tp2_and_back(sources, tmp_path):
    """``ckpt-ir mm-convert InternVLConverter`` on the remote layout (what MindSpeed-MM reads), TP 2
    PP 2, and back bit for bit, where MindSpeed-MM's own mm_to_hf scrambles the vision qkv at TP 2
    (docs/reference/vision-language-models.md section 3.8)."""
    src = sources["internvl_chat"]
    mm, back = str(tmp_path / "mm"), str(tmp_path / "back")
    hf_dir = ("--cfg.hf_config.hf_dir", src)
    assert mm_convert("hf_to_mm", "--cfg.mm_dir", mm, *hf_dir, *layers([[1, 1]], [[2, 0]], 2)) == 0
    assert_mindspeed_mm_files(mm, hf_state(src), dict(tp=2, pp=2, vision_layer_list=(2, 0)))
    assert (
        mm_convert(
            "mm_to_hf", "--cfg.save_hf_dir", back, "--cfg.mm_dir", mm, *hf_dir, *layers([1, 1], [2, 0], 2)
        )
        == 0
    )
    assert_same_tensors(src, back)
    assert_side_files(src, back)
