"""MindSpeed-LLM FSDP2 checkpoints: ``global_step_<N>/`` as its ``CheckpointManager`` saves them,
made here the way its source does (``get_model_state_dict`` / ``get_optimizer_state_dict`` of the
trainer's model under ``torch.distributed.checkpoint.save``), from a tiny transformers MoE model
that took one AdamW step.  The oracle is transformers' ``save_pretrained`` of the trained model
(which writes the HF names back from the in-memory ones); the in-memory names themselves are
checked against transformers' own renaming function for every family that has any."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

import ckpt_ir.api as ck
from ckpt_ir.commands.cli import main as cli_main
from ckpt_ir.families import all_families
from ckpt_ir.families.runtime import to_hf_names
from ckpt_ir.ir import expr as E
from tests.family_models import CONFIGS
from tests.test_hf_roundtrip import assert_same_tensors
from tests.test_moe import E as EXPERTS
from tests.test_moe import F, H, build_moe


class _Engine(torch.nn.Module):
    """MindSpeed-LLM's MindSpeedParallelEngine as the checkpoint sees it: the model as ``model``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


def save_step(hf: str, step_dir: str, engine: bool, grouped_gemm: bool) -> str:
    """Train the model at ``hf`` one AdamW step and save it as MindSpeed-LLM's FSDP2 trainer does:
    dcp.save of {"model", "optimizer"} (through the engine, or the bare model) plus extra_state/.
    ``grouped_gemm``: experts as its grouped-GEMM modules hold them (GroupedGemmFlattenRule:
    transpose(1, 2), then flatten to 2-D).  Returns the HF checkpoint of the trained model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    root = _Engine(model) if engine else model
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-2)
    ids = torch.arange(12).view(1, 12)
    model(ids, labels=ids).loss.backward()
    optimizer.step()

    # what MindSpeed's CheckpointManager's Stateful wrappers hand dcp.save: the two state dicts
    state = get_model_state_dict(root)
    for k, t in state.items():
        if grouped_gemm and k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[k] = t.transpose(1, 2).contiguous().view(-1, t.shape[1])
    saved = {"model": state, "optimizer": get_optimizer_state_dict(root, optimizer)}

    writer = dcp.FileSystemWriter(step_dir, single_file_per_rank=True, sync_files=False)
    dcp.save(saved, storage_writer=writer)
    os.makedirs(os.path.join(step_dir, "extra_state"))
    torch.save({"global_step": 2}, os.path.join(step_dir, "extra_state", "extra_state_rank_0.pt"))
    trained = step_dir + "-hf"
    model.save_pretrained(trained)
    return trained


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{family: (HF model the run started from, the run's output_dir, the trained model in HF)}:
    qwen3_moe (tied embeddings) through the engine with transformers' 3-D fused experts; mixtral
    (renamed MoE block) bare, with MindSpeed's grouped-GEMM experts."""
    root = tmp_path_factory.mktemp("mindspeed-fsdp2")
    out = {}
    for family, engine, grouped, extra in (
        ("qwen3_moe", True, False, {"tie_word_embeddings": True}),
        ("mixtral", False, True, {}),
    ):
        hf = build_moe(str(root / family), family, **extra)
        with open(os.path.join(hf, "tokenizer.json"), "w") as f:
            f.write('{"version": "1.0"}')
        if engine:  # a release in bf16, trained (and saved) in fp32 as the backend loads it
            cfg = json.load(open(os.path.join(hf, "config.json")))
            json.dump(dict(cfg, dtype="bfloat16"), open(os.path.join(hf, "config.json"), "w"))
        run = str(root / f"run-{family}")
        trained = save_step(hf, os.path.join(run, "checkpoints", "global_step_2"), engine, grouped)
        out[family] = (hf, run, trained)
    return out


def test_engine_form_with_fused_experts_converts_to_hf_bit_for_bit(runs, tmp_path):
    hf, run, trained = runs["qwen3_moe"]
    src = ck.load(run, hf_config=hf)  # the run's output_dir: its latest global_step_*
    assert src.source.endswith("global_step_2")
    # the optimizer state and the trainer's extra state are listed, never silently lost; lm_head,
    # saved beside the embedding it is tied to, is the embedding
    assert {"optimizer.*", "extra_state/", "lm_head.weight"} <= set(src.dropped)
    out = str(tmp_path / "hf")
    ck.save(ck.run(src, ck.derive_pipeline(src, ck.Target(to="hf"))), out, ck.Target(to="hf"))
    assert_same_tensors(trained, out)
    # the config says what the job saved (fp32), as save_pretrained's does, not the release's bf16
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float32"
    assert json.load(open(os.path.join(trained, "config.json")))["dtype"] == "float32"
    # the side files of the model the run started from come along
    assert open(os.path.join(out, "tokenizer.json")).read() == '{"version": "1.0"}'


def test_bare_form_with_grouped_gemm_experts_to_megatron_and_back(runs, tmp_path):
    hf, run, trained = runs["mixtral"]
    step = os.path.join(run, "checkpoints", "global_step_2")
    mid, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    assert cli_main(["convert", step, mid, "--to", "mcore", "--tp", "2", "--ep", "2", "--hf-config", hf]) == 0
    assert cli_main(["convert", mid, back, "--to", "hf"]) == 0
    assert_same_tensors(trained, back)


