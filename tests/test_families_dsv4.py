"""DeepSeek-V4 (``ckpt_ir/families/mqa.py``): tiny random models built and saved by
transformers (its naming), and the same model in the release's naming with one MTP layer as the
release stores it, convert HF -> Megatron-Core (MindSpeed-LLM's deepseek4 layout) -> HF
bit-exactly in the naming they came in, with transformers' logits equal.  Rank-file keys, their
order and TP splits are checked against MindSpeed-LLM's converter's (format facts from
docs/reference/composed-blocks.md §4.3, measured with its convert_ckpt_deepseek4.py)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from tests.family_models import DENSE, build, rank
from tests.test_hf_roundtrip import IDS, assert_same_tensors, convert, hf_state, logits

# 3 layers: sliding window, CSA (compressor + indexer, rate 4), HCA (rate 8: one window of the
# 12-token test sequence, so its compressor changes the logits); layer 0 routes by token id; the
# indexer keeps 1 of the up to 3 compressed entries a late query sees, so its choice changes them too
CONFIG = dict(
    hidden_size=64,
    vocab_size=128,
    num_attention_heads=4,
    head_dim=32,
    q_lora_rank=24,
    o_groups=2,
    o_lora_rank=16,
    hc_mult=2,
    hc_sinkhorn_iters=3,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=32,
    sliding_window=4,
    partial_rotary_factor=0.25,
    max_position_embeddings=128,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    mlp_layer_types=["hash_moe", "moe", "moe"],
    pad_token_id=DENSE["pad_token_id"],
    bos_token_id=DENSE["bos_token_id"],
    eos_token_id=DENSE["eos_token_id"],
)
# the release's form: transformers reads its compress_ratios only as 0 / 4 (CSA) / 128 (HCA)
RELEASE_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}

# the Megatron layouts of the round trips: transformers naming / release naming with MTP
LAYOUTS = {
    "deepseek_v4": (
        dict(tp=2, ep=2),
        dict(tp=2, pp=2, num_layer_list=(1, 2), etp=1),
        dict(ep=2, grouped_gemm=True),
        # a virtual pipeline: a no-op layer makes the 3 layers 2 stages x 2 chunks of 1, the MTP
        # layer on the last stage
        dict(pp=2, ep=2, vpp_layers=1, noop_layers=(3,)),
    )
}


def build_dsv4(path: str, **overrides) -> str:
    """The tiny model as transformers saves it, every parameter and buffer random: the hash
    layers' token -> expert table too (valid expert ids)."""
    build(path, "deepseek_v4", layers=3, configs={"deepseek_v4": dict(CONFIG, **overrides)})
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    g = torch.Generator().manual_seed(3)
    for k in [k for k in sd if k.endswith(".tid2eid")]:
        sd[k] = torch.randint(0, CONFIG["n_routed_experts"], sd[k].shape, generator=g)
    for k in [k for k in sd if k.endswith(".gate.bias")]:  # transformers' e_score_correction_bias
        sd[k] = torch.randn(sd[k].shape, generator=g) * 0.1
    save_file(sd, f, metadata={"format": "pt"})
    return path


