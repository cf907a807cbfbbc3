"""Vision-language family kimi_k25 (Kimi-K2.5: a DeepSeek-V3 language model, MoonViT, a
projector) in the hub's naming: HF -> Megatron-Core (Megatron-Bridge's layout) -> HF is bit-exact
with every side file back byte for byte, and transformers' logits on text plus a generated image
are equal.  The rank files hold Megatron-Bridge's ``KimiK25VLBridge`` names
(``kimi_vl/kimi_k25_vl_bridge.py`` 242-270): ``language_model.`` + DeepSeek's common list
(``deepseek/common.py`` 26-62, 68-91) and ``vision_tower.**`` / ``mm_projector.**`` under their HF
names, whole on every rank of pipeline stage 0 and nowhere else.  The release's INT4
pack-quantized experts are read dequantized as Megatron-Bridge's ``dequantize_int4`` computes
them."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import ckpt_ir.api as ck
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

TEXT = dict(
    model_type="deepseek_v3",
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=160,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_group=1,
    topk_group=1,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
# MoonViT 32 wide, patches of 4 pixels, positions on a 4 x 6 grid (resampled to each image), the
# projector merging 2 x 2 patches; untied embeddings (the top level's tie_word_embeddings)
CONFIG = dict(
    text_config=TEXT,
    vision_config=dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=4,
        pos_emb_height=4,
        pos_emb_width=6,
        merge_kernel_size=[2, 2],
    ),
    projection_hidden_size=32,
    image_token_id=150,
    tie_word_embeddings=False,
)
# Megatron-Bridge's layouts (megatron-core's MLA modules, the default in its layout): TP alone,
# TP with PP (the tower on stage 0, the MoE layer on stage 1), the experts over EP 2; and
# MindSpeed-LLM's MLA modules asked for at TP 2
LAYOUTS = {
    "kimi_k25": (
        dict(tp=1),
        dict(tp=2, mla_keys="mindspeed"),
        dict(tp=2, pp=2),
        dict(tp=1, ep=2),
    )
}
SIDE_FILES = {
    "preprocessor_config.json": '{"image_processor_type": "Kimi_K25ImageProcessor",  "patch_size": 4,'
    ' "merge_size": 2}',
    "tokenizer_config.json": '{"model_max_length": 128, "padding_side":"left"}',
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
}
# Megatron-Bridge's DeepSeek keys (deepseek/common.py 26-62 and the gated MLPs 68-91), below
# language_model.; "*" a layer or expert number
BRIDGE_LM = (
    "embedding.word_embeddings.weight",
    "decoder.layers.*.input_layernorm.weight",
    "decoder.layers.*.self_attention.linear_proj.weight",
    "decoder.layers.*.pre_mlp_layernorm.weight",
    "decoder.layers.*.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.*.self_attention.linear_kv_down_proj.weight",
    "decoder.layers.*.self_attention.linear_kv_up_proj.weight",
    "decoder.layers.*.self_attention.linear_kv_up_proj.layer_norm_weight",
    "decoder.layers.*.self_attention.kv_layernorm.weight",
    "decoder.layers.*.mlp.linear_fc2.weight",
    "decoder.layers.*.mlp.router.weight",
    "decoder.layers.*.mlp.router.expert_bias",
    "decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight",
    "decoder.layers.*.mlp.shared_experts.linear_fc2.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
    "decoder.layers.*.self_attention.linear_q_down_proj.weight",
    "decoder.layers.*.self_attention.linear_q_up_proj.weight",
    "decoder.layers.*.self_attention.linear_q_up_proj.layer_norm_weight",
    "decoder.layers.*.self_attention.q_layernorm.weight",
    "decoder.layers.*.mlp.linear_fc1.weight",
    "decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight",
    "decoder.layers.*.mlp.shared_experts.linear_fc1.weight",
)
BRIDGE_KEY = re.compile(
    "language_model\\.(" + "|".join(re.escape(k).replace("\\*", "\\d+") for k in BRIDGE_LM) + ")$"
)
# a weight of the tower, scaled to show that the image reaches the logits
TOWER_WEIGHT = "vision_tower.encoder.blocks.1.mlp.fc1.weight"

# transformers 5.25's in-memory names -> the hub's (docs/reference/vision-language-models.md
# section 1.2, the inverse of conversion_mapping.py:734-786), longest prefix first
HUB_PREFIX = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.patch_embed.pos_emb.position_embeddings", "vision_tower.patch_embed.pos_emb.weight"),
    ("model.vision_tower.patch_embed.", "vision_tower.patch_embed."),
    ("model.vision_tower.final_layernorm.", "vision_tower.encoder.final_layernorm."),
    ("model.vision_tower.layers.", "vision_tower.encoder.blocks."),
    ("model.mm_projector.in_proj.", "mm_projector.proj.0."),
    ("model.mm_projector.out_proj.", "mm_projector.proj.2."),
    ("model.mm_projector.", "mm_projector."),
)
HUB_BLOCK = {
    "norm1": "norm0",
    "norm2": "norm1",
    "attn.proj": "wo",
    "mlp.fc1": "mlp.fc0",
    "mlp.fc2": "mlp.fc1",
}


def hub_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers model's parameters under the hub's names: the tower block's modules renamed
    back, q / k / v rows packed as ``wqkv`` = [q; k; v] (random values, so the RoPE permutation
    transformers applies on load needs no inverse here), the stacked experts one by one
    (``gate_up_proj`` [E, 2F, H] = per expert [gate; up], ``down_proj`` [E, H, F])."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        old, new = next(p for p in HUB_PREFIX if name.startswith(p[0]))
        hub = new + name[len(old) :]
        m = re.fullmatch(r"(vision_tower\.encoder\.blocks\.\d+\.)(.+)\.(weight|bias)", hub)
        if m and m[2] in ("attn.k_proj", "attn.v_proj"):
            continue
        if m and m[2] == "attn.q_proj":
            parts = [sd[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{m[1]}wqkv.{m[3]}"] = torch.cat(parts)
            continue
        if m:
            hub = f"{m[1]}{HUB_BLOCK.get(m[2], m[2])}.{m[3]}"
        e = re.fullmatch(r"(.+\.mlp\.experts\.)(gate_up_proj|down_proj)", hub)
        if e and e[2] == "gate_up_proj":
            f = t.shape[1] // 2
            for i in range(t.shape[0]):
                out[f"{e[1]}{i}.gate_proj.weight"] = t[i, :f].clone()
                out[f"{e[1]}{i}.up_proj.weight"] = t[i, f:].clone()
            continue
        if e:
            for i in range(t.shape[0]):
                out[f"{e[1]}{i}.down_proj.weight"] = t[i].clone()
            continue
        out[hub] = t.clone()
    return out


def build(path: str) -> str:
    """A tiny model: transformers' parameters, random, saved under the hub's names with
    transformers' config and side files."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model("kimi_k25", **CONFIG)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    os.makedirs(path)
    cfg.architectures = ["KimiK25ForConditionalGeneration"]  # the hub's (remote code) class name
    cfg.save_pretrained(path)
    save_file(
        hub_state(model.state_dict()), os.path.join(path, "model.safetensors"), metadata={"format": "pt"}
    )
    for name, text in SIDE_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return path


