"""Bad inputs through the real command line.

Every broken checkpoint or impossible request must end the same way: exit code 1 (2 for usage
errors), exactly one ``ckpt-ir: error: ...`` line on stderr that names the file / tensor at fault,
no Python traceback, and nothing at the destination -- neither DST nor a hidden
``.DST.ckpt-ir-tmp-*`` sibling.

Fixtures are tiny checkpoints built offline once per session (an HF Llama via transformers, and a
TP=2 PP=2 Megatron-Core copy made by ``ckpt-ir convert``); every test corrupts its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.cli_contract import (  # noqa: F401  (fixtures are used by name)
    CLI_TIMEOUT,
    ERROR_PREFIX,
    MCORE_ITER,
    MEMORY_CAP,
    REPO,
    TMP_TAG,
    _env,
    _limit_memory,
    assert_clean_error,
    assert_ok,
    build_tiny_hf,
    build_tiny_mcore,
    cli,
    cli_argv,
    convert,
    dst,
    hf_src,
    mcore_src,
    tiny_hf,
    tiny_mcore,
    tmp_siblings,
)


def read_st(path: Path) -> tuple[int, dict, bytes]:
    """(header length, header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def rewrite_tensors(path: Path, edit) -> None:
    """Load a safetensors file's tensors, let ``edit`` change the dict, save it back."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# 1. corrupt safetensors files


@pytest.mark.parametrize("keep", ["half", "in_header", "five_bytes", "empty"])
def test_truncated_safetensors(hf_src, dst, keep):
    f = hf_src / "model.safetensors"
    n, _, _ = read_st(f)
    size = {"half": f.stat().st_size // 2, "in_header": 8 + n // 2, "five_bytes": 5, "empty": 0}[keep]
    with open(f, "r+b") as fh:
        fh.truncate(size)
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors",))
    assert "truncated" in msg or "corrupt" in msg, msg


@pytest.mark.parametrize("fmt", ["hf", "mcore"])
def test_weight_file_is_a_fifo(request, dst, fmt):
    """A named pipe where a weight file should be must not block the converter forever."""
    src = request.getfixturevalue(f"{fmt}_src")
    if fmt == "hf":
        f, to = src / "model.safetensors", "mcore"
    else:
        f, to = src / MCORE_ITER / "mp_rank_00_000" / "model_optim_rng.pt", "hf"
    f.unlink()
    os.mkfifo(f)
    try:
        res = cli("convert", src, dst, "--to", to, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ckpt-ir hung opening the FIFO {f}")
    assert_clean_error(res, dst, names=(f.name,))


def test_truncated_safetensors_names_tensor(hf_src, dst):
    f = hf_src / "model.safetensors"
    _, header, _ = read_st(f)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 4)
    assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors", last))


@pytest.mark.parametrize(
    "garbage", [b"{this is not json", b"\xff\xfe\xfd\xfc binary", b"[1, 2, 3]", b'{"__metadata__": 7}']
)
def test_corrupt_header(hf_src, dst, garbage):
    f = hf_src / "model.safetensors"
    n, _, data = read_st(f)
    raw = garbage + b" " * (n - len(garbage))  # same length: only the content is wrong
    f.write_bytes(struct.pack("<Q", n) + raw + data)
    assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors",))


@pytest.mark.parametrize("claim", ["size_plus_1", "2**64-1"])
def test_header_length_larger_than_file(hf_src, dst, claim):
    f = hf_src / "model.safetensors"
    raw = f.read_bytes()
    n = {"size_plus_1": len(raw) + 1, "2**32": 2**32, "2**63": 2**63, "2**64-1": 2**64 - 1}[claim]
    f.write_bytes(struct.pack("<Q", n) + raw[8:])
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors",))
    assert "header" in msg, msg


def test_oversized_header(hf_src, dst):
    """A header past the 100 MiB spec limit is refused before it is parsed -- even when it is
    perfectly valid JSON that the file really contains."""
    f = hf_src / "model.safetensors"
    body = b'{"__metadata__": {"format": "pt"}'
    n = 100 * 1024 * 1024 + 64
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", n))
        fh.write(body)
        left, chunk = n - len(body) - 1, b" " * (1 << 20)
        while left > 0:
            left -= fh.write(chunk[:left])
        fh.write(b"}")
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors",))
    assert "header" in msg, msg


def _edit_entry(f: Path, key: str, edit) -> None:
    _, header, data = read_st(f)
    edit(header[key])
    write_st(f, header, data)


@pytest.mark.parametrize(
    "how",
    ["short_span", "wrong_dtype", "wrong_shape", "reversed", "past_end", "unknown_dtype", "missing_field"],
)
def test_data_offsets_do_not_match(hf_src, dst, how):
    key = "model.layers.1.self_attn.o_proj.weight"
    f = hf_src / "model.safetensors"

    def edit(e):
        a, b = e["data_offsets"]
        if how == "short_span":
            e["data_offsets"] = [a, b - 4]
        elif how == "wrong_dtype":
            e["dtype"] = "F16"
        elif how == "wrong_shape":
            e["shape"] = [64, 32]
        elif how == "reversed":
            e["data_offsets"] = [b, a]
        elif how == "past_end":
            e["data_offsets"] = [a + 10**9, b + 10**9]
        elif how == "unknown_dtype":
            e["dtype"] = "F31"
        elif how == "missing_field":
            del e["data_offsets"]

    _edit_entry(f, key, edit)
    assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors", key))


def test_overlapping_tensors(hf_src, dst):
    f = hf_src / "model.safetensors"
    a_key, b_key = "model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    _, header, data = read_st(f)
    header[b_key]["data_offsets"] = list(header[a_key]["data_offsets"])  # same shape [64, 64]
    write_st(f, header, data)
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors",))
    assert a_key in msg or b_key in msg, msg


# ---------------------------------------------------------------------------------------------
# 2. sharded index problems


def _write_index(src: Path, remap: dict[str, str]) -> Path:
    _, header, _ = read_st(src / "model.safetensors")
    weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
    weight_map.update(remap)
    index = src / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_index_names_missing_shard(hf_src, dst):
    _write_index(hf_src, {"model.norm.weight": "model-00002-of-00002.safetensors"})
    assert_clean_error(
        convert(hf_src, dst), dst, names=("model.safetensors.index.json", "model-00002-of-00002.safetensors")
    )


@pytest.mark.parametrize("where", ["dotdot", "absolute", "subdir_dotdot", "symlink_out"])
def test_index_escapes_directory(hf_src, dst, tmp_path, where):
    outside = tmp_path / "x.safetensors"  # a real, valid file: only the path is wrong
    shutil.copyfile(hf_src / "model.safetensors", outside)
    if where == "dotdot":
        name = "../x.safetensors"
    elif where == "absolute":
        name = str(outside)
    elif where == "subdir_dotdot":
        (hf_src / "sub").mkdir()
        name = "sub/../../x.safetensors"
    else:
        (hf_src / "link.safetensors").symlink_to(outside)
        name = "link.safetensors"
    _write_index(hf_src, {"model.norm.weight": name})
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors.index.json",))
    assert name in msg, msg


@pytest.mark.parametrize(
    "content", ["{not json", '{"metadata": {}}', '{"weight_map": {"model.norm.weight": 5}}']
)
def test_invalid_index(hf_src, dst, content):
    (hf_src / "model.safetensors.index.json").write_text(content)
    assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors.index.json",))


def test_duplicate_tensor_across_shards(hf_src, dst):
    shutil.copyfile(hf_src / "model.safetensors", hf_src / "model-copy.safetensors")
    assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors",))


# ---------------------------------------------------------------------------------------------
# 3. checkpoint does not match its config / no usable config


def test_tensor_shape_does_not_match_config(hf_src, dst):
    import torch

    key = "model.layers.1.self_attn.k_proj.weight"
    rewrite_tensors(hf_src / "model.safetensors", lambda t: t.__setitem__(key, torch.zeros(16, 64)))
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors", key))
    assert "config" in msg, msg


def test_config_does_not_match_tensors(hf_src, dst):
    cfg = json.loads((hf_src / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (hf_src / "config.json").write_text(json.dumps(cfg))
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("model.safetensors",))
    assert "mlp" in msg and "config" in msg, msg


def test_missing_tensor(hf_src, dst):
    """A checkpoint lacking a weight the config requires must not become an incomplete output."""
    rewrite_tensors(hf_src / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("layers.1",))
    assert "down_proj" in msg or "mlp.down" in msg, msg


def test_missing_config_json(hf_src, dst):
    (hf_src / "config.json").unlink()
    assert_clean_error(convert(hf_src, dst), dst, names=(str(hf_src), "config.json"))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_invalid_config_json(hf_src, dst, content):
    (hf_src / "config.json").write_text(content)
    assert_clean_error(convert(hf_src, dst), dst, names=("config.json",))


def test_config_missing_required_key(hf_src, dst):
    cfg = json.loads((hf_src / "config.json").read_text())
    del cfg["hidden_size"]
    (hf_src / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(convert(hf_src, dst), dst, names=("config.json", "hidden_size"))


@pytest.mark.parametrize(
    "key,value,field",
    [
        ("hidden_size", "64", "hidden_size"),
        ("num_hidden_layers", "2", "num_layers"),
        ("vocab_size", [128], "vocab_size"),
        ("intermediate_size", {}, "ffn_hidden_size"),
        ("num_attention_heads", 0, "num_heads"),
    ],
)
def test_config_value_is_invalid(hf_src, dst, key, value, field):
    """Wrong-typed or impossible config values: a clean error that points at config.json."""
    cfg = json.loads((hf_src / "config.json").read_text())
    cfg[key] = value
    (hf_src / "config.json").write_text(json.dumps(cfg))
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("config.json",))
    assert key in msg or field in msg, msg


def test_unknown_architecture(hf_src, dst):
    cfg = json.loads((hf_src / "config.json").read_text())
    cfg["model_type"] = "foo"
    cfg["architectures"] = ["FooForCausalLM"]
    (hf_src / "config.json").write_text(json.dumps(cfg))
    msg = assert_clean_error(convert(hf_src, dst), dst, names=("config.json", "foo"))
    assert "supported" in msg and "llama" in msg, f"message should list the supported types: {msg}"


def test_source_does_not_exist(tmp_path, dst):
    assert_clean_error(convert(tmp_path / "nope", dst), dst, names=("nope",))


def test_source_is_not_a_checkpoint(tmp_path, dst):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hello")
    assert_clean_error(convert(tmp_path / "empty", dst), dst, names=("empty",))


# ---------------------------------------------------------------------------------------------
# 4. impossible layouts (exit 1, nothing written)


@pytest.mark.parametrize(
    "flags,words",
    [
        (("--tp", 3), ("3", "heads")),
        (("--tp", 4), ("4",)),  # 4 heads but only 2 KV heads
        (("--pp", 2, "--num-layer-list", "1,2"), ("num-layer-list",)),
        (("--pp", 2, "--num-layer-list", "2"), ("num-layer-list",)),
        (("--pp", 3), ("3",)),
        (("--pp", 2, "--vpp-layers", 1, "--num-layer-list", "1,1"), ("num-layer-list",)),
        (("--vpp-layers", 1), ("vpp",)),
        (("--noop-layers", "7"), ("7",)),
    ],
)
def test_impossible_layout(hf_src, dst, flags, words):
    assert_clean_error(convert(hf_src, dst, *flags), dst, names=words)


@pytest.mark.parametrize("flag,value", [("--tp", 0), ("--pp", -1)])
def test_nonpositive_parallel_size(hf_src, dst, flag, value):
    """TP/PP below 1 is refused (a layout error, exit 1, or a usage error, exit 2), never ignored."""
    res = convert(hf_src, dst, flag, value)
    assert_clean_error(
        res, dst, code=res.returncode if res.returncode in (1, 2) else 1, names=(flag.strip("-"),)
    )


@pytest.mark.parametrize(
    "flags",
    [
        ("--bogus",),
        ("--tp", "abc"),
        ("--num-layer-list", "1,x"),
    ],
)
def test_usage_errors_exit_2(hf_src, dst, flags):
    assert_clean_error(convert(hf_src, dst, *flags), dst, code=2)


def test_missing_to_flag_exit_2(hf_src, dst):
    assert_clean_error(cli("convert", hf_src, dst), dst, code=2, names=("--to",))


def test_parallel_flags_with_to_hf_exit_2(hf_src, dst):
    assert_clean_error(convert(hf_src, dst, "--tp", 2, to="hf"), dst, code=2, names=("--tp",))


def test_mla_keys_for_a_model_without_mla_exit_2(hf_src, dst):
    """--mla-keys chooses multi-latent attention's modules: for a Llama it is a usage error."""
    err = assert_clean_error(convert(hf_src, dst, "--mla-keys", "mcore"), dst, code=2, names=("--mla-keys",))
    assert "no multi-latent attention" in err


def test_bad_dtype(hf_src, dst):
    res = convert(hf_src, dst, "--dtype", "fp7")
    assert res.returncode in (1, 2), res.stderr
    assert_clean_error(res, dst, code=res.returncode, names=("fp7",))


# ---------------------------------------------------------------------------------------------
# 5. broken Megatron-Core inputs


def test_megatron_missing_tp_rank(mcore_src, dst):
    shutil.rmtree(mcore_src / MCORE_ITER / "mp_rank_01_000")
    assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=("mp_rank_01_000",))