def release_named(src: str, dst: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``src`` (transformers' naming) in the release's: the §5 table read right to left, one MTP
    layer ``mtp.0.*`` (a random copy of layer 0's attention and MoE without compressor, a top-k
    router with a score bias, enorm / hnorm / e_proj / h_proj / norm, its hyper-connection head and
    the embedding and head copies), ``compress_ratios`` (one per layer and per MTP layer) and
    ``num_hash_layers`` instead of layer_types / compress_rates / mlp_layer_types; floats cast to
    ``dtype`` if given.  Returns the tensors."""
    shutil.copytree(src, dst)
    sd = {}
    for k, v in load_file(os.path.join(dst, "model.safetensors")).items():
        k = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}.get(k, k)
        k = re.sub(r"^model\.hc_head\.hc_", "hc_head_", k)
        k = re.sub(r"^model\.layers\.", "layers.", k).replace(".attn.norm.weight", ".attn.kv_norm.weight")
        sd[k] = v
    cfg = json.load(open(os.path.join(dst, "config.json")))
    g = torch.Generator().manual_seed(7)
    h = cfg["hidden_size"]
    for k in [k for k in sd if k.startswith("layers.0.") and not k.endswith(".tid2eid")]:
        sd["mtp.0." + k[len("layers.0.") :]] = torch.randn(sd[k].shape, generator=g) * 0.3
    sd["mtp.0.ffn.gate.bias"] = torch.randn(cfg["n_routed_experts"], generator=g) * 0.1
    own = dict.fromkeys(("enorm.weight", "hnorm.weight", "norm.weight"), (h,))
    own |= dict.fromkeys(("e_proj.weight", "h_proj.weight"), (h, h))
    own |= {f"hc_head_{t}": sd[f"hc_head_{t}"].shape for t in ("fn", "base", "scale")}
    for k, shape in own.items():
        sd[f"mtp.0.{k}"] = torch.randn(shape, generator=g) * 0.3
    sd["mtp.0.emb.tok_emb.weight"] = sd["embed.weight"].clone()
    sd["mtp.0.head.weight"] = sd["head.weight"].clone()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    rates = cfg.pop("compress_rates")
    ratios = [0 if t == "sliding_attention" else rates[t] for t in cfg.pop("layer_types")] + [0]
    hashed = sum(t == "hash_moe" for t in cfg.pop("mlp_layer_types"))
    cfg.update(compress_ratios=ratios, num_hash_layers=hashed, num_nextn_predict_layers=1)
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    return sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv4")
    tf = build_dsv4(str(root / "transformers"))
    build_dsv4(str(root / "tf-release-rates"), compress_rates=RELEASE_RATES)
    release_named(str(root / "tf-release-rates"), str(root / "release"))
    return {"transformers": tf, "release": str(root / "release")}


# (model, layout): the transformers naming at TP2 EP2 and EP2 grouped, the release naming with MTP
# at TP2 PP2 (uneven) and with a virtual pipeline
CASES = [("transformers", 0), ("release", 1), ("transformers", 2), ("release", 3)]


@pytest.mark.parametrize("model,layout", CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_in_the_source_naming_with_same_logits(models, tmp_path, model, layout):
    src = models[model]
    assert ck.load(src).spec.family == "deepseek_v4"
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", **LAYOUTS["deepseek_v4"][layout]))
    args = vars(rank(mid, sorted(os.listdir(f"{mid}/iter_0000001"))[0])["args"])  # the first rank's
    assert args.get("ckpt_ir_hf_naming") == ("transformers" if model == "transformers" else None)
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)  # names included: the source's naming
    a, b = logits(src, IDS), logits(back, IDS)
    assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("model", ["transformers", "release"])
def test_hf_to_hf_bit_exact_in_the_source_naming(models, tmp_path, model):
    out = str(tmp_path / "out")
    convert(models[model], out, ck.Target(to="hf"))
    assert_same_tensors(models[model], out)


def test_layer_kinds_from_either_config_and_transformers_rewrite(models):
    """The release config (compress_ratios, num_hash_layers) and transformers' (layer_types,
    compress_rates, mlp_layer_types) give the same blocks; ratios per layer, MTP layers' blocks;
    a transformers-saved checkpoint has no MTP tensors, so no MTP layer."""
    tf, rel = ck.load(models["transformers"]).spec, ck.load(models["release"]).spec
    blocks = (
        ("mqa", "hc", "moe", "hash_router"),
        ("mqa", "compressor", "csa_indexer", "hc", "moe"),
        ("mqa", "compressor", "hc", "moe"),
    )
    assert tf.layer_blocks == rel.layer_blocks == blocks
    assert tf.compressor_ratios == (0, 4, 8) and rel.compressor_ratios == (0, 4, 128)
    assert (tf.mtp_layers, rel.mtp_layers) == (0, 1)
    assert rel.blocks(3) == ("mqa", "hc", "moe")


def test_per_layer_shapes_and_dtypes(models):
    """Each compressor has its layer's ratio rows of position bias and twice the width where its
    windows overlap (CSA); the token -> expert table is int64 [vocab, top_k]; e_proj / h_proj are
    the two column halves of eh_proj."""
    c = ck.load(models["release"])
    hd, idx = CONFIG["head_dim"], CONFIG["index_head_dim"]
    shapes = {
        "layers.1.mqa.compressor.ape": (4, 2 * hd),
        "layers.1.mqa.compressor.wkv.weight": (2 * hd, 64),
        "layers.1.mqa.indexer.compressor.ape": (4, 2 * idx),
        "layers.2.mqa.compressor.ape": (128, hd),
        "layers.2.mqa.compressor.wgate.weight": (hd, 64),
        "layers.0.mlp.router.tid2eid": (128, 2),
        "layers.3.mtp.eh_proj.weight": (64, 128),
        "layers.0.mqa.wo_a.weight": (2 * 16, 4 * hd // 2),
    }
    for name, shape in shapes.items():
        assert c.tensors[name].shape == shape, name
    assert c.tensors["layers.0.mlp.router.tid2eid"].dtype == "I64"
    assert "layers.0.mlp.router.bias" not in c.tensors and "layers.1.mlp.router.bias" in c.tensors
    assert (
        "layers.0.mqa.compressor.ape" not in c.tensors and "layers.2.mqa.indexer.wq_b.weight" not in c.tensors
    )


# MindSpeed-LLM's deepseek4 keys of one decoder layer, in its writer's order (§4.3), for a layer
# with compressor (ratio != 0) and indexer (ratio 4) and one routed by token id or by top-k
def _ms_layer_keys(p: str, ratio: int, hashed: bool, experts: int) -> list[str]:
    a = p + "self_attention."
    keys = [p + "input_layernorm.weight", p + "pre_mlp_layernorm.weight"]
    keys += [a + k for k in ("attn_sink", "kv_layernorm.weight", "q_layernorm.weight")]
    keys += [a + f"linear_{k}.weight" for k in ("o_down_proj", "kv", "o_up_proj", "q", "q_up_proj")]
    comp = ("ape", "norm.weight", "wgate.weight", "wkv.weight")
    if ratio:
        keys += [a + "compressor." + k for k in comp]
    if ratio == 4:
        keys += [a + "indexer.kv_compressor." + k for k in comp]
        keys += [a + "indexer.wq_b.weight", a + "indexer.weights_proj.weight"]
    keys += [p + "mlp.router.weight", p + ("mlp.router.tid2eid" if hashed else "mlp.router.expert_bias")]
    keys += [p + f"mlp.shared_experts.linear_fc{n}.weight" for n in (1, 2)]
    keys += [p + f"{m}.{k}" for m in ("attn_mhc", "mlp_mhc") for k in ("hc_base", "hc_fn.weight", "hc_scale")]
    for e in range(experts):
        keys += [p + f"mlp.experts.local_experts.{e}.linear_fc{n}.weight" for n in (1, 2)]
    return keys


def test_rank_files_have_mindspeeds_keys_order_and_splits(models, tmp_path):
    """TP2 PP2 (layers 1 + 2), expert TP 1, one MTP layer, as MindSpeed-LLM's converter writes it:
    stage 0 the embedding and layer 0; the last stage the MTP layer first (enorm, hnorm, eh_proj,
    the embedding, its transformer layer without compressor, its final norm and hyper-connection
    head), then layers 1 and 2, final_layernorm (no decoder. prefix), output_layer, hc_head.
    wo_a rows, wq_b rows, sinks and eh_proj rows split over TP, wo_b columns; compressors,
    indexer, hyper-connections and experts whole."""
    src = models["release"]
    hf = hf_state(src)
    mid = str(tmp_path / "mid")
    convert(src, mid, ck.Target(to="mcore", tp=2, pp=2, num_layer_list=(1, 2), etp=1))
    first, last = rank(mid, "mp_rank_01_000")["model"], rank(mid, "mp_rank_01_001")["model"]
    hc_head = [f"hc_head.{k}" for k in ("hc_base", "hc_fn.weight", "hc_scale")]
    assert list(first) == [
        "embedding.word_embeddings.weight",
        *_ms_layer_keys("decoder.layers.0.", 0, True, 4),
    ]
    mtp = [f"mtp.layers.0.{k}.weight" for k in ("enorm", "hnorm", "eh_proj")] + [
        "embedding.word_embeddings.weight"
    ]
    mtp += _ms_layer_keys("mtp.layers.0.transformer_layer.", 0, False, 4)
    mtp += ["mtp.final_layernorms.0.weight"] + [f"mtp.layers.0.{k}" for k in hc_head]
    layers = _ms_layer_keys("decoder.layers.0.", 4, False, 4) + _ms_layer_keys(
        "decoder.layers.1.", 128, False, 4
    )
    assert list(last) == mtp + layers + ["final_layernorm.weight", "output_layer.weight", *hc_head]
    half = lambda t, dim=0: torch.chunk(t, 2, dim)[1]  # noqa: E731  TP rank 1's part
    want = {
        "decoder.layers.0.self_attention.linear_o_down_proj.weight": half(hf["layers.1.attn.wo_a.weight"]),
        "decoder.layers.0.self_attention.linear_q_up_proj.weight": half(hf["layers.1.attn.wq_b.weight"]),
        "decoder.layers.0.self_attention.attn_sink": half(hf["layers.1.attn.attn_sink"]),
        "decoder.layers.0.self_attention.linear_o_up_proj.weight": half(hf["layers.1.attn.wo_b.weight"], 1),
        "decoder.layers.0.self_attention.linear_q.weight": hf["layers.1.attn.wq_a.weight"],
        "decoder.layers.0.self_attention.indexer.kv_compressor.ape": hf[
            "layers.1.attn.indexer.compressor.ape"
        ],
        "decoder.layers.1.self_attention.compressor.ape": hf["layers.2.attn.compressor.ape"],
        "decoder.layers.0.attn_mhc.hc_fn.weight": hf["layers.1.hc_attn_fn"],
        "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight": torch.cat(
            [hf["layers.2.ffn.experts.3.w1.weight"], hf["layers.2.ffn.experts.3.w3.weight"]]
        ),
        "mtp.layers.0.eh_proj.weight": torch.cat(
            [half(hf["mtp.0.e_proj.weight"]), half(hf["mtp.0.h_proj.weight"])], dim=1
        ),
        "hc_head.hc_fn.weight": hf["hc_head_fn"],
    }
    for k, v in want.items():
        assert torch.equal(last[k], v), k
    assert torch.equal(first["decoder.layers.0.mlp.router.tid2eid"], hf["layers.0.ffn.gate.tid2eid"])


def test_mindspeeds_every_pair_directories_read_back(models, tmp_path):
    """MindSpeed-LLM's deepseek4 at TP2 EP2 writes every (TP, EP) directory (expert TP 1: experts
    whole) and records expert TP as ``expert_tp_size``; Megatron's expert grid uses (t, t mod EP)
    only.  Built from ckpt-ir's output: (0, 1) = TP rank 0's dense tensors with EP rank 1's
    experts, (1, 0) the other way round.  ckpt-ir reads them back to the same HF tensors."""
    src = models["release"]
    mid, back = str(tmp_path / "mid"), str(tmp_path / "back")
    convert(src, mid, ck.Target(to="mcore", tp=2, ep=2, etp=1))
    it = os.path.join(mid, "iter_0000001")
    assert sorted(os.listdir(it)) == ["mp_rank_00_000", "mp_rank_01_001"]
    ranks = {(t, t): rank(mid, f"mp_rank_{t:02d}_{t:03d}") for t in (0, 1)}
    for t, e in ((0, 1), (1, 0)):
        dense = {k: v for k, v in ranks[(t, t)]["model"].items() if ".experts." not in k}
        experts = {k: v for k, v in ranks[(e, e)]["model"].items() if ".experts." in k}
        obj = dict(ranks[(t, t)], model={**dense, **experts})
        os.makedirs(os.path.join(it, f"mp_rank_{t:02d}_{e:03d}"))
        torch.save(obj, os.path.join(it, f"mp_rank_{t:02d}_{e:03d}", "model_optim_rng.pt"))
    for t in (0, 1):
        f = os.path.join(it, f"mp_rank_{t:02d}_{t:03d}", "model_optim_rng.pt")
        obj = torch.load(f, weights_only=False)
        del obj["args"].expert_tensor_parallel_size
        obj["args"].expert_tp_size = 1
        torch.save(obj, f)
    convert(mid, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_namings_are_told_apart_and_not_mixed():
    """A checkpoint names every tensor in one naming: transformers' (model. prefixes, attn.norm)
    or the release's; one mixing them is refused naming a key of each."""
    from ckpt_ir.errors import FormatError
    from ckpt_ir.families import by_name

    fam = by_name("deepseek_v4")
    assert fam.naming_of(["embed.weight", "layers.0.attn.kv_norm.weight", "head.weight"], "x") is None
    tf = [
        "model.embed_tokens.weight",
        "model.layers.0.attn.norm.weight",
        "head.weight",
        "model.hc_head.hc_fn",
    ]
    assert fam.naming_of(tf, "x") == "transformers"
    naming = fam.naming("transformers")
    assert [naming.to_table(k) for k in tf] == [
        "embed.weight",
        "layers.0.attn.kv_norm.weight",
        "head.weight",
        "hc_head_fn",
    ]
    with pytest.raises(FormatError, match=r"model\.embed_tokens\.weight.*layers\.0\.attn\.wq_a\.weight"):
        fam.naming_of(["model.embed_tokens.weight", "layers.0.attn.wq_a.weight"], "x")