def vl_inputs(cfg: dict) -> dict[str, torch.Tensor]:
    """Token ids around one generated image of 4 x 4 patches (2 x 2 merged tokens)."""
    v, k = cfg["vision_config"], cfg["vision_config"]["merge_kernel_size"]
    h, w = 4, 4
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 7] + [cfg["image_token_id"]] * (h * w // (k[0] * k[1])) + [9, 11, 13]])
    pixels = torch.randn((h * w, 3, v["patch_size"], v["patch_size"]), generator=gen)
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, h, w]]))


def vl_logits(path: str, scale: str | None = None) -> torch.Tensor:
    """transformers' logits on text + image of the hub-named model at ``path`` (``scale``: a hub
    weight of the tower multiplied by 1.5 first); every stored tensor is loaded, none missing."""
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        if scale is not None:  # blocks.N.mlp.fc1 is transformers' layers.N.mlp.fc2
            model.get_parameter("model.vision_tower.layers.1.mlp.fc2.weight").mul_(1.5)
        return model(**vl_inputs(json.load(open(os.path.join(path, "config.json"))))).logits


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("kimi_k25") / "hf"))


def rank_files(mid: str, pp: int) -> dict[tuple[int, int], list[dict]]:
    """(TP rank, pipeline stage) -> the model state of each rank directory there (one per EP rank;
    ``mp_rank_TT[_PPP][_EEE]``, the stage only where ``pp`` > 1)."""
    out: dict[tuple[int, int], list[dict]] = {}
    it = os.path.join(mid, "iter_0000001")
    for d in sorted(os.listdir(it)):
        m = re.fullmatch(r"mp_rank_(\d\d)(?:_(\d\d\d))?(?:_(\d\d\d))?", d)
        assert m, d
        sd = torch.load(os.path.join(it, d, "model_optim_rng.pt"), weights_only=False)["model"]
        out.setdefault((int(m[1]), int(m[2]) if pp > 1 else 0), []).append(sd)
    return out


