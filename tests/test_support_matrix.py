"""The support matrix (``ckpt-ir models --format markdown|json``, embedded in docs/families.md) says
what the tests verify for each family; its claims (each family's ``Family.tested``) are held to
the test cases that make them, read from the test modules' own case tables:

* round trip: the ``LAYOUTS`` of the family test modules, ``test_hf_roundtrip.MCORE_LAYOUTS``, the
  parametrized MTP round trips and ``test_moe``'s property test;
* megatron-core logits: the ``CASES`` of the oracle modules (``test_megatron_*oracle.py``) and the
  remote-code families' ``ORACLE``;
* MindSpeed: the cases of ``bench/peers/mindspeed_v2.py`` (MindSpeed-LLM) and
  ``bench/peers/mindspeed_mm.py`` (MindSpeed-MM), run by hand; the result is the claim.

A claim with no test case fails, and so does a test case no claim names.  The transformers
coverage report (docs/coverage.md) and the matrix in docs/families.md must be what
``tools/family_docs.py`` writes now.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping

import pytest

from ckpt_ir.families import all_families, by_name
from ckpt_ir.megatron import multimodal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Target field -> convert flag, in the order a layout is written
FLAGS = {
    "tp": "--tp",
    "pp": "--pp",
    "ep": "--ep",
    "etp": "--etp",
    "vpp_layers": "--vpp-layers",
    "num_layer_list": "--num-layer-list",
    "noop_layers": "--noop-layers",
    "grouped_gemm": "--moe-grouped-gemm",
    "vocab_divisible_by": "--make-vocab-size-divisible-by",
    "norm_names": "--norm-names",
    "ckpt_format": "--ckpt-format",
    "mla_keys": "--mla-keys",
    "gdn_keys": "--gdn-keys",
    "mm_keys": "--mm-keys",
    "vision_tp": "--vision-tp",
    "vision_layer_list": "--vision-layer-list",
}
DEFAULTS = {
    "tp": 1,
    "pp": 1,
    "ep": 1,
    "grouped_gemm": False,
    "ckpt_format": "torch",
    "mla_keys": "mindspeed",
    "mm_keys": "bridge",
}


def layout(target: Mapping, family: str | None = None) -> str:
    """A Target's layout settings as the convert flags a claim spells (defaults left out, the
    Megatron naming of a vision-language model by its family's default; one rank is ``--tp 1
    --pp 1``)."""
    unknown = set(target) - set(FLAGS)
    assert not unknown, f"no flag known for {unknown}"
    defaults = dict(DEFAULTS)
    towers = by_name(family).towers if family else ()
    if towers:  # a vision-language model: its naming's MLA modules too (Megatron-Bridge's: mcore)
        defaults["mm_keys"] = towers[0].mm_keys
        naming = target.get("mm_keys") or defaults["mm_keys"]
        defaults["mla_keys"] = multimodal.TEXT_MLA_KEYS.get(naming, defaults["mla_keys"])
    words = []
    for field, flag in FLAGS.items():
        value = target.get(field)
        if value is None or value == defaults.get(field) or value == ():
            continue
        if value is True:
            words.append(flag)
        else:
            shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
            words.append(f"{flag} {shown}")
    return " ".join(words) or "--tp 1 --pp 1"


def from_flags(flags: Iterable[str], family: str | None = None) -> str:
    """``ckpt-ir convert`` flags (a test's argument list or a claim) in the order ``layout`` writes."""
    by_flag = {flag: field for field, flag in FLAGS.items()}
    words, target = list(flags), {}
    while words:
        flag = words.pop(0)
        assert flag in by_flag, f"unknown layout flag {flag}"
        field = by_flag[flag]
        if field in ("tp", "pp") and words[0] == "1":  # the one-rank layout's spelling
            words.pop(0)
            continue
        if field == "grouped_gemm":
            target[field] = True
            continue
        value = words.pop(0)
        target[field] = (
            tuple(int(v) for v in value.split(","))
            if field in ("num_layer_list", "noop_layers", "vision_layer_list")
            else value
            if field in ("norm_names", "ckpt_format", "mla_keys", "gdn_keys", "mm_keys")
            else int(value)
        )
    return layout(target, family)


def _module(name: str):
    """A test module (collected already in this process, imported otherwise)."""
    return importlib.import_module(f"tests.{name}")


def _parametrized(function, arg: str) -> list:
    """The values a test function is parametrized with for ``arg``."""
    for mark in getattr(function, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == arg:
            return list(mark.args[1])
    raise AssertionError(f"{function.__name__} is not parametrized over {arg}")


def _cases(cases: Mapping, family_of) -> Iterable[tuple[str, str]]:
    """(family, layout) of oracle cases ``name -> (model, conversion)``, a conversion being flags
    or ("from", case, flags) (a Megatron source resharded: the layout is the last conversion's)."""
    for model, conversion in cases.values():
        flags = conversion[2] if isinstance(conversion, tuple) else conversion
        yield family_of(model), from_flags(flags)


def observed_round_trips() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}

    def add(family: str, target: Mapping | str) -> None:
        out.setdefault(family, set()).add(target if isinstance(target, str) else layout(target, family))

    for family, target in _module("test_hf_roundtrip").MCORE_LAYOUTS.items():
        add(family, target)
    for name in (
        "dense",
        "moe",
        "mla",
        "hybrid",
        "gpt",
        "mamba",
        "recurrent",
        "dsv4",
        "split_layers",
        "variants",
        "vlm",
        "vlm_more",
        "qwen3vl",
        "glm4v",
        "internvl",
        "qwen35vl",
        "kimi_k25",
        "bridge_remote",
        "sarvam",
    ):
        module = _module(f"test_families_{name}")
        for case, targets in module.LAYOUTS.items():  # a case named otherwise than its family: FAMILY
            for target in targets:
                add(getattr(module, "FAMILY", {}).get(case, case), target)
    remote = _module("test_families_remote_code")
    for case, targets in remote.LAYOUTS.items():
        for target in targets:
            add(remote.FAMILY.get(case, case), target)
    for family, targets in _module(
        "test_torch_dist_vlm"
    ).LAYOUTS.items():  # vision-language models in torch_dist
        for target in targets:
            add(family, target)
    # round trips of models with multi-token-prediction layers
    for target in _parametrized(_module("test_deepseek").test_round_trip_is_bit_exact_with_mtp, "layout"):
        add("deepseek_v3", target)
    for target in _parametrized(_module("test_families_moe").test_hy_v3_mtp_layer_round_trips, "layout"):
        add("hy_v3", target)
    hybrid = _module("test_families_hybrid")
    for family, target in hybrid.MTP_CASES.values():
        add(family, target)
    moe = _module("test_moe")
    for family in moe.PROPERTY_FAMILIES:
        add(family, property_layouts(moe.PROPERTY_LAYOUTS, moe.PROPERTY_EXAMPLES))
    return out


def property_layouts(values: Mapping, examples: int) -> str:
    """How a claim names the property test's layouts: the values each setting is drawn from
    (``[...]``: may be absent), and the number of drawn pairs."""
    parts = []
    for field, choices in values.items():
        flag, given = FLAGS[field], [v for v in choices if v not in (None, False)]
        text = flag if all(v is True for v in given) else f"{flag} {'/'.join(map(str, given))}"
        parts.append(f"[{text}]" if len(given) < len(choices) else text)
    return f"random ({examples} pairs): " + " ".join(parts)


def observed_mcore_logits() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}

    def add(pairs: Iterable[tuple[str, str]]) -> None:
        for family, flags in pairs:
            out.setdefault(family, set()).add(flags)

    oracle = _module("test_megatron_oracle")
    add(_cases(oracle.CASES, lambda m: oracle.MODELS[m]["family"]))
    add((c["family"], from_flags(c["convert"])) for c in oracle.FAMILY_CASES.values())
    moe = _module("test_megatron_moe_oracle")
    add(_cases(moe.CASES, lambda m: moe.MODELS[m]["family"]))
    mla = _module("test_megatron_mla_oracle")
    add(_cases(mla.CASES, lambda m: mla.MODELS[m][0]))
    add(("gpt_oss", from_flags(f)) for f in _module("test_megatron_gpt_oss_oracle").CASES.values())
    remote = _module("test_families_remote_code")
    add((remote.FAMILY.get(case, case), from_flags(f)) for case, f in remote.ORACLE.items())
    return out


