"""Plain Megatron-LM args (no HF config, no family name) lead to the HF family that computes the
same function: inferred from the args, printed, and refused with the args named when no family
matches.  Checkpoints are written by ckpt-ir from tiny HF models of each family, then their args
are cut down to the keys Megatron-LM itself writes, so nothing of the HF config survives."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import ckpt_ir.api as ck
from ckpt_ir.commands.cli import main as cli_main
from ckpt_ir.errors import FormatError
from ckpt_ir.megatron.args import Args
from ckpt_ir.megatron.infer import infer
from tests.conftest import build_hf
from tests.test_hf_roundtrip import assert_same_tensors

# the model-describing args Megatron-LM's own argparse defines (megatron/training/arguments.py)
MEGATRON_ARGS = frozenset(
    """
num_layers hidden_size ffn_hidden_size num_attention_heads num_query_groups group_query_attention kv_channels
vocab_size padded_vocab_size max_position_embeddings seq_length norm_epsilon normalization swiglu add_qkv_bias
add_bias_linear qk_layernorm untie_embeddings_and_output_weights position_embedding_type rotary_base
use_rotary_position_embeddings tensor_model_parallel_size pipeline_model_parallel_size expert_model_parallel_size
expert_tensor_parallel_size num_layers_per_virtual_pipeline_stage virtual_pipeline_model_parallel_size
num_experts moe_router_topk moe_ffn_hidden_size moe_shared_expert_intermediate_size moe_shared_expert_gate
moe_layer_freq moe_grouped_gemm moe_router_pre_softmax moe_router_score_function moe_router_enable_expert_bias
moe_router_topk_scaling_factor moe_router_num_groups moe_router_group_topk multi_latent_attention q_lora_rank
kv_lora_rank qk_head_dim qk_pos_emb_head_dim v_head_dim mtp_num_layers transformer_impl bf16 fp16
make_vocab_size_divisible_by rope_type rotary_scaling_factor mscale mscale_all_dim
""".split()
)


def plain_args(root: str) -> dict:
    """Rewrite every rank file's args to Megatron-LM's own keys only; returns them."""
    it = os.path.join(root, "iter_0000001")
    kept = {}
    for d in os.listdir(it):
        f = os.path.join(it, d, "model_optim_rng.pt")
        blob = torch.load(f, weights_only=False)
        kept = {k: v for k, v in vars(blob["args"]).items() if k in MEGATRON_ARGS}
        blob["args"] = argparse.Namespace(**kept)
        torch.save(blob, f)
    return kept


def _megatron(tmp_path, hf: str, *flags: str) -> str:
    mc = str(tmp_path / "mc")
    assert cli_main(["convert", hf, mc, "--to", "mcore", "--quiet", *flags]) == 0
    plain_args(mc)
    return mc


def _moe(path: str, family: str) -> str:
    from tests.test_moe import build_moe

    return build_moe(path, family, layers=3, **({"mlp_only_layers": [1]} if family == "qwen3_moe" else {}))


def _deepseek(path: str) -> str:
    from tests.test_deepseek import build_deepseek

    return build_deepseek(path, mtp=True)


BUILDERS = {
    "llama": lambda p: build_hf(p, "llama", layers=2, tied=True),
    "qwen2": lambda p: build_hf(p, "qwen2", layers=2),
    "qwen3": lambda p: build_hf(p, "qwen3", layers=2),
    "mixtral": lambda p: _moe(p, "mixtral"),
    "qwen2_moe": lambda p: _moe(p, "qwen2_moe"),
    "qwen3_moe": lambda p: _moe(p, "qwen3_moe"),
    "deepseek_v3": _deepseek,
}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_plain_args_infer_the_family_and_convert_bit_exact(tmp_path, capsys, family):
    hf = BUILDERS[family](str(tmp_path / "hf"))
    moe = family in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
    mc = _megatron(tmp_path, hf, "--tp", "2", *(("--ep", "2") if moe else ("--pp", "2")))
    capsys.readouterr()
    back = str(tmp_path / "back")
    assert cli_main(["convert", mc, back, "--to", "hf"]) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "inferred family" in ln)
    assert f"inferred family {family} from args (" in line
    assert_same_tensors(hf, back)
    cfg = json.load(open(os.path.join(back, "config.json")))
    assert cfg["model_type"] == family
    if family == "deepseek_v3":  # args rope_type "rope" (plain rotary): no YaRN invented
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        assert rope.get("rope_type", rope.get("type", "default")) == "default", rope
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    ids = torch.randint(0, a.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same tensors and config; float summation order may differ by file layout
        assert torch.allclose(a(ids).logits, b(ids).logits, rtol=0, atol=1e-5)


def test_mcore_reshard_needs_no_family_name(tmp_path, capsys):
    hf = build_hf(str(tmp_path / "hf"), "qwen2", layers=4)
    mc = _megatron(tmp_path, hf, "--tp", "2", "--pp", "2")
    re_ = str(tmp_path / "re")
    assert cli_main(["convert", mc, re_, "--to", "mcore", "--tp", "1", "--pp", "4"]) == 0
    assert "inferred family qwen2" in capsys.readouterr().err
    back = str(tmp_path / "back")
    assert cli_main(["convert", re_, back, "--to", "hf", "--quiet"]) == 0
    assert_same_tensors(hf, back)


def test_model_type_hf_chooses_explicitly(tmp_path, capsys):
    """llama and mistral compute the same function: inference says llama, --model-type-hf mistral wins."""
    hf = build_hf(str(tmp_path / "hf"), "llama", layers=2)
    mc = _megatron(tmp_path, hf)
    back = str(tmp_path / "back")
    assert cli_main(["convert", mc, back, "--to", "hf", "--model-type-hf", "mistral"]) == 0
    assert "family mistral (--model-type-hf)" in capsys.readouterr().err
    assert json.load(open(os.path.join(back, "config.json")))["model_type"] == "mistral"
    assert_same_tensors(hf, back)
    # a family that cannot express the args is refused, naming the field
    with pytest.raises(FormatError, match="qkv_bias"):
        ck.load(mc, family="qwen2")


BASE = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    swiglu=True,
    normalization="RMSNorm",
    position_embedding_type="rope",
    add_bias_linear=False,
    padded_vocab_size=128,
)


@pytest.mark.parametrize(
    "args, family",
    [
        ({}, "llama"),
        ({"add_qkv_bias": True}, "qwen2"),
        ({"qk_layernorm": True}, "qwen3"),
        ({"num_experts": 4, "moe_router_topk": 2}, "mixtral"),
        (
            {"num_experts": 4, "moe_router_topk": 2, "qk_layernorm": True, "moe_layer_freq": [1, 0]},
            "qwen3_moe",
        ),
        (
            {
                "num_experts": 4,
                "moe_router_topk": 2,
                "add_qkv_bias": True,
                "moe_shared_expert_intermediate_size": 64,
                "moe_shared_expert_gate": True,
                "moe_router_pre_softmax": True,
            },
            "qwen2_moe",
        ),
    ],
)
def test_rule_table(args, family):
    fam, cfg, why = infer({**BASE, **args}, "args")
    assert fam.name == family and why.startswith(f"inferred family {family} from args (swiglu, RMSNorm, rope")


@pytest.mark.parametrize(
    "args, words",
    [
        ({"normalization": "LayerNorm"}, ["args.normalization='LayerNorm'", "'RMSNorm'"]),
        ({"swiglu": None}, ["args.swiglu=False"]),  # absent: Megatron-LM's default
        ({"add_bias_linear": True}, ["args.add_bias_linear=True"]),
        (
            {"num_experts": 4, "moe_router_topk": 2, "add_qkv_bias": True},
            [
                "turn on: add_qkv_bias, num_experts;",
                "qwen2 has no num_experts",
                "mixtral has no add_qkv_bias",
            ],
        ),
        (
            {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32},
            ["look like mixtral", "ffn_hidden_size: args give 128"],
        ),
    ],
)
def test_refusal_names_the_args(args, words):
    with pytest.raises(FormatError) as e:
        infer({**BASE, **args}, "rank.pt")
    msg = str(e.value)
    assert "\n" not in msg and "pass hf_config=..." in msg and "family=..." in msg
    for w in words:
        assert w in msg, msg


def test_refusal_through_the_cli_is_one_line(tmp_path, capsys):
    hf = build_hf(str(tmp_path / "hf"), "llama", layers=2)
    mc = _megatron(tmp_path, hf)
    f = os.path.join(mc, "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    blob = torch.load(f, weights_only=False)
    blob["args"].normalization = "LayerNorm"
    torch.save(blob, f)
    capsys.readouterr()
    assert cli_main(["convert", mc, str(tmp_path / "x"), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "normalization" in err and not os.path.exists(tmp_path / "x")


def test_megatron_defaults_fill_absent_args():
    a = Args({"num_layers": 3, "moe_layer_freq": 2})
    assert a["untie_embeddings_and_output_weights"] is False and a.dense_layers() == (1,)
    assert Args({"use_rotary_position_embeddings": True}).position_embedding() == "rope"


# ---------------------------------------------------------------------------------------------
# Transformer Engine's _extra_state (FP8 metadata) through Megatron -> Megatron


def _add_extra_state(root: str) -> dict:
    """Give every linear module of every rank file an ``_extra_state`` unique to (module, TP rank),
    alternately a uint8 tensor (TE >= 2) and a BytesIO (older TE), as Transformer Engine saves them.
    Returns {(model layer, module, TP rank): bytes}."""
    import io
    import re

    it = os.path.join(root, "iter_0000001")
    made = {}
    for d in sorted(os.listdir(it)):
        tp_rank, stage = int(d.split("_")[2]), int(d.split("_")[3]) if d.count("_") > 2 else 0
        f = os.path.join(it, d, "model_optim_rng.pt")
        blob = torch.load(f, weights_only=False)
        per_stage = blob["args"].num_layers // blob["args"].pipeline_model_parallel_size
        sd = blob["model"]
        for k in [k for k in sd if k.endswith((".linear_qkv.weight", ".linear_fc2.weight"))]:
            i, module = re.match(r"decoder\.layers\.(\d+)\.(.*)\.weight", k).groups()
            layer = stage * per_stage + int(i)
            data = f"fp8 meta of layer {layer} {module} tp{tp_rank}".encode()
            made[(layer, module, tp_rank)] = data
            value = torch.frombuffer(bytearray(data), dtype=torch.uint8) if layer % 2 else io.BytesIO(data)
            sd[k[: -len("weight")] + "_extra_state"] = value
        torch.save(blob, f)
    return made


def test_te_extra_state_follows_an_unchanged_module_shard(tmp_path, capsys):
    hf = build_hf(str(tmp_path / "hf"), "llama", layers=4)
    mc = _megatron(tmp_path, hf, "--tp", "2", "--pp", "2")
    made = _add_extra_state(mc)
    re_ = str(tmp_path / "pp1")  # same TP: every module shard keeps its state, under its new layer number
    assert cli_main(["convert", mc, re_, "--to", "mcore", "--tp", "2", "--quiet"]) == 0
    seen = {}
    for r in range(2):
        sd = torch.load(
            os.path.join(re_, "iter_0000001", f"mp_rank_{r:02d}", "model_optim_rng.pt"), weights_only=False
        )["model"]
        for k, v in sd.items():
            if k.endswith("_extra_state"):
                layer, module = k.split(".", 3)[2], k.split(".", 3)[3][: -len("._extra_state")]
                seen[(int(layer), module, r)] = (
                    bytes(v.numpy()) if isinstance(v, torch.Tensor) else v.getvalue()
                )
    assert seen == made
    # another TP size: the FP8 state belongs to other shards; reported as dropped, not written
    capsys.readouterr()
    assert cli_main(["convert", mc, str(tmp_path / "tp1"), "--to", "mcore", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "dropped: *._extra_state: Transformer-Engine _extra_state (FP8 metadata) of another module layout "
        "(TP 2 -> 1)"
        in out
        and "_extra_state  " not in out
    )