def test_megatron_rank_dir_without_file(mcore_src, dst):
    (mcore_src / MCORE_ITER / "mp_rank_01_001" / "model_optim_rng.pt").unlink()
    assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=("mp_rank_01_001",))


def test_megatron_extra_rank(mcore_src, dst):
    shutil.copytree(mcore_src / MCORE_ITER / "mp_rank_01_001", mcore_src / MCORE_ITER / "mp_rank_02_001")
    assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=(MCORE_ITER,))


def _rewrite_rank(path: Path, edit) -> None:
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=False)  # our own fixture file
    edit(obj)
    torch.save(obj, path)


@pytest.mark.parametrize("rank", ["mp_rank_01_001", "mp_rank_00_000"])
def test_megatron_mixed_iterations(mcore_src, dst, rank):
    f = mcore_src / MCORE_ITER / rank / "model_optim_rng.pt"
    _rewrite_rank(f, lambda o: o.__setitem__("iteration", 2))
    msg = assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=(rank,))
    assert "iteration" in msg, msg


def test_megatron_tracker_points_to_missing_iteration(mcore_src, dst):
    (mcore_src / "latest_checkpointed_iteration.txt").write_text("7\n")
    assert_clean_error(
        convert(mcore_src, dst, to="hf"), dst, names=("latest_checkpointed_iteration.txt", "iter_0000007")
    )


