"""Megatron-Core layouts: expected tensors from the format rules, property-tested round trips over
TP/PP/VPP/layer lists/no-op layers/vocab padding, tied embeddings, TE norm names, and args."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt_ir.api as ck
from ckpt_ir.errors import LayoutError, UsageError
from tests.conftest import build_hf
from tests.test_hf_roundtrip import assert_same_tensors, hf_state

HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN, VOCAB = 4, 2, 16, 64, 128, 128


def convert(src: str, dst: str, target: ck.Target) -> None:
    c = ck.load(src)
    ck.save(ck.run(c, ck.derive_pipeline(c, target)), dst, target)


def rank_file(root: str, tp: int, pp: int, pp_size: int) -> dict:
    name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if pp_size > 1 else "")
    return torch.load(os.path.join(root, "iter_0000001", name, "model_optim_rng.pt"), weights_only=False)


# ---------------------------------------------------------------------------------------------
# expected tensors, written from the format rules without ckpt-ir's helpers


def expected_qkv(sd: dict, layer: int, tp: int, rank: int) -> torch.Tensor:
    """Per query group g: its HEADS/GROUPS query heads, then key head g, then value head g."""
    p = f"model.layers.{layer}.self_attn."
    q, k, v = sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]
    per_group = HEADS // GROUPS
    rows = []
    for g in range(GROUPS):
        for h in range(g * per_group, (g + 1) * per_group):
            rows.append(q[h * HEAD_DIM : (h + 1) * HEAD_DIM])
        rows.append(k[g * HEAD_DIM : (g + 1) * HEAD_DIM])
        rows.append(v[g * HEAD_DIM : (g + 1) * HEAD_DIM])
    full = torch.cat(rows)
    n = full.shape[0] // tp
    return full[rank * n : (rank + 1) * n]


def expected_fc1(sd: dict, layer: int, tp: int, rank: int) -> torch.Tensor:
    gate, up = (
        sd[f"model.layers.{layer}.mlp.gate_proj.weight"],
        sd[f"model.layers.{layer}.mlp.up_proj.weight"],
    )
    n = FFN // tp
    return torch.cat([gate[rank * n : (rank + 1) * n], up[rank * n : (rank + 1) * n]])


def test_expected_tensors_tp2_pp2_vpp_noop(tmp_path):
    """6 real layers + no-op layers at Megatron indices 3 and 7 -> 8 Megatron layers; PP=2 with
    2 layers per virtual stage -> 2 chunks: rank0 = [0,1 | 4,5], rank1 = [2,3 | 6,7]."""
    src = build_hf(str(tmp_path / "hf"), "llama", layers=6, vocab=VOCAB)
    out = str(tmp_path / "mc")
    convert(src, out, ck.Target(to="mcore", tp=2, pp=2, vpp_layers=2, noop_layers=(3, 7)))
    sd = hf_state(src)
    # Megatron layer -> (stage, chunk, local), and which real layer fills it
    real_of = {0: 0, 1: 1, 2: 2, 4: 3, 5: 4, 6: 5}  # 3 and 7 are no-ops
    placement = {
        0: (0, 0, 0),
        1: (0, 0, 1),
        2: (1, 0, 0),
        3: (1, 0, 1),
        4: (0, 1, 0),
        5: (0, 1, 1),
        6: (1, 1, 0),
        7: (1, 1, 1),
    }
    for stage in range(2):
        for rank in range(2):
            f = rank_file(out, rank, stage, 2)
            assert list(f)[:4] == ["args", "checkpoint_version", "iteration", "model0"]
            assert (
                f["checkpoint_version"] == 3.0
                and f["iteration"] == 1
                and set(f) == {"args", "checkpoint_version", "iteration", "model0", "model1"}
            )
            for chunk in range(2):
                want: dict[str, torch.Tensor] = {}
                if (stage, chunk) == (0, 0):
                    want["embedding.word_embeddings.weight"] = sd["model.embed_tokens.weight"][
                        rank * 64 : (rank + 1) * 64
                    ]
                for mg, (s, c, local) in placement.items():
                    if (s, c) != (stage, chunk) or mg not in real_of:
                        continue
                    layer = real_of[mg]
                    h = f"model.layers.{layer}."
                    d = f"decoder.layers.{local}."
                    want[d + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
                    want[d + "pre_mlp_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
                    want[d + "self_attention.linear_qkv.weight"] = expected_qkv(sd, layer, 2, rank)
                    want[d + "self_attention.linear_proj.weight"] = sd[h + "self_attn.o_proj.weight"][
                        :, rank * 32 : (rank + 1) * 32
                    ]
                    want[d + "mlp.linear_fc1.weight"] = expected_fc1(sd, layer, 2, rank)
                    want[d + "mlp.linear_fc2.weight"] = sd[h + "mlp.down_proj.weight"][
                        :, rank * 64 : (rank + 1) * 64
                    ]
                if (stage, chunk) == (1, 1):
                    want["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
                    want["output_layer.weight"] = sd["lm_head.weight"][rank * 64 : (rank + 1) * 64]
                got = f[f"model{chunk}"]
                assert list(got) == list(want), (stage, rank, chunk)
                for k in want:
                    assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (
                        stage,
                        rank,
                        chunk,
                        k,
                    )
    args = rank_file(out, 0, 0, 2)["args"]
    assert (args.num_layers, args.noop_layers, args.num_layers_per_virtual_pipeline_stage) == (8, "3,7", 2)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.num_query_groups, args.group_query_attention, args.kv_channels) == (2, True, 16)
    # and back: layout read from args, nothing repeated by the user
    back = str(tmp_path / "back")
    convert(out, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_layer_list_places_consecutive_blocks(tmp_path):
    src = build_hf(str(tmp_path / "hf"), "qwen2", layers=6, vocab=VOCAB)
    out = str(tmp_path / "mc")
    convert(src, out, ck.Target(to="mcore", pp=3, num_layer_list=(1, 3, 2)))
    sd = hf_state(src)
    for stage, layers in enumerate(([0], [1, 2, 3], [4, 5])):
        model = rank_file(out, 0, stage, 3)["model"]
        locals_ = sorted({int(k.split(".")[2]) for k in model if k.startswith("decoder.layers.")})
        assert locals_ == list(range(len(layers)))
        for local, layer in enumerate(layers):
            assert torch.equal(
                model[f"decoder.layers.{local}.self_attention.linear_qkv.bias"][:32],
                sd[f"model.layers.{layer}.self_attn.q_proj.bias"][:32],
            )
    assert rank_file(out, 0, 0, 3)["args"].num_layer_list == "1,3,2"


@pytest.mark.parametrize("pp", [1, 2])
def test_tied_embedding_output_layer_only_on_last_stage_when_pp_gt_1(tmp_path, pp):
    src = build_hf(str(tmp_path / "hf"), "gemma", layers=2, vocab=VOCAB)
    out = str(tmp_path / "mc")
    convert(src, out, ck.Target(to="mcore", pp=pp))
    last = rank_file(out, 0, pp - 1, pp)["model"]
    emb = hf_state(src)["model.embed_tokens.weight"]
    if pp == 1:
        assert "output_layer.weight" not in last
    else:
        assert torch.equal(last["output_layer.weight"], emb)
        assert "output_layer.weight" not in rank_file(out, 0, 0, pp)["model"]
    back = str(tmp_path / "back")
    convert(out, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_vocab_padding_repeats_last_row_and_is_trimmed_on_export(tmp_path):
    src = build_hf(str(tmp_path / "hf"), "llama", layers=2, vocab=100)
    out = str(tmp_path / "mc")
    convert(src, out, ck.Target(to="mcore", tp=2, vocab_divisible_by=64))  # 100 -> 128
    emb = hf_state(src)["model.embed_tokens.weight"]
    r0 = rank_file(out, 0, 0, 1)["model"]["embedding.word_embeddings.weight"]
    r1 = rank_file(out, 1, 0, 1)["model"]["embedding.word_embeddings.weight"]
    full = torch.cat([r0, r1])
    assert full.shape == (128, 64) and torch.equal(full[:100], emb)
    assert all(torch.equal(full[i], emb[99]) for i in range(100, 128))
    args = rank_file(out, 0, 0, 1)["args"]
    assert (args.padded_vocab_size, args.vocab_size) == (128, 100)
    back = str(tmp_path / "back")
    convert(out, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_te_norm_names_round_trip(tmp_path):
    src = build_hf(str(tmp_path / "hf"), "qwen3", layers=2, vocab=VOCAB)
    out = str(tmp_path / "mc")
    convert(src, out, ck.Target(to="mcore", tp=2, norm_names="te"))
    model = rank_file(out, 0, 0, 1)["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in model
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in model
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in model)
    assert ck.load(out).layout.norm_names == "te"
    back = str(tmp_path / "back")
    convert(out, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_mindspeed_transformer_engine_naming_fuses_only_the_input_norm(tmp_path):
    import subprocess
    import sys

    src = build_hf(str(tmp_path / "hf"), "llama", layers=2, vocab=VOCAB)
    out = str(tmp_path / "mc")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ckpt_ir",
            "convert-ckpt",
            "--load-dir",
            src,
            "--save-dir",
            out,
            "--transformer-impl",
            "transformer_engine",
            "--model-type-hf",
            "llama2",
        ],
        check=True,
    )
    model = rank_file(out, 0, 0, 1)["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in model
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in model
    assert ck.load(out).layout.norm_names == "te-input"
    assert rank_file(out, 0, 0, 1)["args"].transformer_impl == "transformer_engine"
    back = str(tmp_path / "back")
    convert(out, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


def test_reads_mindspeed_style_args_without_ckpt_ir_fields(tmp_path):
    """MindSpeed-LLM's args carry the HF config keys and its own names, not ckpt-ir's JSON."""
    src = build_hf(str(tmp_path / "hf"), "qwen2", layers=4, vocab=VOCAB)
    out = str(tmp_path / "mc")
    convert(src, out, ck.Target(to="mcore", tp=2, pp=2, noop_layers=(4, 5)))
    for stage in range(2):
        for rank in range(2):
            path = os.path.join(out, "iter_0000001", f"mp_rank_{rank:02d}_{stage:03d}", "model_optim_rng.pt")
            f = torch.load(path, weights_only=False)
            for k in (
                "ckpt_ir_family",
                "ckpt_ir_hf_config",
                "num_query_groups",
                "ffn_hidden_size",
                "padded_vocab_size",
            ):
                delattr(f["args"], k)
            f["args"].model_type_hf = "qwen25"
            import collections

            f["model"] = collections.defaultdict(dict, f["model"])  # as MindSpeed-LLM saves it
            torch.save(f, path, pickle_protocol=4)
    back = str(tmp_path / "back")
    convert(out, back, ck.Target(to="hf"))
    assert_same_tensors(src, back)


# ---------------------------------------------------------------------------------------------
# property tests over layouts


@st.composite
def layouts(draw, layers: int):
    tp = draw(st.sampled_from([1, 2]))
    mode = draw(st.sampled_from(["even", "list", "vpp"]))
    noop: tuple[int, ...] = ()
    if mode != "list" and draw(st.booleans()):
        count = draw(st.integers(1, 2))
        noop = tuple(
            sorted(
                draw(
                    st.lists(st.integers(0, layers + count - 1), min_size=count, max_size=count, unique=True)
                )
            )
        )
    total = layers + len(noop)
    if mode == "list":
        pp = draw(st.integers(1, min(4, total)))
        cuts = sorted(
            draw(st.lists(st.integers(1, total - 1), min_size=pp - 1, max_size=pp - 1, unique=True))
        )
        bounds = [0, *cuts, total]
        num_layer_list = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        return dict(tp=tp, pp=pp, num_layer_list=num_layer_list)
    if mode == "vpp":
        options = [
            (pp, lv)
            for pp in (2, 3, 4)
            for lv in (1, 2, 3)
            if total % (pp * lv) == 0 and total // (pp * lv) > 1
        ]
        if options:
            pp, lv = draw(st.sampled_from(options))
            return dict(tp=tp, pp=pp, vpp_layers=lv, noop_layers=noop)
    pp = draw(st.sampled_from([p for p in (1, 2, 3, 4) if total % p == 0]))
    divisible = draw(st.sampled_from([None, 1, 3, 64]))
    return dict(tp=tp, pp=pp, noop_layers=noop, vocab_divisible_by=divisible)


@pytest.fixture(scope="module")
def prop_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop")
    return {fam: build_hf(str(root / fam), fam, layers=6, vocab=100) for fam in ("llama", "qwen3", "gemma2")}


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(family=st.sampled_from(["llama", "qwen3", "gemma2"]), first=layouts(6), second=layouts(6))
def test_property_round_trips_are_bit_exact(prop_models, tmp_path_factory, family, first, second):
    """HF -> mcore(first) -> HF and HF -> mcore(first) -> mcore(second) -> HF are bit-exact."""
    src = prop_models[family]
    root = tmp_path_factory.mktemp("case")
    a, b, back1, back2 = (str(root / n) for n in ("a", "b", "back1", "back2"))
    convert(src, a, ck.Target(to="mcore", **first))
    convert(a, back1, ck.Target(to="hf"))
    assert_same_tensors(src, back1)
    convert(a, b, ck.Target(to="mcore", **second))
    convert(b, back2, ck.Target(to="hf"))
    assert_same_tensors(src, back2)


# ---------------------------------------------------------------------------------------------
# layout validation: every impossible layout has its own one-line error


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return ck.load(build_hf(str(tmp_path_factory.mktemp("v") / "hf"), "llama", layers=4, vocab=100))


@pytest.mark.parametrize(
    "target, fragment",
    [
        (dict(tp=3), "attention heads are not divisible by tensor parallel size 3"),
        (dict(tp=4), "query groups (KV heads) are not divisible"),
        (dict(tp=2, vocab_divisible_by=None), None),  # 100 rows split over 2: fine
        (dict(pp=3), "do not split evenly over pipeline parallel size 3"),
        (dict(pp=2, num_layer_list=(1, 2)), "sums to 3 but the model has 4 layers"),
        (dict(pp=2, num_layer_list=(1, 1, 2)), "has 3 entries but pipeline parallel size is 2"),
        (dict(pp=2, vpp_layers=1, num_layer_list=(2, 2)), "cannot be combined"),
        (
            dict(pp=2, noop_layers=(1,), num_layer_list=(2, 3)),
            "noop_layers and num_layer_list cannot be combined",
        ),
        (dict(pp=1, vpp_layers=2), "needs pipeline parallel size >= 2"),
        (dict(pp=2, vpp_layers=3), "do not split into pipeline size 2 x 3"),
        (dict(noop_layers=(7,)), "outside the 5 Megatron layers"),
    ],
)
def test_invalid_layouts_are_refused_before_any_io(small, tmp_path, target, fragment):
    t = ck.Target(to="mcore", **target)
    dst = str(tmp_path / "out")
    if fragment is None:
        ck.run(small, ck.derive_pipeline(small, t))
        return
    with pytest.raises(LayoutError) as err:
        ck.run(small, ck.derive_pipeline(small, t))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(dst)


@pytest.mark.parametrize(
    "target, message",
    [
        (dict(pp=2, num_layer_list=(0, 4)), "num_layer_list entries must be at least 1, got 0,4"),
        (dict(noop_layers=(3, -1)), "noop_layers entries must be at least 0, got 3,-1"),
    ],
)
def test_layer_list_flags_out_of_range_are_usage_errors(target, message):
    """Checked by the target, naming the flag, before a pass is built from it."""
    with pytest.raises(UsageError) as err:
        ck.Target(to="mcore", **target)
    assert str(err.value) == message


def test_vocab_not_divisible_by_tp_asks_for_padding(tmp_path):
    c = ck.load(build_hf(str(tmp_path / "hf"), "llama", layers=2, vocab=101))
    with pytest.raises(LayoutError, match="pass vocab_divisible_by to pad it"):
        ck.run(c, ck.derive_pipeline(c, ck.Target(to="mcore", tp=2)))
    ck.run(c, ck.derive_pipeline(c, ck.Target(to="mcore", tp=2, vocab_divisible_by=1)))
