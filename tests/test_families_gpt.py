"""Classic GPT families of ``ckpt_ir/families/gpt.py``: tiny random models built and saved by
transformers (``tests/family_models.py``) convert HF -> Megatron-Core -> HF bit-exactly, with
transformers' logits on the result equal to the original's.  megatron-core's own logits on the
rank files are in ``test_megatron_oracle.py``; a Megatron-LM GPT converted to GPT-2 without an HF
config in ``test_megatron_args_only.py``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.family_models import assert_round_trip, model_cache
from tests.test_hf_roundtrip import assert_same_tensors, convert, hf_state

# per family: the Megatron layouts to round-trip through
LAYOUTS = {
    # tied: with PP the last stage holds the output layer's copy of the embedding
    "gpt2": (dict(tp=2, pp=2, num_layer_list=(1, 3)),),
    # tied, Transformer Engine's norm names (LayerNorm weights and biases fused into linear_qkv / fc1)
    "starcoder2": (dict(tp=2, pp=2, num_layer_list=(3, 1), norm_names="te"),),
    "stablelm": (dict(tp=2, pp=2),),
    "gpt_neox": (dict(tp=2, pp=2, num_layer_list=(1, 3)),),
    "phi": (dict(tp=2, pp=2, num_layer_list=(3, 1), norm_names="te"),),
    "nemotron": (dict(tp=2, pp=2, num_layer_list=(1, 3)),),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, "gpt")


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    assert_round_trip(models(family), tmp_path, family, LAYOUTS[family][layout])


def test_gpt2_as_openai_released_it_is_read(models, tmp_path):
    """openai-community/gpt2 stores the bare GPT2Model's names (no ``transformer.`` prefix) and
    each layer's causal-mask buffers ``attn.bias`` / ``attn.masked_bias``, which transformers
    ignores: read as the same model (the buffers reported dropped), written in transformers'
    names."""
    src = models("gpt2")
    old = str(tmp_path / "old")
    os.makedirs(old)
    sd = {k.removeprefix("transformer."): v for k, v in load_file(f"{src}/model.safetensors").items()}
    for i in range(4):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32, dtype=torch.uint8)).view(1, 1, 32, 32)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, f"{old}/model.safetensors", metadata={"format": "pt"})
    with open(f"{src}/config.json") as a, open(f"{old}/config.json", "w") as b:
        b.write(a.read())
    c = ck.load(old)
    # reported under the names the file holds
    assert sorted(c.dropped) == sorted(f"h.{i}.attn.{b}" for i in range(4) for b in ("bias", "masked_bias"))
    back = str(tmp_path / "back")
    convert(old, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_gpt2_peft_adapter_merge_equals_peft_merge_and_unload(models, tmp_path):
    """LoRA on GPT-2's Conv1D layers (peft's fan_in_fan_out: A [r, in] and B [out, r], the weight
    stored [in, out]; c_attn's B rows are [q; k; v]) and full copies of both c_proj modules
    (modules_to_save, stored [in, out] like their base) merge to exactly what peft gives."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.test_lora import cli

    base, adapter, out = models("gpt2"), str(tmp_path / "adapter"), str(tmp_path / "merged")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], modules_to_save=["c_proj"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(adapter)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base_model, adapter).merge_and_unload().state_dict()
    cli("convert", base, out, "--to", "hf", "--lora-load", adapter)
    ours = hf_state(out)
    assert set(ours) <= set(merged)
    for k in ours:
        assert torch.equal(ours[k], merged[k]), k