@pytest.mark.parametrize("text", ["seven", "-1"])
def test_megatron_tracker_garbage(mcore_src, dst, text):
    (mcore_src / "latest_checkpointed_iteration.txt").write_text(text)
    assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=("latest_checkpointed_iteration.txt",))


def test_megatron_rank_file_not_a_zip(mcore_src, dst):
    f = mcore_src / MCORE_ITER / "mp_rank_00_001" / "model_optim_rng.pt"
    f.write_bytes(b"definitely not a torch checkpoint\n" * 10)
    assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=("mp_rank_00_001",))


def test_megatron_rank_file_truncated(mcore_src, dst):
    f = mcore_src / MCORE_ITER / "mp_rank_00_001" / "model_optim_rng.pt"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=("mp_rank_00_001",))


def test_megatron_args_missing(mcore_src, dst):
    f = mcore_src / MCORE_ITER / "mp_rank_00_000" / "model_optim_rng.pt"
    _rewrite_rank(f, lambda o: o.pop("args"))
    assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=("mp_rank_00_000", "args"))


@pytest.mark.parametrize(
    "field,value",
    [
        (None, "hello"),  # args itself is not a Namespace
        ("tensor_model_parallel_size", "abc"),
        ("num_layer_list", "a,b"),
        ("num_layers_per_virtual_pipeline_stage", "x"),
        ("noop_layers", "x"),
        ("ckpt_ir_hf_config", "[1]"),
        ("ckpt_ir_family", "bogus"),
        ("tensor_model_parallel_size", 10**12),  # must not enumerate 10**12 rank directories
    ],
)
def test_megatron_args_malformed(mcore_src, dst, field, value):
    """args come from a file: wrong types are a corrupt checkpoint (exit 1), not a crash."""
    f = mcore_src / MCORE_ITER / "mp_rank_00_000" / "model_optim_rng.pt"

    def edit(o):
        if field is None:
            o["args"] = value
        else:
            setattr(o["args"], field, value)

    _rewrite_rank(f, edit)
    try:
        res = cli("convert", mcore_src, dst, "--to", "hf", timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ckpt-ir hung on args.{field} = {value!r}")
    assert_clean_error(res, dst)


def test_megatron_shard_shape_mismatch(mcore_src, dst):
    import torch

    key = "decoder.layers.0.self_attention.linear_proj.weight"
    f = mcore_src / MCORE_ITER / "mp_rank_01_000" / "model_optim_rng.pt"
    _rewrite_rank(f, lambda o: o["model"].__setitem__(key, torch.zeros(64, 16)))
    assert_clean_error(convert(mcore_src, dst, to="hf"), dst)


def test_megatron_tensor_missing_on_every_tp_rank(mcore_src, dst):
    """Layer 1 (stage 1, local layer 0) loses linear_fc2 on both TP ranks: the output would lack
    model.layers.1.mlp.down_proj.weight, so the conversion must fail instead."""
    for rank in ("mp_rank_00_001", "mp_rank_01_001"):
        _rewrite_rank(
            mcore_src / MCORE_ITER / rank / "model_optim_rng.pt",
            lambda o: o["model"].pop("decoder.layers.0.mlp.linear_fc2.weight"),
        )
    msg = assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=("layers.",))
    assert "fc2" in msg or "down" in msg, msg