def test_hf_to_mcore_to_hf_bit_exact_with_same_image_logits(model, tmp_path):
    ckpt = ck.load(model)
    assert ckpt.spec.family == "kimi_k25" and ckpt.spec.vision is not None
    assert ckpt.tensors["vision.pos_embed.weight"].shape == (4, 6, 32)
    assert ckpt.spec.num_experts == 4 and ckpt.spec.untied
    want = vl_logits(model)
    # the image reaches the logits: one changed tower weight changes them
    assert not torch.equal(vl_logits(model, scale=TOWER_WEIGHT), want)
    hf = hf_state(model)
    tower = {k for k in hf if not k.startswith("language_model.")}
    assert tower and all(k.startswith(("vision_tower.", "mm_projector.")) for k in tower)
    cfg = json.load(open(f"{model}/config.json"))
    for n, layout in enumerate(LAYOUTS["kimi_k25"]):
        mid, back = str(tmp_path / f"mid{n}"), str(tmp_path / f"back{n}")
        convert(model, mid, ck.Target(to="mcore", **layout))
        convert(mid, back, ck.Target(to="hf"))
        assert_same_tensors(model, back)
        for name in SIDE_FILES:
            assert open(f"{back}/{name}", "rb").read() == open(f"{model}/{name}", "rb").read(), name
        assert json.load(open(f"{back}/config.json")) == cfg
        if n == 0:
            assert torch.equal(vl_logits(back), want)
        # Megatron-Bridge's layout: the tower and projector whole under their HF names on every
        # rank of stage 0 (each TP and EP rank), nowhere else; the language model's keys its
        # DeepSeek names (with megatron-core's MLA modules)
        files = rank_files(mid, layout.get("pp", 1))
        assert sorted(files) == [(t, p) for t in range(layout["tp"]) for p in range(layout.get("pp", 1))]
        for (t, p), sds in files.items():
            assert len(sds) == layout.get("ep", 1)
            for sd in sds:
                keys = {k for k in sd if not k.startswith("language_model.")}
                assert keys == (tower if p == 0 else set()), (t, p)
                for k in keys:
                    assert torch.equal(sd[k], hf[k]), k
                lm = [k for k in sd if k.startswith("language_model.") and not k.endswith("_extra_state")]
                assert lm, (t, p)
                bridge = [k for k in lm if BRIDGE_KEY.match(k)]
                if layout.get("mla_keys", "mcore") == "mcore":
                    assert bridge == lm, [k for k in lm if not BRIDGE_KEY.match(k)]
                else:  # MindSpeed-LLM's fused q / kv down-projection, not megatron-core's
                    fused = [k for k in lm if k.endswith(".self_attention.linear_qkv.weight")]
                    assert fused and not any("_down_proj" in k for k in lm), (t, p)


