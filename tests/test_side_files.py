"""Files around the weights: HF -> mcore keeps the HF side files (tokenizer, generation config,
chat template, remote code, config.json) in the checkpoint's ``hf/`` folder, mcore -> HF restores
them byte for byte, ``--hf-config`` wins and copies remote code, and an output without a
tokenizer says so."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from ckpt_ir.commands.cli import main as cli_main
from tests.cli_contract import build_tiny_hf

SIDE = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def _add_tokenizer(d) -> None:
    """A real (word-level) fast tokenizer, a generation config and a chat template, saved by
    transformers itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "ckpt", "ir"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(d)
    GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.9, bos_token_id=1, eos_token_id=2
    ).save_pretrained(d)


@pytest.fixture(scope="module")
def hf_with_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "hf"
    shutil.copytree(build_tiny_hf(tmp_path_factory), d)
    _add_tokenizer(d)
    assert all((d / n).is_file() for n in SIDE), sorted(os.listdir(d))
    return d


def test_side_files_survive_hf_mcore_hf(hf_with_tokenizer, tmp_path, capsys):
    src = hf_with_tokenizer
    mc = tmp_path / "mcore"
    assert cli_main(["convert", str(src), str(mc), "--to", "mcore", "--tp", "2", "--quiet"]) == 0
    assert sorted(os.listdir(mc / "hf")) == sorted((*SIDE, "config.json"))  # the documented place
    back = tmp_path / "back"
    capsys.readouterr()
    assert cli_main(["convert", str(mc), str(back), "--to", "hf"]) == 0  # no --hf-config
    assert "tokenizer" not in capsys.readouterr().err  # nothing to report
    for name in SIDE:
        assert (back / name).read_bytes() == (src / name).read_bytes(), name
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(back)
    assert (
        tok("hello world ckpt").input_ids == AutoTokenizer.from_pretrained(src)("hello world ckpt").input_ids
    )
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "hello"
    assert GenerationConfig.from_pretrained(back).temperature == 0.6
    # mcore -> mcore keeps them too, in every format (torch_dist, fsdp_dtensor: the same hf/ at the
    # root), and each reads them back
    for fmt in ("torch", "torch_dist", "fsdp_dtensor"):
        again = tmp_path / f"mcore_{fmt}"
        argv = ["convert", str(mc), str(again), "--to", "mcore", "--ckpt-format", fmt, "--quiet"]
        assert cli_main(argv) == 0
        assert sorted(os.listdir(again / "hf")) == sorted((*SIDE, "config.json")), fmt
        assert all((again / "hf" / n).read_bytes() == (src / n).read_bytes() for n in (*SIDE, "config.json"))
    assert (
        cli_main(["convert", str(tmp_path / "mcore_fsdp_dtensor"), str(tmp_path / "fsdp_back"), "--to", "hf"])
        == 0
    )
    assert all((tmp_path / "fsdp_back" / n).read_bytes() == (src / n).read_bytes() for n in SIDE)


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_torch_dist_keeps_the_tokenizer_and_megatrons_integrity_manifest(hf_with_tokenizer, tmp_path, capsys):
    """HF -> torch_dist puts the tokenizer's files where Megatron-LM saves a run's tokenizer
    (iter_N/tokenizer/, its save_pretrained files; checkpointing.py save_tokenizer_assets), every
    side file in hf/ at the checkpoint root as the torch format does (beside the tracker, outside
    the iteration directory: Megatron reads only the tracker and iter_*), and with
    --verify-integrity the integrity.json of Megatron-Core 0.18+ (validation.py
    save_integrity_manifest: SHA-256 of each file directly in the iteration directory, in name
    order, json.dump(indent=2)).  The export takes the tokenizer from there (over hf/'s) and the
    other side files from hf/, byte for byte, also through the torch format and from the
    iteration directory given itself; a changed or missing file is a one-line error naming it."""
    src = hf_with_tokenizer
    td = tmp_path / "td"
    argv = [
        "convert",
        str(src),
        str(td),
        "--to",
        "mcore",
        "--ckpt-format",
        "torch_dist",
        "--verify-integrity",
    ]
    assert cli_main([*argv, "--quiet"]) == 0
    assert sorted(os.listdir(td)) == ["hf", "iter_0000001", "latest_checkpointed_iteration.txt"]
    assert sorted(os.listdir(td / "hf")) == sorted((*SIDE, "config.json"))
    assert all((td / "hf" / n).read_bytes() == (src / n).read_bytes() for n in (*SIDE, "config.json"))
    it = td / "iter_0000001"
    tokenizer = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    assert sorted(os.listdir(it / "tokenizer")) == sorted(tokenizer)
    assert all((it / "tokenizer" / n).read_bytes() == (src / n).read_bytes() for n in tokenizer)
    files = {p.name: _sha256(p) for p in sorted(it.iterdir()) if p.is_file() and p.name != "integrity.json"}
    assert len(files) > 3 and "common.pt" in files and ".metadata" in files
    assert (it / "integrity.json").read_text() == json.dumps(
        {"algorithm": "sha256", "files": files}, indent=2
    )

    # hf/ holding an older tokenizer config: the iteration's wins, directly and through the torch
    # format (read from the iteration directory given itself: the hf/ beside it)
    (td / "hf" / "tokenizer_config.json").write_text('{"older": true}')
    back = tmp_path / "back"
    assert cli_main(["convert", str(td), str(back), "--to", "hf", "--quiet"]) == 0
    torch_fmt, back2 = tmp_path / "torch", tmp_path / "back2"
    assert cli_main(["convert", str(it), str(torch_fmt), "--to", "mcore", "--quiet"]) == 0
    assert cli_main(["convert", str(torch_fmt), str(back2), "--to", "hf", "--quiet"]) == 0
    for out in (back, back2):
        assert sorted(os.listdir(out)) == sorted((*SIDE, "config.json", "model.safetensors")), out
        for name in SIDE:
            assert (out / name).read_bytes() == (src / name).read_bytes(), (out, name)

    victim = sorted(it.glob("*.distcp"))[1].name
    for damage in ("changed", "missing"):
        bad = tmp_path / damage
        shutil.copytree(td, bad)
        f = bad / "iter_0000001" / victim
        if damage == "changed":
            data = bytearray(f.read_bytes())
            data[-9] ^= 1
            f.write_bytes(bytes(data))
        else:
            f.unlink()
        capsys.readouterr()
        assert cli_main(["convert", str(bad), str(tmp_path / f"{damage}-hf"), "--to", "hf"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(f) in err[0] and "integrity.json" in err[0] and damage in err[0], err
        assert not (tmp_path / f"{damage}-hf").exists()
    assert cli_main([*argv, "--overwrite", "--quiet"]) == 0  # its own output is a checkpoint to replace


def test_explicit_hf_config_wins(hf_with_tokenizer, tmp_path, capsys):
    mc = tmp_path / "mcore"
    assert cli_main(["convert", str(hf_with_tokenizer), str(mc), "--to", "mcore", "--quiet"]) == 0
    other = tmp_path / "other"
    shutil.copytree(hf_with_tokenizer, other)
    (other / "chat_template.jinja").write_text("{{ 'other template' }}")
    (other / "generation_config.json").unlink()  # the checkpoint's is left out, and said so
    back = tmp_path / "back"
    capsys.readouterr()
    assert cli_main(["convert", str(mc), str(back), "--to", "hf", "--hf-config", str(other)]) == 0
    assert (back / "chat_template.jinja").read_text() == "{{ 'other template' }}"
    assert not (back / "generation_config.json").exists()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "generation_config.json" in ln]
    assert len(lines) == 1 and lines[0].startswith("dropped: generation_config.json:"), lines
    assert f"--hf-config {other}" in lines[0] and "tokenizer" not in lines[0], lines


def test_output_without_tokenizer_says_so(tmp_path_factory, tmp_path, capsys):
    src = build_tiny_hf(tmp_path_factory)  # weights and config only
    capsys.readouterr()
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--to", "hf", "--dtype", "bf16"]) == 0
    lines = [
        ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dropped:") and "tokenizer" in ln
    ]
    assert len(lines) == 1 and "--hf-config" in lines[0], lines


CONFIGURATION = """from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "llama"
"""
MODELING = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
    remote_marker = "tiny remote code"
"""


@pytest.mark.parametrize("how", ["round_trip", "hf_config"])
def test_remote_code_model_keeps_auto_map_and_code(tmp_path_factory, tmp_path, how):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "remote"
    shutil.copytree(build_tiny_hf(tmp_path_factory), src)
    (src / "configuration_tiny.py").write_text(CONFIGURATION)
    (src / "modeling_tiny.py").write_text(MODELING)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
    }
    (src / "config.json").write_text(json.dumps(cfg))
    mc = tmp_path / "mcore"
    assert cli_main(["convert", str(src), str(mc), "--to", "mcore", "--tp", "2", "--quiet"]) == 0
    if how == "hf_config":  # the code comes from --hf-config, not from the checkpoint's hf/ folder
        shutil.rmtree(mc / "hf")
    back = tmp_path / "back"
    extra = ["--hf-config", str(src)] if how == "hf_config" else []
    assert cli_main(["convert", str(mc), str(back), "--to", "hf", "--quiet", *extra]) == 0
    assert json.loads((back / "config.json").read_text())["auto_map"] == cfg["auto_map"]
    for name in ("configuration_tiny.py", "modeling_tiny.py"):
        assert (back / name).read_bytes() == (src / name).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(back, trust_remote_code=True, dtype=torch.float32)
    assert type(model).remote_marker == "tiny remote code"  # the remote class, not transformers' own
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def _tree(d) -> dict[str, bytes]:
    """Every file under ``d`` by its path relative to ``d``."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# What transformers 5.25 reads beside a vision-language model (processing_utils.py: PROCESSOR_NAME,
# the legacy IMAGE_PROCESSOR_NAME / VIDEO_PROCESSOR_NAME, AUDIO_TOKENIZER_NAME) and ModelScope's
# configuration.json; the contents only have to come back byte for byte
PROCESSOR_FILES = {
    "processor_config.json": '{"image_processor": {"patch_size": 14, "merge_size": 2}}\n',
    "preprocessor_config.json": '{"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14}\n',
    "video_preprocessor_config.json": '{"video_processor_type": "Qwen2VLVideoProcessor"}\n',
    "audio_tokenizer_config.json": '{"audio_tokenizer_class": "X"}\n',
    "configuration.json": '{"framework": "pytorch", "task": "text-generation"}\n',
}


def test_processor_configs_and_named_chat_templates_travel_and_the_rest_is_named(
    hf_with_tokenizer, tmp_path, capsys
):
    """The processor configs, configuration.json and the additional_chat_templates/ folder
    (transformers writes a tokenizer's named templates there, one <name>.jinja each) come back byte
    for byte through HF -> mcore (torch TP=2, torch_dist) -> HF and HF -> HF, and the folder sits
    in torch_dist's iter_N/tokenizer/ too (where Megatron-LM's tokenizer.save_pretrained puts it).
    Everything else beside the weights (model card, licence, a Trainer's training_args.bin, other
    folders) is named in one dropped: line."""
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    shutil.copytree(hf_with_tokenizer, src)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = {"default": "{{ 'default' }}", "tool_use": "{{ 'tools' }}", "rag": "{{ 'rag' }}"}
    tok.save_pretrained(src)
    for name, text in PROCESSOR_FILES.items():
        (src / name).write_text(text)
    want = {n: b for n, b in _tree(src).items() if n != "model.safetensors"}
    assert {"additional_chat_templates/tool_use.jinja", "additional_chat_templates/rag.jinja"} <= set(want)
    for name in ("README.md", "LICENSE", "training_args.bin", "original/consolidated.00.pth"):
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_bytes(b"x")

    def convert(a, b, *extra) -> list[str]:
        capsys.readouterr()
        assert cli_main(["convert", str(a), str(b), *extra]) == 0
        return capsys.readouterr().err.splitlines()

    hf_hf = tmp_path / "hf_hf"
    err = convert(src, hf_hf, "--to", "hf", "--dtype", "bf16")
    assert [ln for ln in err if ln.startswith("dropped:")] == [
        "dropped: LICENSE, README.md, original/, training_args.bin: not weights, config or a side file "
        "that travels with them (tokenizer, generation and processor configs, chat templates, remote "
        "code); copy them to the output yourself if wanted"
    ]
    outputs = [hf_hf]
    for fmt, tp in (("torch", "2"), ("torch_dist", "1")):
        mc = tmp_path / fmt
        convert(src, mc, "--to", "mcore", "--ckpt-format", fmt, "--tp", tp, "--quiet")
        hf_dir = {n[3:]: b for n, b in _tree(mc).items() if n.startswith("hf/")}
        assert hf_dir == want, fmt  # the hf/ folder: every side file and config.json, nothing else
        convert(mc, tmp_path / f"{fmt}_hf", "--to", "hf", "--quiet")
        outputs.append(tmp_path / f"{fmt}_hf")
    tokenizer = _tree(tmp_path / "torch_dist" / "iter_0000001" / "tokenizer")
    assert tokenizer == {n: want[n] for n in tokenizer} and "additional_chat_templates/rag.jinja" in tokenizer
    for out in outputs:
        got = _tree(out)
        assert set(got) == {*want, "model.safetensors"}, out
        assert all(got[n] == b for n, b in want.items() if n != "config.json"), out
        templates = AutoTokenizer.from_pretrained(out).chat_template
        assert templates == {"default": "{{ 'default' }}", "tool_use": "{{ 'tools' }}", "rag": "{{ 'rag' }}"}
    # an output holding the folder is a checkpoint --overwrite replaces
    convert(src, hf_hf, "--to", "hf", "--overwrite", "--quiet")


def _adapter_with_tokenizer(base, out, added: list[str]) -> None:
    """A PEFT adapter (made by peft) with the base's tokenizer saved beside it, as HF Trainer
    does, after adding ``added`` tokens."""
    from transformers import AutoTokenizer

    from tests.test_lora import make_peft_adapter

    make_peft_adapter(str(base), str(out), targets=("q_proj",))
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(added)
    tok.save_pretrained(out)


def test_lora_load_takes_the_adapters_tokenizer(hf_with_tokenizer, tmp_path, capsys):
    """A tokenizer saved with a PEFT adapter is the one it was trained with (here an added
    token): the merged output takes its files, says so in a note, and records it; one whose added
    tokens lie beyond the model's 128 embedding rows stays out, named in a dropped: line."""
    from transformers import AutoTokenizer

    base = hf_with_tokenizer
    adapter = tmp_path / "adapter"
    _adapter_with_tokenizer(base, adapter, ["<tool>"])
    out = tmp_path / "merged"
    capsys.readouterr()
    assert cli_main(["convert", str(base), str(out), "--to", "hf", "--lora-load", str(adapter)]) == 0
    err = capsys.readouterr().err.splitlines()
    adapter_tok = {n: b for n, b in _tree(adapter).items() if not n.startswith(("adapter_", "README"))}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(adapter_tok)
    assert all((out / n).read_bytes() == b for n, b in adapter_tok.items())
    assert AutoTokenizer.from_pretrained(out)("hello <tool>").input_ids == [3, 7]
    notes = [ln for ln in err if ln.startswith("note:")]
    assert len(notes) == 1 and f"--lora-load {adapter}" in notes[0] and "tokenizer.json" in notes[0], err
    assert (
        notes[0].removeprefix("note: ").split(" (recorded in")[0] + "\n"
        == (out / "ckpt-ir-notes.txt").read_text()
    )

    big = tmp_path / "adapter_big"
    _adapter_with_tokenizer(base, big, [f"<t{i}>" for i in range(130)])  # ids 7..136
    out = tmp_path / "merged_big"
    capsys.readouterr()
    assert cli_main(["convert", str(base), str(out), "--to", "hf", "--lora-load", str(big)]) == 0
    err = capsys.readouterr().err.splitlines()
    for n in SIDE:
        assert (out / n).read_bytes() == (base / n).read_bytes(), n
    lines = [ln for ln in err if "tokenizer" in ln and ln.startswith(("dropped:", "note:"))]
    assert len(lines) == 1 and lines[0].startswith("dropped: ") and "id 136" in lines[0], lines
    assert "128 embedding rows" in lines[0] and f"--lora-load {big}" in lines[0], lines