def test_megatron_unknown_tensor(mcore_src, dst):
    import torch

    key = "decoder.layers.0.mlp.mystery.weight"
    f = mcore_src / MCORE_ITER / "mp_rank_00_000" / "model_optim_rng.pt"
    _rewrite_rank(f, lambda o: o["model"].__setitem__(key, torch.zeros(4)))
    assert_clean_error(convert(mcore_src, dst, to="hf"), dst, names=(key, "--allow-unused"))


# ---------------------------------------------------------------------------------------------
# 8. unknown extra tensors: refused unless dropped on purpose

EXTRA = "model.layers.0.mlp.extra.weight"


@pytest.fixture
def hf_with_extra(hf_src) -> Path:
    import torch

    rewrite_tensors(hf_src / "model.safetensors", lambda t: t.__setitem__(EXTRA, torch.ones(8, 8)))
    return hf_src


def test_unknown_tensor_is_refused(hf_with_extra, dst):
    assert_clean_error(convert(hf_with_extra, dst), dst, names=(EXTRA, "--allow-unused"))


def test_unknown_tensor_dry_run_lists_it_as_dropped(hf_with_extra, dst):
    res = convert(hf_with_extra, dst, "--allow-unused", "model.layers.0.mlp.extra*", "--dry-run")
    assert_ok(res)
    dropped = [ln for ln in res.stdout.splitlines() if ln.startswith("dropped:")]
    assert any(EXTRA in ln for ln in dropped), res.stdout
    assert not dst.exists() and not tmp_siblings(dst)


