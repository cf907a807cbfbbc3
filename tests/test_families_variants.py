"""Issue 31's families whose layers need a block variant the others lack (Apertus' xIELU MLP):
tiny random models built and saved by transformers (``tests/family_models.py``) convert HF ->
Megatron-Core -> HF bit-exactly with equal transformers logits, and the Megatron rank files they
go through hold what the format facts say (rows and keys worked out here from the HF tensors)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir.api as ck
from ckpt_ir.errors import CkptIrError
from tests.family_models import DENSE, assert_round_trip, build, rank
from tests.test_hf_roundtrip import convert, hf_state

CONFIGS = {
    # attention_bias on q, k, v and o; llama3 rope (Apertus' default) with its factor
    "apertus": dict(DENSE, attention_bias=True),
}
# per family: the Megatron layouts to round-trip through
LAYOUTS = {
    "apertus": (dict(tp=2, pp=2, num_layer_list=(1, 3)),),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    cache: dict[str, str] = {}

    def get(model_type: str) -> str:
        if model_type not in cache:
            cache[model_type] = build(str(root / model_type), model_type, configs=CONFIGS)
        return cache[model_type]

    return get


CASES = [(f, i) for f in LAYOUTS for i in range(len(LAYOUTS[f]))]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_hf_to_mcore_to_hf_bit_exact_with_same_logits(models, tmp_path, family, layout):
    src = models(family)
    assert_round_trip(src, tmp_path, family, LAYOUTS[family][layout])
    RANK_FACTS[family](hf_state(src), json.load(open(f"{src}/config.json")), str(tmp_path / "mid"))


def _apertus(hf: dict, cfg: dict, mid: str) -> None:
    """Megatron-Bridge's Apertus keys: each layer's xIELU gains under mlp.activation_func, whole on
    every TP rank, and no beta / eps (Megatron's xIELU holds them as floats); linear_fc1 is
    up_proj alone (no gate), its rows split over TP; the args name the activation (xielu)."""
    first_stage = 1  # --num-layer-list 1,3: HF layer 1 is stage 1's local layer 0
    for t in range(2):
        sd = rank(mid, f"mp_rank_0{t}_001")["model"]
        d, h = "decoder.layers.0.", f"model.layers.{first_stage}."
        for p in ("alpha_p", "alpha_n"):
            assert torch.equal(sd[d + f"mlp.activation_func.{p}"], hf[h + f"mlp.act_fn.{p}"])
        assert not [k for k in sd if k.endswith((".beta", ".eps"))]
        up = hf[h + "mlp.up_proj.weight"]
        assert torch.equal(sd[d + "mlp.linear_fc1.weight"], up.chunk(2)[t])
    args = vars(rank(mid, "mp_rank_00_000")["args"])
    assert (args["xielu"], args["swiglu"], args["qk_layernorm"]) == (True, False, True)
    assert (args["use_rope_scaling"], args["rope_scaling_factor"]) == (
        True,
        cfg["rope_parameters"]["factor"],
    )


RANK_FACTS = {"apertus": _apertus}


def test_apertus_xielu_constants_other_than_megatrons_are_refused(models, tmp_path):
    """Megatron stores no beta / eps: a checkpoint whose beta is not the 0.5 Megatron's xIELU
    computes with cannot go to Megatron without changing the model (one line, before writing)."""
    src = str(tmp_path / "src")
    build(src, "apertus", layers=2, configs=CONFIGS)
    f = f"{src}/model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.act_fn.beta"] = torch.tensor(0.25)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CkptIrError, match=r"layers\.1\.mlp\.act\.beta differs from 0\.5"):
        convert(src, str(tmp_path / "mid"), ck.Target(to="mcore", tp=2))
