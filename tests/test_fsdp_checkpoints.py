"""Megatron-LM's checkpoints of fully sharded runs, ``--ckpt-format torch_dcp`` (torch FSDP2) and
``fsdp_dtensor`` (Megatron-FSDP).

The checkpoints are built here from an HF model the way Megatron-LM writes them: the state dict of
``megatron/training/checkpointing.py`` (``generate_state_dict``; for fsdp_dtensor after
``preprocess_fsdp_dtensor_state_dict`` of ``megatron/core/transformer/fsdp_dtensor_checkpoint.py``),
its model tensors named and laid out as megatron-core's GPTModel holds them, saved as
torch.distributed.checkpoint saves it from three FSDP ranks (each parameter chunked on dim 0,
torch's own metadata classes; torch's ``dcp.load`` reads every fixture back).  Converting them
to HF gives the HF model's tensors bit for bit.  ckpt-ir's fsdp_dtensor output holds exactly the
entries Megatron-LM's ``checkpoint_inspector convert-torch-dist-to-fsdp-dtensor`` makes of the
model's torch_dist checkpoint (its rule applied here to the HF model's tensors), and, for a
DeepSeek-V3 (MLA, MoE with grouped experts, MTP), exactly the fixture's model entries.
(``bench/peers/megatron_fsdp.py`` compares with Megatron-LM's own code, by hand.)"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file

from ckpt_ir.commands.cli import main as cli_main
from tests.test_deepseek import build_deepseek

RANKS = 3
IT = 7  # the iteration the fixtures are saved at
H, L, VOCAB, HEADS, GROUPS, FFN = 64, 2, 128, 4, 2, 96


# ---------------------------------------------------------------------------------------------
# torch.distributed.checkpoint, as FSDP ranks save it


def dcp_save(state_dict: dict, path: str, ranks: int = RANKS) -> None:
    """Save ``state_dict`` as ``torch.distributed.checkpoint.save`` does from ``ranks`` FSDP
    ranks: nested dicts flattened to dotted keys, each model / optimizer tensor sharded on dim 0
    (``torch.chunk``, FSDP2's split) with rank r's chunks in ``__r_0.distcp`` (one ``torch.save``
    blob each), other values as ``torch.save`` blobs of rank 0, ``.metadata`` the pickled
    ``Metadata``."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    os.makedirs(path)
    flat, mappings = flatten_state_dict(state_dict)
    blobs = [bytearray() for _ in range(ranks)]
    sdm: dict = {}
    storage: dict = {}

    def put(rank: int, fqn: str, offset, value) -> None:
        buf = io.BytesIO()
        torch.save(value, buf)
        data = buf.getvalue()
        storage[MetadataIndex(fqn, offset)] = _StorageInfo(f"__{rank}_0.distcp", len(blobs[rank]), len(data))
        blobs[rank] += data

    for fqn, value in flat.items():
        if not isinstance(value, torch.Tensor):
            put(0, fqn, None, value)
            sdm[fqn] = BytesStorageMetadata()
            continue
        sharded = (
            value.dim() > 0 and fqn.split(".")[0] in ("model", "optimizer") and "_extra_state" not in fqn
        )
        chunks, row = [], 0
        for r, piece in enumerate(torch.chunk(value, ranks) if sharded else (value,)):
            offsets = torch.Size([row] + [0] * (value.dim() - 1)) if value.dim() else torch.Size([])
            put(r, fqn, offsets, piece.clone())
            chunks.append(ChunkStorageMetadata(offsets, piece.size()))
            row += piece.shape[0] if value.dim() else 0
        sdm[fqn] = TensorStorageMetadata(TensorProperties(dtype=value.dtype), value.size(), chunks)
    for r, blob in enumerate(blobs):
        with open(os.path.join(path, f"__{r}_0.distcp"), "wb") as f:
            f.write(blob)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(Metadata(sdm, planner_data=mappings, storage_data=storage), f)


def dcp_read(path: str) -> dict:
    """Every entry of a DCP directory, read by torch.distributed.checkpoint itself (one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    sd = {
        k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
        for k, m in reader.read_metadata().state_dict_metadata.items()
    }
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def megatron_save(save_dir: str, state_dict: dict) -> str:
    """``save_dir`` as Megatron-LM leaves it: the tracker and ``iter_<IT>/`` holding the DCP save."""
    dcp_save(state_dict, os.path.join(save_dir, f"iter_{IT:07d}"))
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(IT))
    return save_dir


# ---------------------------------------------------------------------------------------------
# megatron-core GPTModel state dicts of HF models (the format facts)


def qkv(hf: dict, p: str) -> torch.Tensor:
    """linear_qkv: per query group its query heads, then its key head, then its value head."""
    hd = H // HEADS
    q = hf[p + "self_attn.q_proj.weight"].reshape(GROUPS, HEADS // GROUPS * hd, H)
    k = hf[p + "self_attn.k_proj.weight"].reshape(GROUPS, hd, H)
    v = hf[p + "self_attn.v_proj.weight"].reshape(GROUPS, hd, H)
    return torch.cat([q, k, v], 1).reshape(-1, H)


def llama_layers(hf: dict) -> list[dict]:
    """Each decoder layer's tensors under the Transformer-Engine layer spec's module names."""
    out = []
    for i in range(L):
        p = f"model.layers.{i}."
        out.append(
            {
                "self_attention.linear_qkv.layer_norm_weight": hf[p + "input_layernorm.weight"],
                "self_attention.linear_qkv.weight": qkv(hf, p),
                "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"],
                "mlp.linear_fc1.layer_norm_weight": hf[p + "post_attention_layernorm.weight"],
                "mlp.linear_fc1.weight": torch.cat(
                    [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]
                ),
                "mlp.linear_fc2.weight": hf[p + "mlp.down_proj.weight"],
            }
        )
    return out


def llama_model(hf: dict) -> dict:
    """GPTModel.state_dict() (TE spec, as torch_dcp saves it), TE >= 2's uint8 _extra_state included."""
    sd = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"]}
    for i, layer in enumerate(llama_layers(hf)):
        sd.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
        for m in ("linear_qkv", "linear_proj", "core_attention"):
            sd[f"decoder.layers.{i}.self_attention.{m}._extra_state"] = torch.arange(5, dtype=torch.uint8)
    sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    sd["output_layer.weight"] = hf["lm_head.weight"]
    return sd


def megatron_args(fmt: str | None, **kw) -> argparse.Namespace:
    """Plain Megatron-LM args of the llama (no HF config in them)."""
    ns = argparse.Namespace(
        num_layers=L,
        hidden_size=H,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        group_query_attention=True,
        kv_channels=H // HEADS,
        padded_vocab_size=VOCAB,
        max_position_embeddings=128,
        norm_epsilon=1e-5,
        normalization="RMSNorm",
        swiglu=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        rotary_base=10000,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        data_parallel_size=RANKS,
        transformer_impl="transformer_engine",
        bf16=False,
        **kw,
    )
    if fmt is not None:
        ns.ckpt_format = fmt
    return ns


def training_state(args, model: dict) -> dict:
    """What generate_state_dict saves besides the model (torch_dcp: the plain optimizer state dict)."""
    return {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": IT,
        "model": model,
        "optimizer": {
            "state": {0: {"exp_avg": torch.ones(VOCAB, H), "step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 1e-4, "weight_decay": 0.1, "params": [0]}],
        },
        "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 24},
        "rng_state": [{"random_rng_state": (3, (1, 2), None), "torch_rng_state": torch.get_rng_state()}],
        "num_floating_point_operations_so_far": 1.5e12,
    }


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    from transformers import AutoConfig

    from tests.distopt_fixtures import _save_random

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=H,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=GROUPS,
        num_hidden_layers=L,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return _save_random(cfg, str(tmp_path_factory.mktemp("fsdp") / "llama"), 0)


def hf_tensors(path: str) -> dict:
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, bad[:5]


def convert(*argv: str) -> int:
    return cli_main(["convert", *argv, "--quiet"])


# ---------------------------------------------------------------------------------------------
# reading


def test_torch_dcp_from_fsdp_ranks_converts_to_hf_and_megatron_bit_for_bit(llama, tmp_path, capsys):
    """torch_dcp: the model's plain state dict (TE norms, _extra_state tensors), chunked over three
    FSDP ranks, with optimizer, scheduler and RNG entries; plain Megatron-LM args name no family
    (it is inferred).  HF output = the HF model; via Megatron TP=2 and back too."""
    hf = hf_tensors(llama)
    src = megatron_save(
        str(tmp_path / "dcp"),
        training_state(megatron_args("torch_dcp", use_torch_fsdp2=True), llama_model(hf)),
    )
    on_disk = dcp_read(os.path.join(src, f"iter_{IT:07d}"))  # torch reads the fixture back whole
    assert torch.equal(
        on_disk["model.decoder.layers.1.self_attention.linear_qkv.weight"], qkv(hf, "model.layers.1.")
    )
    assert convert(src, str(tmp_path / "hf"), "--to", "hf", "--no-optimizer") == 0
    assert_same(hf_tensors(str(tmp_path / "hf")), hf)
    assert convert(src, str(tmp_path / "tp2"), "--to", "mcore", "--tp", "2", "--no-optimizer") == 0
    assert convert(str(tmp_path / "tp2"), str(tmp_path / "back"), "--to", "hf") == 0
    assert_same(hf_tensors(str(tmp_path / "back")), hf)
    # the run's iteration, scheduler and FLOP count travel to the Megatron output
    rank = torch.load(f"{tmp_path}/tp2/iter_{IT:07d}/mp_rank_00/model_optim_rng.pt", weights_only=False)
    assert rank["iteration"] == IT
    assert rank["opt_param_scheduler"] == {"max_lr": 1e-4, "num_steps": 24}
    assert rank["num_floating_point_operations_so_far"] == 1.5e12
    # its optimizer state is index-keyed: asked for (the default for Megatron targets), it is refused
    capsys.readouterr()
    assert convert(src, str(tmp_path / "opt"), "--to", "mcore") == 1
    err = capsys.readouterr().err.strip()
    assert (
        "torch_dcp" in err
        and "optimizer.state.0" in err
        and "--no-optimizer" in err
        and len(err.splitlines()) == 1
    )
    assert not os.path.exists(tmp_path / "opt")


def test_which_format_comes_from_the_args_or_the_flag(llama, tmp_path, capsys):
    """Nothing on disk tells torch_dcp from fsdp_dtensor: the args say it, else --source-ckpt-format
    (exit 2 without it, when it contradicts the args, and for another format)."""
    hf = hf_tensors(llama)
    no_args = megatron_save(str(tmp_path / "no_args"), {"iteration": IT, "model": llama_model(hf)})
    capsys.readouterr()
    assert convert(no_args, str(tmp_path / "a"), "--to", "hf", "--hf-config", llama) == 2
    err = capsys.readouterr().err
    assert "--source-ckpt-format" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "a")
    flag = ["--source-ckpt-format", "torch_dcp"]
    assert convert(no_args, str(tmp_path / "b"), "--to", "hf", "--hf-config", llama, *flag) == 0
    assert_same(hf_tensors(str(tmp_path / "b")), hf)
    said = megatron_save(
        str(tmp_path / "said"), {"args": megatron_args("torch_dcp"), "model": llama_model(hf)}
    )
    capsys.readouterr()
    assert convert(said, str(tmp_path / "c"), "--to", "hf", "--source-ckpt-format", "fsdp_dtensor") == 2
    err = capsys.readouterr().err
    assert "say it is torch_dcp" in err and "--source-ckpt-format fsdp_dtensor" in err
    assert convert(llama, str(tmp_path / "d"), "--to", "mcore", "--source-ckpt-format", "torch_dcp") == 2
    assert "no Megatron DCP checkpoint" in capsys.readouterr().err


# DeepSeek-V3 (MLA with q-LoRA, a dense first layer, routed experts with a score bias, a shared
# expert, one MTP layer) as Megatron-FSDP's GPTModel (TE spec) holds it


def deepseek_model(hf: dict, grouped: bool, mtp_inner: str) -> dict:
    """The fsdp_dtensor model entries (below ``model.`` and the wrappers): per-layer keys, SwiGLU
    fc1 as ``_w`` (gate) / ``_v`` (up), experts at global indices (TEGroupedMLP's ``weight<e>``
    when ``grouped``), MLA's down-projections apart, the MTP layer's transformer layer under
    ``mtp_inner``."""

    def layer(p: str, dense: bool) -> dict:
        a = p + "self_attn."
        out = {
            "input_layernorm.weight": hf[p + "input_layernorm.weight"],
            "self_attention.linear_q_down_proj.weight": hf[a + "q_a_proj.weight"],
            "self_attention.linear_q_up_proj.layer_norm_weight": hf[a + "q_a_layernorm.weight"],
            "self_attention.linear_q_up_proj.weight": hf[a + "q_b_proj.weight"],
            "self_attention.linear_kv_down_proj.weight": hf[a + "kv_a_proj_with_mqa.weight"],
            "self_attention.linear_kv_up_proj.layer_norm_weight": hf[a + "kv_a_layernorm.weight"],
            "self_attention.linear_kv_up_proj.weight": hf[a + "kv_b_proj.weight"],
            "self_attention.linear_proj.weight": hf[a + "o_proj.weight"],
        }
        m = p + "mlp."
        if dense:
            out["mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
            out["mlp.linear_fc1.weight_w"] = hf[m + "gate_proj.weight"]
            out["mlp.linear_fc1.weight_v"] = hf[m + "up_proj.weight"]
            out["mlp.linear_fc2.weight"] = hf[m + "down_proj.weight"]
            return out
        out["pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out["mlp.router.weight"] = hf[m + "gate.weight"]
        out["mlp.router.expert_bias"] = hf[m + "gate.e_score_correction_bias"]
        for e in range(4):
            x = f"{m}experts.{e}."
            fc1, fc2 = (
                (f"mlp.experts.linear_fc1.weight{e}", f"mlp.experts.linear_fc2.weight{e}")
                if grouped
                else (
                    f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                    f"mlp.experts.local_experts.{e}.linear_fc2.weight",
                )
            )
            out[fc1 + "_w"], out[fc1 + "_v"] = hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"]
            out[fc2] = hf[x + "down_proj.weight"]
        s = m + "shared_experts."
        out["mlp.shared_experts.linear_fc1.weight_w"] = hf[s + "gate_proj.weight"]
        out["mlp.shared_experts.linear_fc1.weight_v"] = hf[s + "up_proj.weight"]
        out["mlp.shared_experts.linear_fc2.weight"] = hf[s + "down_proj.weight"]
        return out

    sd = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"]}
    for i in range(3):
        sd.update({f"decoder.layers.{i}.{k}": v for k, v in layer(f"model.layers.{i}.", i == 0).items()})
    sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    p = "model.layers.3."
    sd["mtp.layers.0.enorm.weight"] = hf[p + "enorm.weight"]
    sd["mtp.layers.0.hnorm.weight"] = hf[p + "hnorm.weight"]
    sd["mtp.layers.0.eh_proj.weight"] = hf[p + "eh_proj.weight"]
    sd.update({f"mtp.layers.0.{mtp_inner}.{k}": v for k, v in layer(p, False).items()})
    sd["mtp.layers.0.final_layernorm.weight"] = hf[p + "shared_head.norm.weight"]
    sd["output_layer.weight"] = hf["lm_head.weight"]
    return sd


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> str:
    return build_deepseek(str(tmp_path_factory.mktemp("fsdp") / "deepseek"))


def test_fsdp_dtensor_with_mla_experts_and_mtp_converts_to_hf_bit_for_bit(deepseek, tmp_path, capsys):
    """fsdp_dtensor as a bf16 Megatron-FSDP run saves it (``model.module.module.``: the wrappers
    and Float16Module), TEGroupedMLP experts at global indices, the MTP layer under the name
    ``mtp_model_layer`` (0.17-0.19), optimizer state by parameter name, RNG per (PP, TP) rank."""
    hf = hf_tensors(deepseek)
    model = deepseek_model(hf, grouped=True, mtp_inner="mtp_model_layer")
    state = {
        "args": argparse.Namespace(num_layers=3, ckpt_format="fsdp_dtensor", use_megatron_fsdp=True),
        "checkpoint_version": 3.0,
        "iteration": IT,
        "model": {f"module.module.{k}": v for k, v in model.items()},
        "optimizer": {
            "state": {"module.module.module.output_layer.weight": {"exp_avg": torch.zeros(VOCAB, H)}},
            "param_to_group_meta": {"module.module.module.output_layer.weight": {"lr": 1e-4}},
        },
        "rng_state": {"(0, 0)": [{"torch_rng_state": torch.get_rng_state()}]},
    }
    src = megatron_save(str(tmp_path / "fsdp"), state)
    assert convert(src, str(tmp_path / "hf"), "--to", "hf", "--hf-config", deepseek) == 0
    assert_same(hf_tensors(str(tmp_path / "hf")), hf)


# ---------------------------------------------------------------------------------------------
# writing


def inspector(torch_dist: dict) -> dict:
    """Megatron-LM's checkpoint_inspector ``convert_checkpoint`` rule for model tensors (its
    defaults, ``--swiglu``): ``model.module.<key>``, a stacked ``decoder.layers.<key>`` split into
    ``decoder.layers.<i>.<key>``, a SwiGLU fc1 chunked into ``_w`` / ``_v``."""
    out = {}
    for key, value in torch_dist.items():
        new = f"model.module.{key}"
        if ".layers." in new and not re.search(r"layers\.(\d+)\.", new):
            parts = {new.replace(".layers.", f".layers.{i}."): v for i, v in enumerate(value)}
        else:
            parts = {new: value}
        for k, v in parts.items():
            if re.search(r"(.*)\.mlp\.linear_fc1\.weight", k):
                w, v_ = torch.chunk(v, 2, dim=0)
                out[re.sub(r"((?:weight|bias)\d*)(.*)", r"\1_w\2", k)] = w
                out[re.sub(r"((?:weight|bias)\d*)(.*)", r"\1_v\2", k)] = v_
            else:
                out[k] = v
    return out


def test_fsdp_dtensor_output_holds_what_megatrons_inspector_makes(llama, tmp_path):
    """HF -> fsdp_dtensor (TE names) = checkpoint_inspector(the model's torch_dist checkpoint):
    the same tensors (names, shapes, values), plus args, checkpoint_version and iteration; torch's
    own dcp.load reads it whole."""
    hf = hf_tensors(llama)
    layers = llama_layers(hf)
    torch_dist = {  # megatron-core's torch_dist keys: the decoder layers stacked on a leading axis
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        **{f"decoder.layers.{k}": torch.stack([lay[k] for lay in layers]) for k in layers[0]},
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "output_layer.weight": hf["lm_head.weight"],
    }
    out = str(tmp_path / "out")
    assert convert(llama, out, "--to", "mcore", "--ckpt-format", "fsdp_dtensor", "--norm-names", "te") == 0
    assert open(f"{out}/latest_checkpointed_iteration.txt").read() == "1"
    got = dcp_read(f"{out}/iter_0000001")
    tensors = {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}
    assert_same(tensors, inspector(torch_dist))
    assert {k for k in got if k not in tensors} == {"args", "checkpoint_version", "iteration"}
    assert got["checkpoint_version"] == 3.0 and got["iteration"] == 1
    assert got["args"].ckpt_format == "fsdp_dtensor" and got["args"].swiglu is True


def test_fsdp_dtensor_output_of_mla_experts_and_mtp_is_megatron_fsdps_model(deepseek, tmp_path):
    """DeepSeek-V3 -> fsdp_dtensor with TE names and grouped-GEMM experts holds exactly the model
    entries Megatron-FSDP's GPTModel saves (``model.module.``, TEGroupedMLP ``weight<e>_w``, the
    MTP layer as ``transformer_layer``); SequentialMLP experts (``local_experts.<e>``) without
    ``--moe-grouped-gemm``; and it reads back to the HF model bit for bit."""
    hf = hf_tensors(deepseek)
    for grouped in (True, False):
        out = str(tmp_path / f"out{grouped}")
        flags = ["--moe-grouped-gemm"] if grouped else []
        assert (
            convert(
                deepseek, out, "--to", "mcore", "--ckpt-format", "fsdp_dtensor", "--norm-names", "te", *flags
            )
            == 0
        )
        got = {k: v for k, v in dcp_read(f"{out}/iter_0000001").items() if isinstance(v, torch.Tensor)}
        want = deepseek_model(hf, grouped=grouped, mtp_inner="transformer_layer")
        assert_same(got, {f"model.module.{k}": v for k, v in want.items()})
    assert convert(out, str(tmp_path / "back"), "--to", "hf") == 0
    assert_same(hf_tensors(str(tmp_path / "back")), hf)