def test_unknown_tensor_allowed_converts_without_it(hf_with_extra, dst):
    res = convert(hf_with_extra, dst, "--allow-unused", "model.layers.0.mlp.extra*", to="hf")
    assert_ok(res)
    keys = set()
    for f in dst.glob("*.safetensors"):
        keys |= set(read_st(f)[1]) - {"__metadata__"}
    assert keys and EXTRA not in keys
    assert "model.layers.0.mlp.up_proj.weight" in keys
    assert not tmp_siblings(dst)


def test_not_enough_free_disk_is_refused_before_writing(hf_src, dst, monkeypatch, capsys):
    """The planned output size is compared with the free space before the first byte is written."""
    import collections

    from ckpt_ir.commands.cli import main as cli_main
    from ckpt_ir.io import atomic

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    assert cli_main(["convert", str(hf_src), str(dst), "--to", "mcore", "--tp", "2"]) == 1
    err = capsys.readouterr().err
    assert "not enough free disk space" in err and "free space or choose another destination" in err
    assert not dst.exists() and not tmp_siblings(dst)


# values a bf16 source holds that fp16 cannot: (tensor, row, column) -> value; an inf of the source
# and bf16's largest value below fp16's largest (65504) are not overflows
OVERFLOWING = {
    ("model.layers.0.mlp.down_proj.weight", 1, 2): 1e6,
    ("model.layers.0.mlp.down_proj.weight", 1, 3): -3e5,
    ("lm_head.weight", 5, 5): 7e4,
    ("model.layers.1.self_attn.q_proj.weight", 0, 0): float("inf"),
    ("model.layers.1.mlp.up_proj.weight", 0, 0): 65280.0,
}


@pytest.fixture
def bf16_with_large_values(hf_src) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    f = str(hf_src / "model.safetensors")
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(f).items()}
    for (name, i, j), value in OVERFLOWING.items():
        sd[name][i, j] = value
    save_file(sd, f, metadata={"format": "pt"})
    return hf_src