def int4_pack(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight quantized to the release's INT4 format, from the format facts (not Megatron-Bridge's
    code): per ``group`` values of a row one bf16 scale; values ``q`` in [-8, 7] stored as the
    nibble ``q + 8``, element ``8j + k`` in bits ``4k .. 4k+3`` of int32 word ``j``."""
    rows, cols = w.shape
    scale = (w.reshape(rows, cols // group, group).abs().amax(-1) / 7).to(torch.bfloat16)
    s = scale.float().repeat_interleave(group, 1)
    nib = (torch.round(w / s).clamp(-8, 7) + 8).to(torch.int64).reshape(rows, cols // 8, 8)
    words = (nib << (torch.arange(8) * 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32), scale


def int4_formula(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(nibble - 8) x its group's scale in fp32, rounded once to bf16 (Megatron-Bridge
    quantization_utils.py 493-544, written from the facts)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(words >> (4 * k)) & 0xF for k in range(8)], -1).reshape(packed.shape[0], -1)
    group = nib.shape[1] // scale.shape[1]
    return ((nib.float() - 8) * scale.float().repeat_interleave(group, 1)).to(torch.bfloat16)


def test_int4_pack_quantized_experts_read_as_megatron_bridge_dequantizes(model, tmp_path):
    """The release's routed experts (the MoE layers' ``experts.N.*``, not layer 0, not the shared
    experts) as ``weight_packed`` / ``weight_scale`` / ``weight_shape`` with a compressed-tensors
    quantization_config in text_config: read as bf16 (nibble - 8) x scale, equal to the formula,
    to Megatron-Bridge's own ``dequantize_int4`` where it imports, by row blocks too; Megatron and
    back to HF gives those bf16 weights and a config without quantization_config."""
    from safetensors.torch import load_file

    from ckpt_ir.families import by_name
    from ckpt_ir.ir import expr as E

    src = str(tmp_path / "int4")
    os.makedirs(src)
    sd = load_file(os.path.join(model, "model.safetensors"))
    stored, want = {}, {}
    for k, t in sd.items():
        if re.search(r"\.mlp\.experts\.\d+\.", k):
            packed, scale = int4_pack(t, 8)
            base = k[: -len(".weight")]
            stored |= {base + ".weight_packed": packed, base + ".weight_scale": scale}
            stored[base + ".weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int32)
            want[k] = int4_formula(packed, scale)
        else:
            stored[k] = t.to(torch.bfloat16)
    save_file(stored, os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(model, "config.json")))
    qcfg = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 8,
                },
            }
        },
    }
    cfg["text_config"] = dict(cfg["text_config"], quantization_config=qcfg, dtype="bfloat16")
    cfg["dtype"] = "bfloat16"
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    ckpt = ck.load(src)
    assert len(want) == 3 * 4
    try:  # Megatron-Bridge's own function, where its package imports
        from megatron.bridge.models.conversion.quantization_utils import dequantize_int4
    except ImportError:
        dequantize_int4 = None
    with E.Reader() as r:
        for k, w in want.items():
            c = by_name("kimi_k25").names.to_canonical(k)
            e = E.Cast(ckpt.tensors[c].expr, "BF16")
            got = E.evaluate(E.simplify(e), r)
            assert torch.equal(got.view(torch.int16), w.view(torch.int16)), k
            assert torch.equal(
                E.evaluate(E.simplify(E.Slice(e, 0, 3, 7)), r).view(torch.int16), w[3:7].view(torch.int16)
            )
            if dequantize_int4 is not None:
                base = k[: -len(".weight")]
                mb = dequantize_int4(stored[base + ".weight_packed"], stored[base + ".weight_scale"], None)
                assert torch.equal(mb.view(torch.int16), w.view(torch.int16)), k
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", ep=2))
    convert(mid, back, ck.Target(to="hf"))
    out = (
        load_file(os.path.join(back, "model.safetensors"))
        if os.path.exists(os.path.join(back, "model.safetensors"))
        else hf_state(back)
    )
    for k, w in want.items():
        assert torch.equal(out[k].view(torch.int16), w.view(torch.int16)), k
    assert "quantization_config" not in json.load(open(os.path.join(back, "config.json")))["text_config"]


def test_release_vision_config_spellings():
    """The release's remote-code config spells the tower's keys vt_* / init_pos_emb_* /
    mm_hidden_size; they give the spec transformers' spellings give."""
    from ckpt_ir.families import by_name

    fam = by_name("kimi_k25")
    v = CONFIG["vision_config"]
    ours = fam.spec_from_config(dict(CONFIG, model_type="kimi_k25", vision_config=dict(v, hidden_act="gelu")))
    release = dict(
        vt_hidden_size=32,
        vt_intermediate_size=48,
        vt_num_hidden_layers=2,
        vt_num_attention_heads=4,
        patch_size=4,
        init_pos_emb_height=4,
        init_pos_emb_width=6,
        merge_kernel_size=[2, 2],
        mm_hidden_size=32,
        hidden_act="gelu",
    )
    top = {k: x for k, x in CONFIG.items() if k != "projection_hidden_size"}
    theirs = fam.spec_from_config(dict(top, model_type="kimi_k25", vision_config=release))
    assert theirs.vision == ours.vision
    assert ours.vision.pos_embed_size == 24 and ours.vision.merger_size == 2


