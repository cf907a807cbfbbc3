"""``--dtype`` keeps in fp32 what the target's loader keeps in fp32.

HF targets: the oracle is transformers itself, ``from_pretrained(src, dtype=...)`` on the source:
each tensor ckpt-ir writes has the dtype the loaded model holds for it (DeepSeek's router weight
and score-correction bias, Hunyuan's router, gpt-oss' norms under fp16).  Megatron targets keep
the router's expert bias in fp32, as megatron-core does (``TopKRouter`` returns its
``expert_bias`` buffer to fp32 before every save and load)."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from safetensors import safe_open

from tests.cli_contract import assert_ok, cli
from tests.family_models import build
from tests.test_deepseek import build_deepseek

TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16}
IR = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def source(root: str, family: str) -> str:
    path = os.path.join(root, family)
    if family == "deepseek_v3":
        return build_deepseek(path, mtp=False)
    if family == "gpt_oss":
        return build(path, family)
    return build(path, family, layers=2)


def dtypes(path: str) -> dict[str, str]:
    out = {}
    for f in glob.glob(os.path.join(path, "**", "*.safetensors"), recursive=True):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    return out


def transformers_dtypes(src: str, dtype: torch.dtype, names) -> dict[str, str]:
    """The dtype transformers' model, loaded from ``src`` in ``dtype``, holds for each checkpoint
    name (through its own renaming rules: per-expert tensors become fused expert parameters)."""
    from transformers import AutoModelForCausalLM

    from ckpt_ir.commands.verify import conversion, module_key

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    state = model.state_dict()
    rules = conversion(model)
    return {n: IR[state[module_key(rules, n)[0]].dtype] for n in names}


DEEPSEEK_ROUTER = {"mlp.gate.weight", "mlp.gate.e_score_correction_bias"}


@pytest.mark.parametrize(
    "family, dtype, kept",
    [
        ("deepseek_v3", "bf16", DEEPSEEK_ROUTER),  # _keep_in_fp32_modules_strict
        ("deepseek_v3", "fp16", DEEPSEEK_ROUTER),
        ("deepseek_v2", "bf16", {"mlp.gate.weight"}),
        ("glm4_moe", "bf16", DEEPSEEK_ROUTER),
        ("hunyuan_v1_moe", "bf16", {"mlp.gate.wg.weight"}),  # created in fp32 by the class
        (
            "gpt_oss",
            "fp16",
            {"input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight"},
        ),
        ("gpt_oss", "bf16", set()),  # _keep_in_fp32_modules: under fp16 only
    ],
)
def test_hf_output_has_the_dtypes_transformers_loads(tmp_path, family, dtype, kept):
    src = source(str(tmp_path), family)
    out = tmp_path / "out"
    assert_ok(cli("convert", src, out, "--to", "hf", "--dtype", dtype))
    got = dtypes(str(out))
    assert got == transformers_dtypes(src, TORCH[dtype], got)
    assert {n.split(".", 3)[-1] if ".layers." in n else n for n, d in got.items() if d == "F32"} == kept


def test_deepseek_through_megatron_keeps_the_expert_bias_in_fp32(tmp_path):
    """To Megatron in bf16: only the expert bias stays fp32 (megatron-core keeps the router weight
    in params_dtype); back to HF in bf16: transformers' dtypes again."""
    import ckpt_ir.api as ck

    src = source(str(tmp_path), "deepseek_v3")
    mc, back = tmp_path / "mc", tmp_path / "back"
    assert_ok(cli("convert", src, mc, "--to", "mcore", "--tp", "2", "--ep", "2", "--dtype", "bf16"))
    lifted = ck.load(str(mc))
    fp32 = sorted(n for n, t in lifted.tensors.items() if t.dtype == "F32")
    moe_layers = [i for i in range(lifted.spec.num_layers) if lifted.spec.is_moe_layer(i)]
    assert fp32 == [f"layers.{i}.mlp.router.bias" for i in moe_layers] and moe_layers
    assert {t.dtype for n, t in lifted.tensors.items() if n not in fp32} == {"BF16"}
    assert_ok(cli("convert", mc, back, "--to", "hf", "--dtype", "bf16"))
    got = dtypes(str(back))
    assert got == transformers_dtypes(src, torch.bfloat16, got)


def test_without_keep_fp32_the_cast_pass_casts_everything(tmp_path):
    """cast{dtype=bf16} as a user writes it (keep-fp32 defaults to none) casts every tensor;
    the derived pipeline says which loader's fp32 tensors it keeps."""
    src = source(str(tmp_path), "deepseek_v3")
    r = cli("convert", src, tmp_path / "x", "--to", "hf", "--dtype", "bf16", "--print-pipeline")
    assert_ok(r)
    assert r.stdout.strip() == "cast{dtype=bf16 keep-fp32=transformers}"
    assert_ok(cli("convert", src, tmp_path / "all", "--to", "hf", "--pipeline", "cast{dtype=bf16}"))
    assert set(dtypes(str(tmp_path / "all")).values()) == {"BF16"}
    r = cli("convert", src, tmp_path / "bad", "--to", "hf", "--pipeline", "cast{dtype=bf16 keep-fp32=vllm}")
    assert (
        r.returncode == 2
        and "option keep-fp32='vllm': expected one of transformers, megatron, none" in r.stderr
    )


def test_class_attributes_read_from_source_equal_the_classes():
    """The _keep_in_fp32_modules* attributes read from transformers' source (no import) are the
    classes' own, for every family transformers implements."""
    import transformers

    from ckpt_ir.families import all_families
    from ckpt_ir.families.transformers_fp32 import ATTRIBUTES, class_attributes

    seen = 0
    for family in all_families():
        cls = getattr(transformers, family.architecture, None) if family.architecture.isidentifier() else None
        want = {a: tuple(getattr(cls, a, None) or ()) for a in ATTRIBUTES}
        assert class_attributes(family.architecture, family.model_types) == want, family.name
        seen += any(want.values())
    assert seen >= 5  # deepseek_v2/v3/v32, glm4_moe, glm_moe_dsa, hy_v3, gpt_oss