def observed_mindspeed() -> dict[str, set[str]]:
    spec = importlib.util.spec_from_file_location("mindspeed_v2", f"{ROOT}/bench/peers/mindspeed_v2.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out: dict[str, set[str]] = {}
    for case, (_, ms_name, _) in bench.CASES.items():
        out.setdefault(by_name(ms_name).name, set()).add(case)
    for case in bench.MAMBA2_CASES:  # MindSpeed-LLM's dedicated Mamba-2 converter
        out.setdefault("mamba2", set()).add(case)
    # MindSpeed-MM's converter (vision-language models), bench/peers/mindspeed_mm.py
    spec = importlib.util.spec_from_file_location("mindspeed_mm_bench", f"{ROOT}/bench/peers/mindspeed_mm.py")
    assert spec is not None and spec.loader is not None
    mm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mm)
    for case, (model_type, *_) in mm.CASES.items():
        out.setdefault(by_name(model_type).name, set()).add(case)
    return out


def claimed(kind: str) -> dict[str, set[str]]:
    out = {}
    for f in all_families():
        values = getattr(f.tested, kind)
        if kind == "mindspeed":
            values = [case for case, _ in values]
        elif kind == "round_trip":
            values = [v if v.startswith("random") else from_flags(v.split(), f.name) for v in values]
        else:
            values = [from_flags(v.split(), f.name) for v in values]
        if values:
            out[f.name] = set(values)
    return out