def test_a_ranks_empty_shard_holds_no_data(runs, tmp_path):
    """FSDP2 shards dim 0 over more ranks than a tensor has rows (a router of 4 experts over 3
    ranks: rows 0-1, 2-3, and none): torch records the last rank's chunk as offset [4, 0], size
    [0, 64], with a blob of its own."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    hf, run, trained = runs["qwen3_moe"]
    step = str(tmp_path / "global_step_2")
    shutil.copytree(os.path.join(run, "checkpoints", "global_step_2"), step)
    md = dcp.FileSystemReader(step).read_metadata()
    key = "model.model.model.layers.0.mlp.gate.weight"
    rows, width = md.state_dict_metadata[key].size
    blob = io.BytesIO()
    torch.save(torch.empty(0, width), blob)
    with open(os.path.join(step, "__2_0.distcp"), "wb") as f:
        f.write(blob.getvalue())
    md.state_dict_metadata[key].chunks.append(
        ChunkStorageMetadata(torch.Size([rows, 0]), torch.Size([0, width]))
    )
    md.storage_data[MetadataIndex(key, torch.Size([rows, 0]), 1)] = _StorageInfo(
        "__2_0.distcp", 0, len(blob.getvalue())
    )
    with open(os.path.join(step, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    out = str(tmp_path / "hf")
    assert cli_main(["convert", step, out, "--to", "hf", "--hf-config", hf]) == 0
    assert_same_tensors(trained, out)


def test_bad_requests_are_one_line_errors(runs, tmp_path, capsys):
    hf, run, _ = runs["qwen3_moe"]
    out = str(tmp_path / "x")
    assert cli_main(["convert", run, out, "--to", "hf"]) == 2
    assert "holds no config.json; pass --hf-config DIR" in capsys.readouterr().err
    assert cli_main(["convert", run, out, "--to", "hf", "--hf-config", hf, "--iteration", "9"]) == 2
    assert "no global_step_9; steps present: [2]" in capsys.readouterr().err
    # a config whose experts are narrower than the stored ones: the tensor is named
    narrow = str(tmp_path / "narrow")
    shutil.copytree(hf, narrow)
    cfg = open(os.path.join(narrow, "config.json")).read()
    open(os.path.join(narrow, "config.json"), "w").write(
        cfg.replace(f'"moe_intermediate_size": {F}', '"moe_intermediate_size": 16')
    )
    assert cli_main(["convert", run, out, "--to", "hf", "--hf-config", narrow]) == 1
    err = capsys.readouterr().err
    assert f"tensor model.layers.0.mlp.experts.gate_up_proj has shape [{EXPERTS}, {2 * F}, {H}]" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(out)


# families whose in-memory names (transformers' conversion mapping: modules renamed, experts or
# convolutions fused) ckpt-ir does not map back yet: a training job saving them (MindSpeed-LLM's
# FSDP2) is reported tensor by tensor as not understood; their HF checkpoints convert as usual
NO_RUNTIME_NAMES = {
    "deepseek_v4",
    "hy_v4",
    "kimi_linear",
    "mimo_v2_flash",
    "olmo_hybrid",
    "sarvam_moe",
}


def test_in_memory_names_are_those_transformers_gives(tmp_path):
    """For every family transformers 5 renames or fuses on load, the HF names ckpt-ir gives the
    in-memory names transformers' own rename_source_key produces are the HF names again."""
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    checked, unmapped = [], []
    for family in all_families():
        mapping = [m for t in family.model_types for m in get_checkpoint_conversion_mapping(t) or ()]
        if not mapping:
            continue
        if family.towers:  # vision-language models: not read from a training job's in-memory names yet
            continue
        if family.name in NO_RUNTIME_NAMES:
            unmapped.append(family.name)
            continue
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        overrides = CONFIGS.get(
            family.name, {"num_experts_per_tok": 2}
        )  # tiny sizes where the suite has them
        if "layer_types" in overrides:  # as many layers as the per-layer lists say
            overrides = dict(overrides, num_hidden_layers=len(overrides["layer_types"]))
        cfg = AutoConfig.for_model(family.model_types[0], **overrides).to_dict()
        spec = family.spec_from_config(cfg)
        n = spec.num_experts
        hf_names = {t.format(i=0, e=e) for t, _ in family.tensors for e in (range(n) if "{e}" in t else (0,))}
        shapes = {
            "gate_up_proj": (n, 2 * spec.moe_ffn_hidden_size, spec.hidden_size),
            "up_proj": (n, spec.moe_ffn_hidden_size, spec.hidden_size),  # plain experts (Nemotron-H)
            "down_proj": (n, spec.hidden_size, spec.moe_ffn_hidden_size),
        }
        in_memory = {}
        for name in hf_names:
            runtime, _ = rename_source_key(name, renamings, converters)
            shape = shapes.get(runtime.rsplit(".", 1)[-1], (1,))
            in_memory[runtime] = E.Load("unused", runtime, shape, "F32", 0)
        assert set(to_hf_names(family, spec, in_memory, "x")) == hf_names, family.name
        checked.append(family.name)
    assert {"mixtral", "phimoe", "minimax_m2", "hy_v3", "qwen3_moe", "deepseek_v3", "nemotron_h"} <= set(
        checked
    )
    assert sorted(unmapped) == sorted(NO_RUNTIME_NAMES)  # the known gap, no more
