"""Real training pickles: MindSpeed-LLM's and Megatron-LM's ``args`` (every value type they hold:
a ``set`` of no-op layers, torch dtypes and devices, Megatron enums, ``signal.Signals``, paths...)
pickled with every protocol and both ``torch.save`` serialisations are read, and still no pickle
can run code."""

from __future__ import annotations

import argparse
import enum
import io
import pathlib
import pickle
import shutil
import signal
import types

import pytest
import torch

from ckpt_ir.commands.cli import main as cli_main
from ckpt_ir.errors import FormatError
from ckpt_ir.io.safe_pickle import Stub, TorchDevice, TorchDtype, loads
from ckpt_ir.io.torchzip import TorchZip
from tests.cli_contract import MCORE_ITER, assert_clean_error, build_tiny_hf, convert  # noqa: F401
from tests.test_safety import _payload

NOOP = {1, 2}  # no-op layers of the fixture: 2 real + 2 no-op layers


def megatron_enums() -> tuple[type, type]:
    """(ModelType, AttnBackend), imported when a test needs them: importing megatron.core costs
    seconds, which every test process would pay while collecting this file."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    return ModelType, AttnBackend


def mindspeed_training_args(base: dict) -> argparse.Namespace:
    """What MindSpeed-LLM's pretrain_gpt.py saves: Megatron-LM's args plus its own, after its
    validation turned --noop-layers into a set (values as they are after argument parsing)."""
    ModelType, AttnBackend = megatron_enums()
    return argparse.Namespace(
        **{
            **base,
            **{
                "noop_layers": set(NOOP),
                "num_layer_list": None,
                "model_type": ModelType.encoder_or_decoder,
                "params_dtype": torch.float32,
                "main_grads_dtype": torch.float32,
                "exp_avg_dtype": torch.float32,
                "attention_backend": AttnBackend.auto,
                "exit_signal": signal.SIGTERM,
                "data_path": ["/data/alpaca_text_document"],
                "tokenizer_type": "PretrainedFromHF",
                "tokenizer_name_or_path": "/models/llama-tiny",
                "seq_length": 64,
                "consumed_train_samples": 4096,
                "consumed_valid_samples": 128,
                "skipped_train_samples": 0,
                "train_iters": 2000,
                "lr": 1.25e-6,
                "min_lr": 1.25e-7,
                "lr_decay_style": "cosine",
                "lr_warmup_fraction": 0.01,
                "seed": 1234,
                "rampup_batch_size": None,
                "split": "969,30,1",
                "world_size": 8,
                "data_parallel_size": 4,
                "rank": 0,
                "local_rank": 0,
                "make_vocab_size_divisible_by": 1,
                "use_fused_rmsnorm": True,
                "swap_attention": False,
                "shape_order": "SBH",
                "prompt_type": "llama2",
                "recompute_method": None,
                "moe_alltoall_overlap_comm": False,
                "context_parallel_algo": "ulysses_cp_algo",
                "optimization_level": 2,
                "tokenizer_kwargs": None,
                "save": pathlib.PosixPath("/ckpt/llama-tiny"),
                "load": pathlib.PosixPath("/ckpt/llama-tiny"),
                "device": torch.device("cuda", 3),
                "stage": None,
                "is_instruction_dataset": False,
                # the remaining inert value types a namespace can hold
                "kept_frozen": frozenset({3}),
                "slice_value": slice(0, None, 2),
                "complex_value": 1 + 2j,
                "raw_bytes": b"",
                "some_bytes": b"\x00\xff",
                "nested": types.SimpleNamespace(a=1, b=[1, 2]),
                "layer_range": range(0, 4),
            },
        }
    )


def megatron_lm_training_args(base: dict) -> argparse.Namespace:
    """Plain Megatron-LM args (no family name: the HF config comes from --hf-config)."""
    plain = {k: v for k, v in base.items() if not k.startswith("ckpt_ir_") and k != "model_type_hf"}
    ModelType, AttnBackend = megatron_enums()
    return argparse.Namespace(
        **{
            **plain,
            **{
                "model_type": ModelType.encoder_or_decoder,
                "attention_backend": AttnBackend.auto,
                "exit_signal": signal.SIGTERM,
                "params_dtype": torch.float32,
                "data_path": None,
                "mock_data": True,
                "consumed_train_samples": 96,
                "train_iters": 10,
                "lr": 3e-4,
                "seq_length": 16,
                "seed": 1234,
                "ckpt_format": "torch",
                "rerun_mode": "disabled",
                "timing_log_option": "minmax",
                "use_distributed_optimizer": True,
                "data_parallel_size": 2,
                "world_size": 4,
            },
        }
    )


def _plain(v):
    """A value with the types the restricted unpickler substitutes (stubs, TorchDtype, pure
    paths) replaced by what they stand for, to compare with the original."""
    if isinstance(v, Stub):
        return v.member or v.args[0]
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, TorchDtype) or isinstance(v, torch.dtype):
        return str(v.name if isinstance(v, TorchDtype) else v).replace("torch.", "")
    if isinstance(v, (TorchDevice, torch.device)):
        return (v.type, v.index)
    if isinstance(v, pathlib.PurePath):
        return str(v)
    if isinstance(v, types.SimpleNamespace):
        return vars(v)
    return v


@pytest.mark.parametrize("kind", ["mindspeed", "megatron-lm"])
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_args_of_every_protocol_are_read(kind, protocol):
    base = {"num_layers": 4, "hidden_size": 64, "tensor_model_parallel_size": 2}
    args = (mindspeed_training_args if kind == "mindspeed" else megatron_lm_training_args)(base)
    data = pickle.dumps({"args": args, "iteration": 7}, protocol=protocol)
    if protocol < 3 and kind == "mindspeed":  # the Python 2 names the issue is about really are in the pickle
        assert b"__builtin__" in data and (b"copy_reg" in data or protocol == 2)
    got = loads(data, "args.pkl")["args"]
    assert isinstance(got, argparse.Namespace)
    want = vars(args)
    assert set(vars(got)) == set(want)
    for k, v in want.items():
        assert _plain(getattr(got, k)) == _plain(v), k
    assert got.exit_signal is signal.SIGTERM  # allow-listed enum: the real member


def _legacy_or_zip_save(obj, path, protocol: int, zip_format: bool) -> None:
    torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zip_format)
    with open(path, "rb") as f:
        assert (f.read(2) == b"PK") == zip_format


@pytest.fixture(scope="module")
def noop_mcore(tmp_path_factory):
    """The tiny Llama as TP=2 MindSpeed-style checkpoint with no-op layers 1 and 2, and its HF
    export as the reference."""
    root = tmp_path_factory.mktemp("noop")
    hf = build_tiny_hf(tmp_path_factory)
    src = root / "mcore"
    assert (
        cli_main(
            ["convert", str(hf), str(src), "--to", "mcore", "--tp", "2", "--noop-layers", "1,2", "--quiet"]
        )
        == 0
    )
    ref = root / "ref"
    assert cli_main(["convert", str(src), str(ref), "--to", "hf", "--quiet"]) == 0
    return hf, src, ref


def _rewrite_ranks(src, dst, kind: str, protocol: int, zip_format: bool) -> None:
    shutil.copytree(src, dst)
    for rank in ("mp_rank_00", "mp_rank_01"):
        f = dst / MCORE_ITER / rank / "model_optim_rng.pt"
        obj = torch.load(f, weights_only=False)  # our own fixture file
        base = {k: v for k, v in vars(obj["args"]).items() if k != "noop_layers"}
        obj["args"] = (mindspeed_training_args if kind == "mindspeed" else megatron_lm_training_args)(base)
        if kind == "megatron-lm":
            obj["args"].noop_layers = set(NOOP)  # MindSpeed's set, in an otherwise plain args
        # Transformer-Engine's FP8 metadata: a BytesIO (protocol >= 2 only) or empty bytes
        obj["model"]["decoder.layers.0.self_attention.linear_proj._extra_state"] = (
            io.BytesIO(b"") if protocol >= 2 else b""
        )
        obj["opt_param_scheduler"] = {"max_lr": 1.25e-6, "num_steps": 4096, "decay_style": "cosine"}
        _legacy_or_zip_save(obj, f, protocol, zip_format)


@pytest.mark.parametrize("kind", ["mindspeed", "megatron-lm"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    "protocol", range(1, pickle.HIGHEST_PROTOCOL + 1)
)  # torch.save cannot use 0 with tensors
def test_rank_files_of_every_protocol_and_serialisation(noop_mcore, tmp_path, kind, protocol, zip_format):
    hf, src, ref = noop_mcore
    ckpt = tmp_path / "ckpt"
    _rewrite_ranks(src, ckpt, kind, protocol, zip_format)
    extra = ["--hf-config", str(hf)] if kind == "megatron-lm" else []
    out = tmp_path / "hf"
    assert cli_main(["convert", str(ckpt), str(out), "--to", "hf", "--quiet", *extra]) == 0
    with open(out / "model.safetensors", "rb") as a, open(ref / "model.safetensors", "rb") as b:
        assert a.read() == b.read()  # the same weights as the untouched checkpoint gives
    assert cli_main(["inspect", str(ckpt), *extra]) == 0
    if kind == "mindspeed":
        assert cli_main(["diff", str(ckpt), str(out)]) == 0


def test_training_args_are_carried_through_a_reshard(noop_mcore, tmp_path):
    """mcore -> mcore keeps every args field (Megatron's enums, sets, paths, devices written back as
    they were) except the layout fields it changes; the scheduler travels without optimizer state."""
    _, src, _ = noop_mcore
    ckpt = tmp_path / "ckpt"
    _rewrite_ranks(src, ckpt, "mindspeed", 2, False)
    out = tmp_path / "tp1"
    assert cli_main(["convert", str(ckpt), str(out), "--to", "mcore", "--tp", "1", "--quiet"]) == 0
    got = torch.load(out / MCORE_ITER / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    want = torch.load(ckpt / MCORE_ITER / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    a, b = vars(got["args"]), vars(want["args"])
    assert {k for k in b if a.get(k) != b[k]} == {
        "tensor_model_parallel_size",
        "num_layers",
        "noop_layers",
        "world_size",
    }
    assert (
        a["noop_layers"] is None and a["num_layers"] == 2 and a["world_size"] == 4
    )  # 8 ranks of TP 2 -> TP 1
    ModelType, AttnBackend = megatron_enums()
    assert a["model_type"] is ModelType.encoder_or_decoder and a["attention_backend"] is AttnBackend.auto
    assert a["exit_signal"] is signal.SIGTERM and a["device"] == torch.device("cuda", 3)
    assert a["save"] == pathlib.PosixPath("/ckpt/llama-tiny") and a["kept_frozen"] == frozenset({3})
    assert got["opt_param_scheduler"] == want["opt_param_scheduler"]
    kept = tmp_path / "tp1_noop"  # the no-op layers kept: args say so in ckpt-ir's string form
    assert (
        cli_main(
            ["convert", str(ckpt), str(kept), "--to", "mcore", "--tp", "1", "--noop-layers", "1,2", "--quiet"]
        )
        == 0
    )
    args = torch.load(kept / MCORE_ITER / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["args"]
    assert args.noop_layers == "1,2" and args.num_layers == 4


def test_legacy_rank_file_offsets_are_exact(noop_mcore, tmp_path):
    """The legacy reader's storage offsets give torch's own tensors byte for byte."""
    _, src, _ = noop_mcore
    ckpt = tmp_path / "ckpt"
    _rewrite_ranks(src, ckpt, "mindspeed", 2, False)
    f = ckpt / MCORE_ITER / "mp_rank_01" / "model_optim_rng.pt"
    z = TorchZip(str(f))
    truth = torch.load(f, weights_only=False)["model"]
    from ckpt_ir.io.torchzip import iter_tensors
    from ckpt_ir.ir import expr as E

    seen = 0
    with E.Reader() as reader:
        for key, ref in iter_tensors(z.obj["model"]):
            assert torch.equal(E.evaluate(z.load_expr(ref, key), reader), truth[key]), key
            seen += 1
    assert seen == len([v for v in truth.values() if isinstance(v, torch.Tensor)])


# ---------------------------------------------------------------------------------------------
# still no code: the Python 2 names and the new inert types open no door


EVIL = [
    b'c__builtin__\neval\n(S\'open("MARKER", "w").close()\'\ntR.',  # builtins.eval under its py2 name
    b"cposix\nsystem\n(S'touch MARKER'\ntR.",  # os.system as Python 2 spelt it
    b"ccommands\ngetoutput\n(S'touch MARKER'\ntR.",  # subprocess.getoutput
    b"ccopy_reg\n_reconstructor\n(cposix\nsystem\nc__builtin__\nobject\nNtR.",
    b"c__builtin__\ngetattr\n(cargparse\nNamespace\nS'__init__'\ntR.",  # getattr is for enum members only
    b"c__builtin__\ngetattr\n(cmegatron.core.enums\nModelType\nS'__class__'\ntR.",
    b"c__builtin__\nbytes\n(I100000000000\ntR.",  # bytes(N): a memory bomb
    b"ctorch\ndevice\n(cposix\nsystem\nS'touch MARKER'\ntR.",
]


@pytest.mark.parametrize("payload", EVIL, ids=range(len(EVIL)))
def test_old_protocol_payloads_are_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    with pytest.raises(FormatError):
        loads(payload.replace(b"MARKER", str(marker).encode()), "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [1, 2])
def test_malicious_legacy_rank_file(noop_mcore, tmp_path, protocol):
    _, src, _ = noop_mcore
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    marker = tmp_path / "pwned"
    f = ckpt / MCORE_ITER / "mp_rank_01" / "model_optim_rng.pt"
    obj = torch.load(f, weights_only=False)
    obj["args"].noop_layers = set(NOOP)
    obj["args"].evil = _payload("os.system", marker)
    _legacy_or_zip_save(obj, f, protocol, False)
    msg = assert_clean_error(
        convert(ckpt, tmp_path / "out", to="hf"), tmp_path / "out", names=("mp_rank_01",)
    )
    assert "refusing to unpickle" in msg and not marker.exists()