def test_gpt_neox_rank_files_follow_the_format_facts(models, tmp_path):
    """GPT-NeoX's query_key_value is [q; k; v] head by head (transformers views its rows as
    [heads, 3, head_dim]), which is Megatron's per-group linear_qkv order with one head per group:
    TP rank t holds the HF rows of its heads unchanged.  The args ask for exact GELU (no fused
    bias-GELU, whose tanh form Megatron-LM would use by default) and a quarter-head rotary; a
    config written before transformers 5 (rotary_pct, rotary_emb_base) and the mask buffers of
    such checkpoints (attention.bias, attention.masked_bias) are read too."""
    src = models("gpt_neox")
    old = str(tmp_path / "old")
    os.makedirs(old)
    sd = load_file(f"{src}/model.safetensors")
    for i in range(4):
        sd[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        sd[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(sd, f"{old}/model.safetensors", metadata={"format": "pt"})
    with open(f"{src}/config.json") as fh:
        cfg = json.load(fh)
    del cfg["rope_parameters"]
    with open(f"{old}/config.json", "w") as fh:
        json.dump(dict(cfg, rotary_pct=0.5, rotary_emb_base=1234), fh)
    mid = str(tmp_path / "mid")
    convert(old, mid, ck.Target(to="mcore", tp=2))
    h, heads, d = 64, 4, 16
    qkv = sd["gpt_neox.layers.0.attention.query_key_value.weight"].view(heads, 3, d, h)
    qkv_bias = sd["gpt_neox.layers.0.attention.query_key_value.bias"].view(heads, 3, d)
    for t in range(2):
        blob = torch.load(f"{mid}/iter_0000001/mp_rank_0{t}/model_optim_rng.pt", weights_only=False)
        mine = slice(t * heads // 2, (t + 1) * heads // 2)
        model = blob["model"]
        assert torch.equal(
            model["decoder.layers.0.self_attention.linear_qkv.weight"], qkv[mine].reshape(-1, h)
        )
        assert torch.equal(
            model["decoder.layers.0.self_attention.linear_qkv.bias"], qkv_bias[mine].reshape(-1)
        )
        assert torch.equal(model["output_layer.weight"], sd["embed_out.weight"][t * 64 : (t + 1) * 64])
        args = vars(blob["args"])
        want = dict(
            normalization="LayerNorm",
            swiglu=False,
            add_bias_linear=True,
            bias_gelu_fusion=False,
            rotary_percent=0.5,
            rotary_base=1234,
            untie_embeddings_and_output_weights=True,
        )
        assert {k: args.get(k) for k in want} == want
    assert sorted(ck.load(old).dropped) == sorted(
        f"gpt_neox.layers.{i}.attention.{b}" for i in range(4) for b in ("bias", "masked_bias")
    )


def test_stablelm_with_parallel_residual_has_no_mlp_norm(tmp_path):
    """StableLM 2 12B's layers (use_parallel_residual): attention and MLP both read
    input_layernorm and there is no post_attention_layernorm; the round trip is bit-exact, with
    transformers' logits, and the rank files hold no pre-MLP norm."""
    from tests.family_models import CONFIGS, build

    configs = {"stablelm": dict(CONFIGS["stablelm"], use_parallel_residual=True)}
    src = build(str(tmp_path / "src"), "stablelm", layers=2, configs=configs)
    assert not any("post_attention_layernorm" in k for k in load_file(f"{src}/model.safetensors"))
    assert_round_trip(src, tmp_path, "stablelm", dict(tp=2))
    keys = torch.load(f"{tmp_path}/mid/iter_0000001/mp_rank_00/model_optim_rng.pt", weights_only=False)[
        "model"
    ]
    assert "decoder.layers.0.input_layernorm.bias" in keys
    assert not any("pre_mlp_layernorm" in k for k in keys)


def test_verify_runs_gpt_neox_whose_output_layer_transformers_renames(models, capsys):
    """GPT-NeoX's checkpoint names the output layer embed_out, its module is lm_head (transformers
    5 renames it on load): ``ckpt-ir verify`` gives each unit the tensors transformers would."""
    from ckpt_ir.commands.cli import main

    src = models("gpt_neox")
    assert main(["verify", src, src]) == 0
    assert "logits max|diff| 0" in capsys.readouterr().out
