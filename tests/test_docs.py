"""The documentation's worked example runs and does what it says."""

from __future__ import annotations

import os
import re

import torch
from safetensors.torch import load_file

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


def code_blocks(name: str, lang: str = "python") -> list[str]:
    text = open(os.path.join(DOCS, name)).read()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_writing_a_pass_example(hf_cache, tmp_path):
    pass_code, usage = code_blocks("writing-a-pass.md")
    exec(compile(pass_code, "writing-a-pass.md", "exec"), {})
    src = hf_cache("llama")
    usage = usage.replace('"my-model-scaled"', repr(str(tmp_path / "scaled"))).replace(
        '"my-model"', repr(src)
    )
    exec(compile(usage, "writing-a-pass.md", "exec"), {})
    a = load_file(os.path.join(src, "model.safetensors"))
    b = load_file(str(tmp_path / "scaled" / "model.safetensors"))
    assert torch.equal(b["lm_head.weight"], a["lm_head.weight"] * 0.5)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "lm_head.weight")
    from ckpt_ir.passes import registry

    assert "scale-tensors" in registry()


def test_readme_has_exactly_the_two_setup_commands():
    text = open(os.path.join(DOCS, "..", "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert blocks[0].strip().endswith("ckpt-ir demo") and "torch==2.13.0" in blocks[0]
    assert blocks[1].strip().endswith("python -m pytest -q tests") and "torch==2.13.0" in blocks[1]
    ci = open(os.path.join(DOCS, "..", ".ci", "run")).read()
    assert "pytest -q" in ci and "tests" in ci


def test_torch_note_says_what_the_pin_does_everywhere():
    """The pin chooses torch's version, not its build: from PyPI, Linux x86-64 wheels are CUDA
    builds, a CPU build comes from PyTorch's CPU index.  The README's two commands stay as they are."""
    root = os.path.join(DOCS, "..")
    readme = open(os.path.join(root, "README.md")).read()
    assert re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[:2] == [
        'python -m pip install torch==2.13.0 && python -m pip install -e . "torch==2.13.0" && ckpt-ir demo\n',
        'python -m pip install torch==2.13.0 && python -m pip install -e ".[test]" "torch==2.13.0" && '
        "python -m pytest -q tests\n",
    ]
    for name in ("README.md", "docs/getting-started.md"):
        text = " ".join(open(os.path.join(root, name)).read().split())
        assert "takes a CPU build" not in text, name
        assert "Linux x86-64 `torch` wheels are CUDA builds" in text, name
        assert (
            "python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
        ), name
