"""DeepSeek-V3: multi-latent attention, router bias, shared experts, first-k dense layers and
multi-token-prediction layers convert both ways bit-exactly; transformers' logits are unchanged."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from ckpt_ir.errors import CkptIrError
from tests.test_hf_roundtrip import assert_same_tensors, hf_state

H, L, VOCAB = 64, 3, 128


def build_deepseek(path: str, mtp: bool = True) -> str:
    """A tiny DeepSeek-V3 from transformers (which saves no MTP layer), plus an MTP layer written
    the way the released checkpoints store it: model.layers.{L}.* with its own embed_tokens and
    shared_head.head copies of the main embedding and lm_head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "deepseek_v3",
        hidden_size=H,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
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
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for m in model.modules():  # the router's score-correction bias is a buffer
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(path)
    if mtp:
        f = os.path.join(path, "model.safetensors")
        sd = load_file(f)
        g = torch.Generator().manual_seed(5)
        for k in [k for k in sd if k.startswith("model.layers.1.")]:  # a MoE layer's structure
            sd[k.replace("model.layers.1.", f"model.layers.{L}.")] = torch.randn(sd[k].shape, generator=g)
        extra = {
            "enorm.weight": (H,),
            "hnorm.weight": (H,),
            "eh_proj.weight": (H, 2 * H),
            "shared_head.norm.weight": (H,),
        }
        for k, shape in extra.items():
            sd[f"model.layers.{L}.{k}"] = torch.randn(shape, generator=g)
        sd[f"model.layers.{L}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        sd[f"model.layers.{L}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
        save_file(sd, f, metadata={"format": "pt"})
    return path


def convert(src: str, dst: str, target: ck.Target) -> None:
    c = ck.load(src)
    ck.save(ck.run(c, ck.derive_pipeline(c, target)), dst, target)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return build_deepseek(str(tmp_path_factory.mktemp("ds") / "hf"))


@pytest.mark.parametrize(
    "layout",
    [
        dict(),
        dict(tp=2),
        dict(tp=2, ep=2),
        dict(pp=3),
        dict(tp=2, pp=3, ep=2, grouped_gemm=True),
        dict(tp=2, ep=4, etp=1),
        dict(tp=2, pp=3, vocab_divisible_by=48),  # padding covers the MTP copies
    ],
)
def test_round_trip_is_bit_exact_with_mtp(deepseek, tmp_path, layout):
    mc, back = str(tmp_path / "mc"), str(tmp_path / "back")
    convert(deepseek, mc, ck.Target(to="mcore", **layout))
    assert ck.load(mc).spec.mtp_layers == 1
    convert(mc, back, ck.Target(to="hf"))
    assert_same_tensors(deepseek, back)


def test_megatron_keys_follow_the_format_rules(deepseek, tmp_path):
    mc = str(tmp_path / "mc")
    convert(deepseek, mc, ck.Target(to="mcore", tp=2, pp=3))
    sd = hf_state(deepseek)
    last = torch.load(
        os.path.join(mc, "iter_0000001", "mp_rank_01_002", "model_optim_rng.pt"), weights_only=False
    )
    model = last["model"]
    keys = list(model)
    # MTP block first on the last stage: enorm, hnorm, eh_proj, its own embedding copy, the layer, its norm
    assert keys[:4] == [
        "mtp.layers.0.enorm.weight",
        "mtp.layers.0.hnorm.weight",
        "mtp.layers.0.eh_proj.weight",
        "embedding.word_embeddings.weight",
    ]
    assert keys[-2:] == ["final_layernorm.weight", "output_layer.weight"]
    assert "mtp.final_layernorms.0.weight" in keys and "decoder.final_layernorm.weight" not in keys
    p = "mtp.layers.0.transformer_layer.self_attention."
    h = f"model.layers.{L}.self_attn."
    # MLA: linear_qkv = [q_a; kv_a] replicated; up-projections split on dim 0; o_proj on dim 1
    assert torch.equal(
        model[p + "linear_qkv.weight"],
        torch.cat([sd[h + "q_a_proj.weight"], sd[h + "kv_a_proj_with_mqa.weight"]]),
    )
    assert torch.equal(model[p + "linear_q_up_proj.weight"], sd[h + "q_b_proj.weight"].chunk(2)[1])
    assert torch.equal(model[p + "linear_kv_up_proj.weight"], sd[h + "kv_b_proj.weight"].chunk(2)[1])
    assert torch.equal(model[p + "linear_proj.weight"], sd[h + "o_proj.weight"].chunk(2, 1)[1])
    assert torch.equal(model[p + "q_layernorm.weight"], sd[h + "q_a_layernorm.weight"])
    assert torch.equal(
        model["mtp.layers.0.eh_proj.weight"], sd[f"model.layers.{L}.eh_proj.weight"].chunk(2)[1]
    )
    assert torch.equal(
        model["mtp.final_layernorms.0.weight"], sd[f"model.layers.{L}.shared_head.norm.weight"]
    )
    assert torch.equal(
        model["mtp.layers.0.transformer_layer.mlp.router.expert_bias"],
        sd[f"model.layers.{L}.mlp.gate.e_score_correction_bias"],
    )
    assert torch.equal(model["embedding.word_embeddings.weight"], sd["model.embed_tokens.weight"].chunk(2)[1])
    # the dense first layer keeps a dense MLP; later layers are MoE with shared experts
    first = torch.load(
        os.path.join(mc, "iter_0000001", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False
    )["model"]
    assert (
        "decoder.layers.0.mlp.linear_fc1.weight" in first
        and "decoder.layers.0.mlp.router.weight" not in first
    )
    args = last["args"]
    assert (args.multi_latent_attention, args.q_lora_rank, args.kv_lora_rank, args.mtp_num_layers) == (
        True,
        24,
        16,
        1,
    )
    assert (args.qk_head_dim, args.qk_pos_emb_head_dim, args.v_head_dim) == (8, 4, 8)


def megatron_core_names(model: dict, release: tuple[int, int]) -> dict:
    """A rank file's state dict (MindSpeed-LLM's MTP names) under Megatron-Core's own GPTModel
    names of ``release``, in its state-dict order.  From Megatron-LM's source: GPTModel registers
    embedding, decoder (its final norm decoder.final_layernorm), mtp, output_layer; a
    MultiTokenPredictionLayer registers enorm, hnorm, eh_proj, its transformer layer
    (``transformer_layer``; ``mtp_model_layer`` from core_v0.17.0), final_layernorm."""
    layer = "mtp_model_layer" if release >= (0, 17) else "transformer_layer"
    renamed = {}
    for key, value in model.items():
        key = re.sub(r"^mtp\.layers\.(\d+)\.transformer_layer\.", rf"mtp.layers.\1.{layer}.", key)
        key = re.sub(r"^mtp\.final_layernorms\.(\d+)\.", r"mtp.layers.\1.final_layernorm.", key)
        renamed["decoder.final_layernorm.weight" if key == "final_layernorm.weight" else key] = value
    modules = ("embedding.", "decoder.layers.", "decoder.", "mtp.", "output_layer.")
    return dict(
        sorted(renamed.items(), key=lambda kv: next(i for i, m in enumerate(modules) if kv[0].startswith(m)))
    )


def test_megatron_core_017_mtp_names_read_and_written(deepseek, tmp_path):
    """Megatron-Core 0.17 renamed the MTP layer's transformer layer mtp_model_layer; its torch-format
    files hold its GPTModel's own state dict.  Such files read bit-exact, --megatron-version 0.17
    writes exactly them, and an mcore -> mcore conversion keeps a source's naming unless
    --megatron-version names another release."""
    mc, mc17, out17 = (str(tmp_path / n) for n in ("mc", "mc17", "out17"))
    layout = dict(tp=2, pp=3)
    convert(deepseek, mc, ck.Target(to="mcore", **layout))
    shutil.copytree(mc, mc17)
    ranks = sorted(os.listdir(os.path.join(mc, "iter_0000001")))
    for r in ranks:
        f = os.path.join(mc17, "iter_0000001", r, "model_optim_rng.pt")
        blob = torch.load(f, weights_only=False)
        blob["model"] = megatron_core_names(blob["model"], (0, 17))
        torch.save(blob, f)
    back = str(tmp_path / "back")
    convert(mc17, back, ck.Target(to="hf"))
    assert_same_tensors(deepseek, back)

    convert(deepseek, out17, ck.Target(to="mcore", megatron_version="0.17", **layout))
    assert sorted(os.listdir(os.path.join(out17, "iter_0000001"))) == ranks
    for r in ranks:
        got, want = (
            torch.load(os.path.join(d, "iter_0000001", r, "model_optim_rng.pt"), weights_only=False)["model"]
            for d in (out17, mc17)
        )
        assert list(got) == list(want), r
        assert all(torch.equal(got[k], want[k]) for k in want), r

    kept, older = str(tmp_path / "kept"), str(tmp_path / "older")
    convert(mc17, kept, ck.Target(to="mcore"))
    convert(mc17, older, ck.Target(to="mcore", megatron_version="0.16"))
    keys_kept, keys_older = (
        list(
            torch.load(
                os.path.join(d, "iter_0000001", "mp_rank_00", "model_optim_rng.pt"), weights_only=False
            )["model"]
        )
        for d in (kept, older)
    )
    assert (
        any(".mtp_model_layer." in k for k in keys_kept)
        and "mtp.layers.0.final_layernorm.weight" in keys_kept
    )
    assert keys_older == [k.replace(".mtp_model_layer.", ".transformer_layer.") for k in keys_kept]


def test_transformers_logits_unchanged_after_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    src = build_deepseek(str(tmp_path / "hf"), mtp=False)
    mc, back = str(tmp_path / "mc"), str(tmp_path / "back")
    convert(src, mc, ck.Target(to="mcore", tp=2, ep=2, pp=3))
    convert(mc, back, ck.Target(to="hf"))
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)


def test_mtp_copies_that_differ_are_not_dropped(deepseek, tmp_path):
    """Megatron stores the MTP output head once (shared with lm_head): a differing copy would be
    lost, so the conversion refuses before writing."""
    src = str(tmp_path / "hf")
    shutil.copytree(deepseek, src)
    f = os.path.join(src, "model.safetensors")
    sd = load_file(f)
    sd[f"model.layers.{L}.shared_head.head.weight"][3, 3] += 1
    save_file(sd, f, metadata={"format": "pt"})
    dst = tmp_path / "mc"
    with pytest.raises(CkptIrError, match="mtp.head.weight differs from lm_head.weight"):
        convert(src, str(dst), ck.Target(to="mcore"))
    assert not dst.exists()


def test_mindspeed_drop_in_mtp_flag(deepseek, tmp_path):
    """MindSpeed-LLM keeps --mtp-num-layers MTP layers (default 0) and never stores the MTP head:
    the drop-in does the same, but says so (a warning, and the dropped list)."""
    import subprocess
    import sys

    src = str(tmp_path / "hf")
    shutil.copytree(deepseek, src)
    f = os.path.join(src, "model.safetensors")
    sd = load_file(f)
    sd[f"model.layers.{L}.shared_head.head.weight"][0, 0] += 1  # a head that is not lm_head's copy
    save_file(sd, f, metadata={"format": "pt"})
    base = [
        sys.executable,
        "-m",
        "ckpt_ir",
        "convert-ckpt",
        "--load-dir",
        src,
        "--model-type-hf",
        "deepseek3",
    ]
    r = subprocess.run([*base, "--save-dir", str(tmp_path / "no-mtp")], capture_output=True, text=True)
    assert r.returncode == 0 and "dropping 1 multi-token-prediction layer(s)" in r.stderr
    assert ck.load(str(tmp_path / "no-mtp")).spec.mtp_layers == 0
    r = subprocess.run(
        [
            *base,
            "--save-dir",
            str(tmp_path / "mtp"),
            "--mtp-num-layers",
            "1",
            "--target-pipeline-parallel-size",
            "3",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert ck.load(str(tmp_path / "mtp")).spec.mtp_layers == 1
