"""Megatron's side of the Mamba hybrids (mamba2, nemotron_h): the args ckpt-ir writes
(megatron-core's MambaModel and Megatron-LM's HybridModel fields), plain Megatron-LM args read
back with no HF config (the family inferred), MindSpeed-LLM's Mamba-2 rank files (no args at all),
and torch_dist, where megatron-core stores every layer under its global number and the Mamba
mixer's fused tensors part by part.

Expected values come from the format facts in docs/reference/composed-blocks.md (§2.1 args, §2.2
keys, §2.3 TP parts and torch_dist keys, §4.1 MindSpeed-LLM's files) applied to the tiny models'
HF configs, never from ckpt-ir's own output."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch

from ckpt_ir.commands.cli import main as cli_main
from ckpt_ir.errors import CkptIrError, FormatError
from ckpt_ir.megatron.args import Args
from ckpt_ir.megatron.infer import infer
from tests.family_models import build
from tests.test_family_inference import MEGATRON_ARGS
from tests.test_hf_roundtrip import IDS, assert_same_tensors, hf_state, logits

# the tiny models: Mamba-2 mixers of 8 heads x 16, 2 groups, state 16, conv 4 (d_inner 128 = 2 x hidden)
MAMBA = dict(hidden_size=64, vocab_size=128, conv_kernel=4, n_groups=2)
MAMBA2 = dict(MAMBA, state_size=16, head_dim=16, expand=2, num_heads=8, tie_word_embeddings=True)
NEMOTRON_H = dict(
    MAMBA,
    ssm_state_size=16,
    mamba_num_heads=8,
    mamba_head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
    layers_block_type=["linear_attention", "full_attention", "mlp", "moe", "linear_attention", "mlp"],
)
# megatron-core's hybrid layer symbols (ssm/mamba_hybrid_layer_allocation.py Symbols) per HF layer type
SYMBOL = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
# Megatron-LM's args for hybrid models beside its GPT ones (megatron/training/arguments.py and the
# TransformerConfig fields it turns into args: 0.16 and HEAD)
HYBRID_ARGS = MEGATRON_ARGS | {
    "is_hybrid_model",
    "hybrid_override_pattern",
    "hybrid_layer_pattern",
    "hybrid_attention_ratio",
    "hybrid_mlp_ratio",
    "mamba_state_dim",
    "mamba_head_dim",
    "mamba_num_groups",
    "mamba_num_heads",
    "squared_relu",
    "spec",
}
# megatron-core 0.16's stock MambaModel layer spec, as Megatron-LM's --spec names it
STOCK_SPEC = ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mamba_megatron")
    return {
        "mamba2": build(str(root / "mamba2"), "mamba2", layers=4, configs={"mamba2": MAMBA2}),
        "nemotron_h": build(
            str(root / "nemotron_h"), "nemotron_h", layers=6, configs={"nemotron_h": NEMOTRON_H}
        ),
    }


def _rank_files(root: str) -> list[str]:
    it = os.path.join(root, "iter_0000001")
    return [os.path.join(it, d, "model_optim_rng.pt") for d in sorted(os.listdir(it))]


def _megatron_lm_args(root: str, drop: tuple[str, ...] = (), **set_: object) -> dict:
    """Every rank file's args cut down to Megatron-LM's own keys (nothing of the HF config or of
    ckpt-ir's survives), less ``drop``, with ``set_``; returns them."""
    kept: dict = {}
    for f in _rank_files(root):
        blob = torch.load(f, weights_only=False)
        kept = {k: v for k, v in vars(blob["args"]).items() if k in HYBRID_ARGS and k not in drop}
        kept.update(set_)
        blob["args"] = argparse.Namespace(**kept)
        torch.save(blob, f)
    shutil.rmtree(os.path.join(root, "hf"), ignore_errors=True)  # ckpt-ir's copy of the HF config
    return kept


def _to_hf(capsys, src: str, dst: str, *flags: str) -> str:
    capsys.readouterr()
    assert cli_main(["convert", src, dst, "--to", "hf", *flags]) == 0
    return capsys.readouterr().err


def test_nemotron_h_args_written_and_read_back_as_megatron_lm_writes_them(models, tmp_path, capsys):
    hf = models["nemotron_h"]
    cfg = json.load(open(os.path.join(hf, "config.json")))
    pattern = "".join(SYMBOL[t] for t in cfg["layers_block_type"])
    mc = str(tmp_path / "mc")
    assert (
        cli_main(["convert", hf, mc, "--to", "mcore", "--tp", "2", "--pp", "2", "--num-layer-list", "2,4"])
        == 0
    )
    args = vars(torch.load(_rank_files(mc)[0], weights_only=False)["args"])
    # one Megatron layer per block; HEAD's pattern marks the pipeline stages with |
    assert args["is_hybrid_model"] is True and args["num_layers"] == len(pattern)
    assert args["hybrid_override_pattern"] == pattern
    assert args["hybrid_layer_pattern"] == pattern[:2] + "|" + pattern[2:]
    assert (
        args["mamba_state_dim"],
        args["mamba_head_dim"],
        args["mamba_num_groups"],
        args["mamba_num_heads"],
    ) == (
        cfg["ssm_state_size"],
        cfg["mamba_head_dim"],
        cfg["n_groups"],
        cfg["mamba_num_heads"],
    )
    # Nemotron-H's attention has no rotary embedding; its MLP is a non-gated squared ReLU
    assert args["position_embedding_type"] == "none" and not args["use_rotary_position_embeddings"]
    assert args["squared_relu"] is True and args["swiglu"] is False
    assert (args["num_attention_heads"], args["num_query_groups"], args["kv_channels"]) == (4, 2, 16)
    assert "spec" not in args  # local norm names: MindSpeed-LLM's layer spec, not megatron-core's

    # Megatron-LM HEAD: hybrid_layer_pattern alone says the model and its (uneven) stages
    head = str(tmp_path / "head")
    shutil.copytree(mc, head)
    _megatron_lm_args(head, drop=("num_layer_list", "is_hybrid_model", "hybrid_override_pattern"))
    back = str(tmp_path / "back")
    err = _to_hf(capsys, head, back)
    assert f"inferred family nemotron_h from args (hybrid pattern '{pattern}'" in err
    assert_same_tensors(hf, back)
    assert json.load(open(os.path.join(back, "config.json")))["model_type"] == "nemotron_h"
    assert torch.equal(logits(hf, IDS), logits(back, IDS))

    # Megatron-LM 0.16: hybrid_override_pattern, the stages from the first stage's size
    old = str(tmp_path / "old")
    shutil.copytree(mc, old)
    _megatron_lm_args(
        old,
        drop=("num_layer_list", "hybrid_layer_pattern", "is_hybrid_model"),
        decoder_first_pipeline_num_layers=2,
    )
    _to_hf(capsys, old, str(tmp_path / "back_old"))
    assert_same_tensors(hf, str(tmp_path / "back_old"))
    # without a stage size the layers would be split evenly, which the files contradict
    _megatron_lm_args(old, drop=("decoder_first_pipeline_num_layers",))
    assert cli_main(["convert", old, str(tmp_path / "wrong"), "--to", "hf"]) != 0
    assert "local layer" in capsys.readouterr().err


def test_mamba2_args_need_attention_sizes_and_read_back_from_a_megatron_016_run(models, tmp_path, capsys):
    hf = models["mamba2"]
    cfg = json.load(open(os.path.join(hf, "config.json")))
    mc = str(tmp_path / "mc")
    assert cli_main(["convert", hf, mc, "--to", "mcore", "--tp", "2", "--norm-names", "te"]) == 0
    args = vars(torch.load(_rank_files(mc)[0], weights_only=False)["args"])
    assert args["hybrid_override_pattern"] == "M" * cfg["num_hidden_layers"]
    assert args["mamba_num_heads"] == cfg["num_heads"] and args["mamba_head_dim"] == cfg["head_dim"]
    # no attention: megatron-core's TransformerConfig still needs heads that TP divides (the Mamba
    # heads: the mixer itself needs heads % TP == 0) and derives kv_channels from them
    assert args["num_attention_heads"] == cfg["num_heads"] and args["num_attention_heads"] % 2 == 0
    assert args["kv_channels"] == cfg["head_dim"] and args["num_query_groups"] == cfg["num_heads"]
    assert args["spec"] == STOCK_SPEC and args["transformer_impl"] == "transformer_engine"

    # as Megatron-LM 0.16's pretrain_mamba.py saves a pure Mamba run: no pattern, no is_hybrid_model,
    # hybrid ratios 0, --spec naming the Mamba stack, its GPT defaults for what Mamba does not use
    _megatron_lm_args(
        mc,
        drop=("is_hybrid_model", "hybrid_override_pattern", "hybrid_layer_pattern"),
        hybrid_attention_ratio=0.0,
        hybrid_mlp_ratio=0.0,
        ffn_hidden_size=4 * cfg["hidden_size"],
        swiglu=False,
        add_bias_linear=True,
    )
    back = str(tmp_path / "back")
    err = _to_hf(capsys, mc, back)
    assert "inferred family mamba2 from args (hybrid pattern 'MMMM': Mamba layers only)" in err
    assert_same_tensors(hf, back)
    out = json.load(open(os.path.join(back, "config.json")))
    assert out["model_type"] == "mamba2" and out["expand"] == cfg["expand"]
    assert torch.equal(logits(hf, IDS), logits(back, IDS))


HYBRID = dict(
    hidden_size=64,
    num_attention_heads=4,
    kv_channels=16,
    ffn_hidden_size=96,
    normalization="RMSNorm",
    position_embedding_type="none",
    add_bias_linear=False,
    squared_relu=True,
    untie_embeddings_and_output_weights=True,
    padded_vocab_size=128,
    mamba_state_dim=16,
    mamba_head_dim=16,
    mamba_num_groups=2,
    mamba_num_heads=8,
)


@pytest.mark.parametrize(
    "args, words",
    [
        ({"hybrid_override_pattern": "M*-", "swiglu": True}, ["args.swiglu=True (needs False)"]),
        (
            {"hybrid_override_pattern": "M*", "position_embedding_type": "rope"},
            ["position_embedding_type='rope'"],
        ),
        (
            {"hybrid_override_pattern": "M*", "untie_embeddings_and_output_weights": False},
            ["tied embeddings"],
        ),
        (
            {"hybrid_override_pattern": "ME", "moe_router_score_function": "softmax", "num_experts": 4},
            ["sigmoid"],
        ),
        ({"hybrid_override_pattern": "MG"}, ["gated-delta-net"]),
        ({"hybrid_layer_pattern": "M*/MM"}, ["multi-token-prediction"]),
        ({"hybrid_override_pattern": "MX"}, ["symbol(s) 'X'"]),
    ],
)
def test_hybrid_args_no_family_computes_are_refused_in_one_line(args, words):
    with pytest.raises(CkptIrError) as e:
        infer({**HYBRID, **args}, "rank.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("rank.pt: ")
    for w in words:
        assert w in msg, msg


def test_hybrid_args_are_recognised_and_placed():
    # any of Megatron-LM's markers says hybrid; plain GPT args (ratios 0, no pattern, no spec) do not
    for marker in (
        {"is_hybrid_model": True},
        {"hybrid_layer_pattern": "MM"},
        {"hybrid_attention_ratio": 0.5},
        {"spec": STOCK_SPEC},
        {"spec": ["megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"]},
    ):
        assert Args({"num_layers": 2, **marker}).hybrid, marker
    assert not Args({"num_layers": 2, "hybrid_attention_ratio": 0.0, "hybrid_override_pattern": None}).hybrid
    # megatron-core's MambaStack: first / last stage sizes, the other stages even
    a = Args({"hybrid_override_pattern": "M*-EM-M*", "decoder_last_pipeline_num_layers": 2})
    assert a.hybrid_stages(4) == (2, 2, 2, 2) and a.hybrid_stages(1) is None
    a = Args({"hybrid_override_pattern": "M*-EM-M*", "decoder_first_pipeline_num_layers": 2})
    assert a.hybrid_stages(4) == (2, 2, 2, 2) and a.hybrid_stages(3) == (2, 3, 3)
    with pytest.raises(FormatError, match="PP=5"):
        a.hybrid_stages(5)  # 6 layers over 4 middle stages
    with pytest.raises(FormatError, match="virtual pipeline"):
        Args({"hybrid_layer_pattern": "M*|-E|M-|M*"}).hybrid_stages(2)


def _as_mindspeed_writes(root: str, tp: int, pp: int, layers: int) -> None:
    """ckpt-ir's TP x PP Mamba-2 rank files (local norm names, MindSpeed-LLM's) rewritten as
    MindSpeed-LLM's Mamba-2 converter writes them (composed-blocks.md §4.1, bench/peers/
    mindspeed_v2.py): only ``model``, ``checkpoint_version`` 3.0 and ``iteration`` 1; each rank's
    out_proj a torch.chunk view of the whole weight (saved with the whole weight's storage); with
    PP > 1 the embedding, final norm and output layer on every stage, and stage s also holding the
    earlier stages' layers under negative numbers (local number - layers per stage x s); no hf/."""
    per = layers // pp
    blobs = {}
    for t in range(tp):
        for p in range(pp):
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            blobs[(t, p)] = torch.load(
                os.path.join(root, "iter_0000001", name, "model_optim_rng.pt"), weights_only=False
            )
    out_proj = {}  # (stage, local layer) -> the whole weight, as MindSpeed-LLM chunks it
    for (_, p), blob in sorted(blobs.items()):
        for k, v in blob["model"].items():
            if k.endswith("mixer.out_proj.weight"):
                out_proj.setdefault((p, k), []).append(v)
    shared = {
        k: v
        for blob in blobs.values()
        for k, v in blob["model"].items()
        if not k.startswith("decoder.layers.")
    }
    for t, p in blobs:
        model = {}
        for q in range(p + 1):  # earlier stages' layers again (PP defect), then the stage's own
            for k, v in blobs[(t, q)]["model"].items():
                if not k.startswith("decoder.layers."):
                    continue
                local = int(k.split(".")[2])
                j = local - per * (p - q)
                if k.endswith("mixer.out_proj.weight"):
                    v = torch.cat(out_proj[(q, k)], dim=1).chunk(tp, dim=1)[t]
                    assert not v.is_contiguous()
                model[k.replace(f"decoder.layers.{local}.", f"decoder.layers.{j}.", 1)] = v
        for k in shared:
            # every stage: the embedding and output layer TP-sharded, the final norm whole
            model[k] = next(b["model"][k] for (u, _), b in blobs.items() if u == t and k in b["model"])
        torch.save(
            {"model": model, "checkpoint_version": 3.0, "iteration": 1},
            os.path.join(
                root,
                "iter_0000001",
                (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")),
                "model_optim_rng.pt",
            ),
        )
    shutil.rmtree(os.path.join(root, "hf"))


def test_mindspeed_mamba2_files_without_args_read_with_hf_config(models, tmp_path, capsys):
    hf = models["mamba2"]
    ms = str(tmp_path / "ms")
    assert cli_main(["convert", hf, ms, "--to", "mcore", "--tp", "2", "--pp", "2", "--quiet"]) == 0
    _as_mindspeed_writes(ms, tp=2, pp=2, layers=4)
    # no args, no HF config: one line saying what to pass
    assert cli_main(["convert", ms, str(tmp_path / "no"), "--to", "hf"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no 'args'" in err and "--hf-config DIR" in err
    back = str(tmp_path / "back")
    err = _to_hf(capsys, ms, back, "--hf-config", hf)
    assert "MindSpeed-LLM's Mamba-2 PP output" in err  # its copies, taken as replicas
    assert_same_tensors(hf, back)
    # a copy that differs from the layer it repeats is an error, not silently dropped
    f = os.path.join(ms, "iter_0000001", "mp_rank_00_001", "model_optim_rng.pt")
    blob = torch.load(f, weights_only=False)
    blob["model"]["decoder.layers.-1.mixer.D"] = blob["model"]["decoder.layers.-1.mixer.D"] + 1
    torch.save(blob, f)
    assert cli_main(["convert", ms, str(tmp_path / "bad"), "--to", "hf", "--hf-config", hf]) != 0
    assert "layers.1.mamba.D" in capsys.readouterr().err


def _torch_dist_expected(cfg: dict) -> dict[str, tuple[int, ...]]:
    """megatron-core's torch_dist keys and global shapes of the nemotron_h model (composed-blocks.md
    §2.2-2.3): each layer under its global number, TE norm names (MoE: its own pre_mlp_layernorm),
    the Mamba in_proj / conv1d as parts, experts stacked on an expert axis, decoder.final_norm."""
    h, d = cfg["hidden_size"], cfg["mamba_num_heads"] * cfg["mamba_head_dim"]
    gn, heads, k = cfg["n_groups"] * cfg["ssm_state_size"], cfg["mamba_num_heads"], cfg["conv_kernel"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    e, f, fs, ff = (
        cfg["n_routed_experts"],
        cfg["moe_intermediate_size"],
        cfg["moe_shared_expert_intermediate_size"],
        cfg["intermediate_size"],
    )
    per_kind = {
        "linear_attention": {
            **dict(
                zip(
                    (
                        "in_proj.weight.z",
                        "in_proj.weight.x",
                        "in_proj.weight.B",
                        "in_proj.weight.C",
                        "in_proj.weight.dt",
                    ),
                    ((d, h), (d, h), (gn, h), (gn, h), (heads, h)),
                )
            ),
            **{f"conv1d.weight.{p}": (n, 1, k) for p, n in (("x", d), ("B", gn), ("C", gn))},
            **{f"conv1d.bias.{p}": (n,) for p, n in (("x", d), ("B", gn), ("C", gn))},
            "A_log": (heads,),
            "D": (heads,),
            "dt_bias": (heads,),
            "norm.weight": (d,),
            "out_proj.weight": (h, d),
            "in_proj.layer_norm_weight": (h,),
        },
        "full_attention": {
            "linear_qkv.weight": (q + 2 * kv, h),
            "linear_qkv.layer_norm_weight": (h,),
            "linear_proj.weight": (h, q),
        },
        "mlp": {
            "linear_fc1.weight": (ff, h),
            "linear_fc1.layer_norm_weight": (h,),
            "linear_fc2.weight": (h, ff),
        },
        "moe": {
            "router.weight": (e, h),
            "router.expert_bias": (e,),
            "shared_experts.linear_fc1.weight": (fs, h),
            "shared_experts.linear_fc2.weight": (h, fs),
            "experts.experts.linear_fc1.weight": (e, f, h),
            "experts.experts.linear_fc2.weight": (e, h, f),
        },
    }
    module = {"linear_attention": "mixer", "full_attention": "self_attention", "mlp": "mlp", "moe": "mlp"}
    out = {
        "embedding.word_embeddings.weight": (cfg["vocab_size"], h),
        "decoder.final_norm.weight": (h,),
        "output_layer.weight": (cfg["vocab_size"], h),
    }
    for i, kind in enumerate(cfg["layers_block_type"]):
        out.update({f"decoder.layers.{i}.{module[kind]}.{k}": s for k, s in per_kind[kind].items()})
        if kind == "moe":
            out[f"decoder.layers.{i}.pre_mlp_layernorm.weight"] = (h,)
    return out


def test_torch_dist_holds_megatron_core_hybrid_keys_and_reads_back(models, tmp_path):
    from ckpt_ir.io.dcp import read_metadata

    hf = models["nemotron_h"]
    cfg = json.load(open(os.path.join(hf, "config.json")))
    dist = str(tmp_path / "dist")
    assert cli_main(["convert", hf, dist, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]) == 0
    md = read_metadata(os.path.join(dist, "iter_0000001"))
    assert {k: tuple(t.shape) for k, t in md.tensors.items()} == _torch_dist_expected(cfg)
    common = torch.load(os.path.join(dist, "iter_0000001", "common.pt"), weights_only=False)
    assert common["args"].spec == STOCK_SPEC and common["args"].hybrid_override_pattern == "M*-EM-"
    # the parts are the HF tensor's rows in megatron-core's order: in_proj [z; x; B; C; dt], conv1d [x; B; C]
    import torch.distributed.checkpoint as dcp

    src = hf_state(hf)
    d, gn = cfg["mamba_num_heads"] * cfg["mamba_head_dim"], cfg["n_groups"] * cfg["ssm_state_size"]
    rows = {
        "in_proj.weight": dict(zip("z x B C dt".split(), (d, d, gn, gn, cfg["mamba_num_heads"]))),
        "conv1d.weight": dict(zip("x B C".split(), (d, gn, gn))),
        "conv1d.bias": dict(zip("x B C".split(), (d, gn, gn))),
    }
    parts = {
        f"decoder.layers.4.mixer.{t}.{p}": torch.empty(md.tensors[f"decoder.layers.4.mixer.{t}.{p}"].shape)
        for t, sizes in rows.items()
        for p in sizes
    }
    dcp.load(parts, checkpoint_id=os.path.join(dist, "iter_0000001"), no_dist=True)
    for t, sizes in rows.items():
        whole = src[f"backbone.layers.4.mixer.{t}"]
        start = 0
        for p, n in sizes.items():
            assert torch.equal(parts[f"decoder.layers.4.mixer.{t}.{p}"], whole[start : start + n]), (t, p)
            start += n
    back = str(tmp_path / "back")
    assert cli_main(["convert", dist, back, "--to", "hf", "--quiet"]) == 0
    assert_same_tensors(hf, back)
    # a TP2 PP2 Megatron checkpoint becomes the same torch_dist
    mc, dist2 = str(tmp_path / "mc"), str(tmp_path / "dist2")
    assert (
        cli_main(
            [
                "convert",
                hf,
                mc,
                "--to",
                "mcore",
                "--tp",
                "2",
                "--pp",
                "2",
                "--num-layer-list",
                "4,2",
                "--quiet",
            ]
        )
        == 0
    )
    assert cli_main(["convert", mc, dist2, "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]) == 0
    assert cli_main(["convert", dist2, str(tmp_path / "back2"), "--to", "hf", "--quiet"]) == 0
    assert_same_tensors(hf, str(tmp_path / "back2"))


def test_hybrid_ratios_allocate_the_layers_megatron_core_builds():
    """Megatron-LM 0.16 runs may give only hybrid_attention_ratio / hybrid_mlp_ratio: the pattern
    is then the one megatron-core's own allocation builds."""
    from megatron.core.ssm.mamba_hybrid_layer_allocation import allocate_layers

    from ckpt_ir.megatron.args import allocate_hybrid

    for layers in (1, 2, 5, 8, 13, 24, 52):
        for attention in (0.0, 0.08, 0.1, 0.25, 0.5, 1.0):
            for mlp in (0.0, 0.1, 0.3, 0.5):
                if attention + mlp <= 1:
                    want = "".join(allocate_layers(layers, attention, mlp))
                    assert allocate_hybrid(layers, attention, mlp) == want, (layers, attention, mlp)
    a = Args({"num_layers": 8, "hybrid_attention_ratio": 0.25, "hybrid_mlp_ratio": 0.25}, "rank.pt")
    assert a.hybrid and a.hybrid_pattern() == "".join(allocate_layers(8, 0.25, 0.25))


# ---------------------------------------------------------------------------------------------
# megatron-core as the oracle (tests/mcore_hybrid.py: MambaModel built on CPU from the stock TE
# spec with build-only stand-ins; keys, shapes and strict loads, no forward)


def _case(args: argparse.Namespace, tp: int, pp: int, **more) -> dict:
    """The oracle's MambaModel as ckpt-ir's written ``args`` describe it (only args, so megatron-core
    builds the model from what the checkpoint says)."""
    case = dict(
        kind="mamba",
        tp=tp,
        pp=pp,
        hidden=args.hidden_size,
        heads=args.num_attention_heads,
        groups=args.num_query_groups,
        ffn=args.ffn_hidden_size,
        vocab=args.padded_vocab_size,
        tied=not args.untie_embeddings_and_output_weights,
        kv_channels=args.kv_channels,
        hybrid_override_pattern=args.hybrid_override_pattern,
        mamba_state_dim=args.mamba_state_dim,
        mamba_head_dim=args.mamba_head_dim,
        mamba_num_groups=args.mamba_num_groups,
        mamba_num_heads=args.mamba_num_heads,
        gated_linear_unit=bool(args.swiglu),
        normalization=args.normalization,
    )
    if getattr(args, "num_experts", None):
        case.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        )
    return dict(case, **more)


def _args(root: str, name: str = "mp_rank_00") -> argparse.Namespace:
    return torch.load(os.path.join(root, "iter_0000001", name, "model_optim_rng.pt"), weights_only=False)[
        "args"
    ]


def _rank_file(root: str, report: dict, pp: int) -> dict:
    name = f"mp_rank_{report['tp_rank']:02d}" + (f"_{report['pp_rank']:03d}" if pp > 1 else "")
    return torch.load(os.path.join(root, "iter_0000001", name, "model_optim_rng.pt"), weights_only=False)[
        "model"
    ]


@pytest.fixture(scope="module")
def oracle(models, tmp_path_factory):
    """ckpt-ir's outputs of the tiny models, and one megatron-core job over them (plus
    megatron-core's own saves of a nemotron_h-shaped model, for ckpt-ir to read)."""
    from tests.mcore_hybrid import mcore_keys

    root = tmp_path_factory.mktemp("mamba_oracle")
    out = {}
    for name, src, flags in (
        ("nemo_tp1", "nemotron_h", ()),
        ("nemo_tp2", "nemotron_h", ("--tp", "2")),
        ("nemo_pp2", "nemotron_h", ("--tp", "2", "--pp", "2", "--num-layer-list", "2,4")),
        ("mamba2_tp2", "mamba2", ("--tp", "2")),
    ):
        out[name] = str(root / name)
        assert (
            cli_main(
                ["convert", models[src], out[name], "--to", "mcore", "--norm-names", "te", "--quiet", *flags]
            )
            == 0
        )
    for name, src in (("nemo_dist", "nemotron_h"), ("mamba2_dist", "mamba2")):
        out[name] = str(root / name)
        assert (
            cli_main(
                ["convert", models[src], out[name], "--to", "mcore", "--ckpt-format", "torch_dist", "--quiet"]
            )
            == 0
        )
    nemo, mamba2 = _args(out["nemo_tp1"]), _args(out["mamba2_tp2"])
    first2 = dict(num_layers_in_first_pipeline_stage=2)  # = --num-layer-list 2,4
    out["mc_dist"], out["mc_torch"] = str(root / "mc_dist"), str(root / "mc_torch")
    cases = {
        "nemo_tp1": _case(nemo, 1, 1, ckpt=out["nemo_tp1"]),
        "nemo_tp2": _case(nemo, 2, 1, ckpt=out["nemo_tp2"]),
        "nemo_pp2": _case(nemo, 2, 2, ckpt=out["nemo_pp2"], **first2),
        "nemo_dist": _case(nemo, 2, 2, ckpt=out["nemo_dist"], dump=True, **first2),
        "mamba2_tp2": _case(mamba2, 2, 1, ckpt=out["mamba2_tp2"]),
        "mamba2_dist": _case(mamba2, 2, 1, ckpt=out["mamba2_dist"], dump=True),
        # megatron-core's own writers: torch_dist at TP2 x PP2 (uneven), read back whole; torch files
        "mc_save_dist": _case(
            nemo, 2, 2, seed=7, save={"dir": out["mc_dist"], "format": "torch_dist"}, **first2
        ),
        "mc_dist_whole": _case(nemo, 1, 1, ckpt=out["mc_dist"], dump=True),
        "mc_save_torch": _case(nemo, 2, 2, seed=8, save={"dir": out["mc_torch"], "format": "torch"}),
    }
    job = root / "job"
    reports = mcore_keys(list(cases.values()), job)
    out["reports"] = dict(zip(cases, reports))
    out["dump"] = lambda i, rank: torch.load(os.path.join(job, f"case{i}.rank{rank}.sd.pt"))
    out["index"] = {name: i for i, name in enumerate(cases)}
    return out


@pytest.mark.parametrize("name, pp", [("nemo_tp1", 1), ("nemo_tp2", 1), ("nemo_pp2", 2), ("mamba2_tp2", 1)])
def test_rank_files_hold_megatron_cores_keys_and_shapes(oracle, name, pp):
    """Built from ckpt-ir's args alone, megatron-core's MambaModel (stock TE spec) has exactly the
    keys and shapes of ckpt-ir's rank file on every rank; loading it misses only Transformer
    Engine's _extra_state (an HF source has none)."""
    for r in oracle["reports"][name]:
        sd = _rank_file(oracle[name], r, pp)
        assert {k: list(v.shape) for k, v in sd.items()} == r["state_dict"], (name, r["rank"])
        load = r["load"]
        assert load["format"] == "torch" and load["unexpected"] == [] and load["shape_mismatch"] == []
        assert load["missing"] and all(k.endswith("._extra_state") for k in load["missing"])


@pytest.mark.parametrize("name, ranks_of", [("nemo_dist", "nemo_pp2"), ("mamba2_dist", "mamba2_tp2")])
def test_torch_dist_loads_strictly_and_reshards_to_the_rank_files(oracle, name, ranks_of):
    """megatron-core's dist_checkpointing.load accepts ckpt-ir's torch_dist strictly (no missing or
    unexpected key) at another layout, and what it loads on each rank is ckpt-ir's rank file of
    that layout, tensor for tensor."""
    pp = 1 + max(r["pp_rank"] for r in oracle["reports"][name])
    for r in oracle["reports"][name]:
        load = r["load"]
        assert load["format"] == "torch_dist" and load["ok"], json.dumps(load)
        assert load["missing"] == load["unexpected"] == load["state_dict_missing"] == []
        loaded = oracle["dump"](oracle["index"][name], r["rank"])
        want = _rank_file(oracle[ranks_of], r, pp)
        assert sorted(loaded) == sorted(want)
        for k, v in want.items():
            assert torch.equal(loaded[k], v), (name, r["rank"], k)


def test_megatron_core_written_checkpoints_convert_with_hf_config(models, oracle, tmp_path, capsys):
    """megatron-core's own saves carry no args: with --hf-config ckpt-ir reads its torch_dist
    (TP2 x PP2 uneven, read whole) and its torch rank files (TP2 x PP2) exactly; without, one
    line asks for it."""
    hf = models["nemotron_h"]
    for src in (oracle["mc_dist"], oracle["mc_torch"]):
        assert cli_main(["convert", src, str(tmp_path / "x"), "--to", "hf"]) != 0
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "'args'" in err and "--hf-config DIR" in err
    whole = str(tmp_path / "whole")
    flags = ["--to", "mcore", "--norm-names", "te", "--hf-config", hf, "--quiet"]
    assert cli_main(["convert", oracle["mc_dist"], whole, *flags]) == 0
    want = oracle["dump"](oracle["index"]["mc_dist_whole"], 0)  # megatron-core's own view of it
    got = _rank_file(whole, {"tp_rank": 0, "pp_rank": 0}, 1)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    again = str(tmp_path / "again")
    assert cli_main(["convert", oracle["mc_torch"], again, *flags, "--tp", "2", "--pp", "2"]) == 0
    for r in oracle["reports"]["mc_save_torch"]:
        if r["dp_rank"]:
            continue
        mc, ours = _rank_file(oracle["mc_torch"], r, 2), _rank_file(again, r, 2)
        assert sorted(ours) == sorted(mc)  # _extra_state too: carried at the same layout
        for k, v in mc.items():
            assert k.endswith("._extra_state") or torch.equal(ours[k], v), k


def test_strided_views_read_as_blocks_of_their_storage(tmp_path):
    """torch.save keeps a view's whole storage with its strides (MindSpeed-LLM's torch.chunk over
    dim 1): every view that is a block of a row-major tensor reads as that block, also with its
    dims in another order (a transpose; MindSpeed-MM's Qwen3-VL-MoE experts, one expert's ``.T``
    cut in columns); others (overlapping elements) are refused in one line."""
    from ckpt_ir.io.torchzip import TorchZip, iter_tensors
    from ckpt_ir.ir import expr as E

    g = torch.arange(2 * 6 * 10, dtype=torch.float32).reshape(2, 6, 10)
    w = torch.arange(64 * 128, dtype=torch.float32).reshape(64, 128)
    views = {
        "chunk": w.chunk(2, dim=1)[1],
        "column": w[3:9, 7:8],
        "box": g[:, 2:5, 3:7],
        "every_other_row": g[:, ::2, :],
        "transposed": g.transpose(0, 1),
        "expert_t_columns": g[1].T.chunk(2, dim=1)[1],
        "permuted_box": g.permute(2, 0, 1)[1:4],
    }
    f = str(tmp_path / "views.pt")
    torch.save({**views, "overlapping": torch.as_strided(w, (4, 4), (1, 1))}, f)
    z = TorchZip(f)
    with E.Reader() as reader:
        for key, ref in iter_tensors(z.obj):
            if key == "overlapping":
                with pytest.raises(FormatError, match="not a block of a row-major tensor"):
                    z.load_expr(ref, key)
                continue
            assert not views[key].is_contiguous()
            assert torch.equal(E.evaluate(E.simplify(z.load_expr(ref, key)), reader), views[key]), key