@pytest.mark.parametrize(
    "kind, observed",
    [
        ("round_trip", observed_round_trips),
        ("mcore_logits", observed_mcore_logits),
        ("mindspeed", observed_mindspeed),
    ],
)
def test_every_claim_is_a_test_case_and_every_test_case_a_claim(kind, observed):
    got, want = claimed(kind), observed()
    wrong = {f: sorted(want.get(f, ())) for f in sorted(set(got) | set(want)) if got.get(f) != want.get(f)}
    assert not wrong, f"Family.tested.{kind} must list exactly what the tests run: {wrong}"


def test_a_family_without_megatron_core_logits_says_why():
    for f in all_families():
        if f.model_types:  # the args-only family has no HF model to compare with
            assert bool(f.tested.mcore_logits) != bool(f.tested.mcore_missing), f.name


def test_docs_hold_what_ckpt_ir_models_generates():
    """docs/families.md's matrix and docs/coverage.md are what ``ckpt-ir models --format
    markdown`` and ``--coverage --format markdown`` print now (rerun tools/family_docs.py)."""
    spec = importlib.util.spec_from_file_location("family_docs", f"{ROOT}/tools/family_docs.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for path, text in tool.outputs().items():
        assert path.read_text() == text, f"{path} is stale: run python tools/family_docs.py"


def test_models_json_lists_every_family_with_its_claims(capsys):
    import json

    from ckpt_ir.commands.cli import main

    assert main(["models", "--format", "json"]) == 0
    records = {r["family"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(records) == [f.name for f in all_families()]
    gpt2 = records["gpt2"]
    assert (gpt2["model_types"], gpt2["architecture"], gpt2["mcore_missing"]) == (
        ["gpt2"],
        "GPT2LMHeadModel",
        None,
    )
    assert gpt2["round_trip"] == [layout(t) for t in _module("test_families_gpt").LAYOUTS["gpt2"]]
    phimoe = records["phimoe"]["mindspeed"]
    assert {m["case"] for m in phimoe} == {"phi3.5-moe-tp2pp2", "phi3.5-moe-tp2ep2-grouped"}
    assert all(m["result"].startswith("differs") for m in phimoe)


# model types whose kind is a known fact about the model (not read from ckpt-ir)
KNOWN = {
    "llama": ("supported", "family llama"),
    "gpt2": ("supported", "family gpt2"),
    "bart": ("encoder-decoder", None),
    "whisper": ("encoder-decoder", None),
    "bert": ("encoder", None),
    "roberta": ("encoder", None),
    "mamba": ("state-space", None),
    "jamba": ("supported", "family jamba"),
    "qwen3_5_text": ("supported", "family qwen3_5"),
    # the vision-language model (Qwen3_5ForConditionalGeneration) whose text model is qwen3_5_text
    "qwen3_5": ("supported", "family qwen3_5_vl"),
    "gemma3": ("supported", "family gemma3"),
    "rwkv": ("needs a block", None),
    "gptj": ("needs a block", None),
}


def test_coverage_sorts_transformers_models_by_what_they_are():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ckpt_ir.families.coverage import transformers_coverage

    rows = {r.model_type: r for r in transformers_coverage()}
    assert sorted(rows) == sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for model_type, (status, detail) in KNOWN.items():
        assert rows[model_type].status == status, rows[model_type]
        assert detail is None or detail in rows[model_type].detail, rows[model_type]
    supported = {t for f in all_families() for t in f.model_types} & set(rows)
    assert {t for t, r in rows.items() if r.status == "supported"} == supported
    assert all(r.detail for r in rows.values())  # every model type says why