@pytest.mark.parametrize(
    "flags, names",
    [
        (("--to", "hf"), ("model.layers.0.mlp.down_proj.weight in model.safetensors", "lm_head.weight in")),
        (("--to", "hf", "--workers", "2"), ("model.layers.0.mlp.down_proj.weight in", "lm_head.weight in")),
        (
            ("--to", "mcore", "--tp", "2"),
            ("decoder.layers.0.mlp.linear_fc2.weight in", "output_layer.weight in"),
        ),
    ],
)
def test_cast_overflow_to_inf_is_refused_naming_every_tensor(bf16_with_large_values, dst, flags, names):
    res = cli("convert", bf16_with_large_values, dst, "--dtype", "fp16", *flags)
    msg = assert_clean_error(res, dst)
    assert "2 tensor(s) overflow to inf when cast: " in msg and "pass --allow-overflow" in msg
    down, head = (msg.index(n) for n in names)  # in the plan's order, each with its count and max |x|
    assert down < head
    assert "(2 element(s) up to |x| = 999424 -> inf in F16)" in msg[down:head]  # 1e6 as bf16
    assert "(1 element(s) up to |x| = 70144 -> inf in F16)" in msg[head:]
    assert "q_proj" not in msg and "up_proj" not in msg


def test_cast_overflow_leaves_an_existing_destination_as_it_was(bf16_with_large_values, dst):
    from tests.conftest import files_of

    assert_ok(cli("convert", bf16_with_large_values, dst, "--to", "hf"))
    before = files_of(str(dst))
    res = cli("convert", bf16_with_large_values, dst, "--to", "hf", "--dtype", "fp16", "--overwrite")
    assert_clean_error(res, None)
    assert files_of(str(dst)) == before and not tmp_siblings(dst)


def test_allow_overflow_writes_inf_and_warns_for_each_tensor(bf16_with_large_values, dst):
    import torch
    from safetensors.torch import load_file

    res = cli("convert", bf16_with_large_values, dst, "--to", "hf", "--dtype", "fp16", "--allow-overflow")
    assert_ok(res)
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: overflow to inf: ")]
    assert warnings == [
        "warning: overflow to inf: model.layers.0.mlp.down_proj.weight in model.safetensors "
        "(2 element(s) up to |x| = 999424 -> inf in F16)",
        "warning: overflow to inf: lm_head.weight in model.safetensors "
        "(1 element(s) up to |x| = 70144 -> inf in F16)",
    ]
    src = load_file(str(bf16_with_large_values / "model.safetensors"))
    out = load_file(str(dst / "model.safetensors"))
    for name, t in src.items():  # torch's cast, bit for bit: the overflowing elements are inf
        assert torch.equal(out[name].view(torch.int16), t.to(torch.float16).view(torch.int16)), name
    assert out["model.layers.0.mlp.down_proj.weight"][1, 2:4].tolist() == [float("inf"), float("-inf")]


def test_fp32_to_bf16_overflow_is_refused_too(hf_src, dst):
    from safetensors.torch import load_file, save_file

    f = str(hf_src / "model.safetensors")
    sd = load_file(f)
    sd["model.norm.weight"][0] = 3.4e38  # above bf16's largest value, 3.3895e38: rounds to inf
    save_file(sd, f, metadata={"format": "pt"})
    msg = assert_clean_error(cli("convert", hf_src, dst, "--to", "hf", "--dtype", "bf16"), dst)
    assert (
        "1 tensor(s) overflow to inf when cast: model.norm.weight in model.safetensors "
        "(1 element(s) up to |x| = 3.4e+38 -> inf in BF16)" in msg
    )


def test_cast_overflow_under_torchrun_is_refused_by_every_rank(bf16_with_large_values, dst):
    """The ranks write different files; their overflows are gathered and every rank refuses."""
    import sys

    from safetensors.torch import load_file, save_file

    f = str(bf16_with_large_values / "model.safetensors")
    sd = load_file(f)
    sd["model.layers.1.mlp.down_proj.weight"][0, 100] = 2e5  # in a file the second rank writes
    save_file(sd, f, metadata={"format": "pt"})
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        + ["--master-port", str(29500 + (os.getpid() + 1) % 1000)]
        + ["-m", "ckpt_ir", "convert", str(bf16_with_large_values), str(dst), "--to", "mcore"]
        + ["--tp", "2", "--pp", "2", "--dtype", "fp16"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=_env(),
        cwd=str(REPO),
    )
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith(ERROR_PREFIX)]
    assert res.returncode != 0 and len(errors) == 2 and errors[0] == errors[1], res.stderr
    assert "3 tensor(s) overflow to inf when cast: " in errors[0]
    assert "decoder.layers.0.mlp.linear_fc2.weight in iter_0000001/mp_rank_00_000/" in errors[0]
    assert "output_layer.weight in iter_0000001/mp_rank_00_001/" in errors[0]
    assert "decoder.layers.0.mlp.linear_fc2.weight in iter_0000001/mp_rank_01_001/" in errors[0]
    assert not dst.exists() and not tmp_siblings(dst)