INT4_CONFIG = {
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 8}}
        },
    }
}


@pytest.mark.parametrize(
    "drop,cfg_change,message",
    [
        ("x.weight_scale", None, "int4 tensor x.weight_packed has no x.weight_scale"),
        ("x.weight_shape", None, "int4 tensor x.weight_packed has no x.weight_shape"),
        (None, {"group_size": 16}, "scale tensor x.weight_scale does not fit x.weight_packed"),
        (None, {"num_bits": 8}, "is not int4 pack-quantized"),
    ],
)
def test_int4_bad_inputs_are_one_line_errors(tmp_path, drop, cfg_change, message):
    """A packed weight without its scale or shape, scales of another group size than the config's,
    a compressed-tensors config of another scheme: one-line errors naming the tensor or setting."""
    from ckpt_ir.errors import CkptIrError
    from ckpt_ir.io.safetensors import read_header
    from ckpt_ir.quant import dequantize_tensors

    tensors = {
        "x.weight_packed": torch.zeros((4, 2), dtype=torch.int32),
        "x.weight_scale": torch.ones((4, 2), dtype=torch.bfloat16),
        "x.weight_shape": torch.tensor([4, 16], dtype=torch.int32),
    }
    tensors.pop(drop, None)
    f = str(tmp_path / "m.safetensors")
    save_file(tensors, f)
    cfg = json.loads(json.dumps(INT4_CONFIG))
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(cfg_change or {})
    with pytest.raises(CkptIrError) as err:
        dequantize_tensors(read_header(f)[0], cfg, "cfg")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_peft_adapter_is_refused_in_one_line(model, tmp_path):
    """transformers shifts the tower's names on load (the stored mlp.fc0 is mlp.fc1 in memory), so
    a PEFT adapter's module names are not the checkpoint's: reading one (to merge it) and writing
    one are refused, saying what to do."""
    from ckpt_ir.backends import peft as peft_out
    from ckpt_ir.errors import UsageError

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    module = "base_model.model.model.vision_tower.encoder.blocks.0.mlp.fc1"
    save_file(
        {f"{module}.lora_A.weight": torch.zeros(2, 32), f"{module}.lora_B.weight": torch.zeros(48, 2)},
        str(adapter / "adapter_model.safetensors"),
    )
    with pytest.raises(UsageError, match="PEFT adapter of kimi_k25 cannot be read .*merge_and_unload") as e:
        convert(model, str(tmp_path / "out"), ck.Target(to="hf", lora_load=str(adapter)))
    assert "\n" not in str(e.value)
    c = ck.load(model)
    name = "layers.0.attn.o.lora_a.weight"
    c = c.with_tensors({**c.tensors, name: c.tensors["layers.0.attn.o.weight"]})
    with pytest.raises(UsageError, match="PEFT adapter of kimi_k25 cannot be written .*merged model"):
        peft_out.plan(c)
