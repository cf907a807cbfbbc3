"""Checkpoints saved from CUDA or Ascend devices record ``cuda:N`` / ``npu:N`` as each storage's
location in the pickle; they read on a machine with neither (no device is ever touched)."""

from __future__ import annotations

import glob
import os
import zipfile

import pytest
import torch
import torch.serialization

from tests.cli_contract import cli
from tests.test_hf_roundtrip import assert_same_tensors


def save_as_if_from(device: str, obj, path: str, monkeypatch) -> None:
    """torch.save, with every storage tagged as living on ``device`` (as a save from that device
    records it); the bytes are the same as a CPU save's."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: device)
        torch.save(obj, path)
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert device.encode() in pkl and b"cpu" not in pkl  # the pickle really records the device
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        with pytest.raises(
            (RuntimeError, AttributeError)
        ):  # torch itself cannot load it here without a map_location
            torch.load(path, weights_only=False)


@pytest.mark.parametrize("device", ["cuda:1", "npu:0"])
def test_megatron_rank_files_saved_on_a_device_convert_on_cpu(hf_cache, tmp_path, monkeypatch, device):
    src = hf_cache("llama")
    mc = tmp_path / "mc"
    assert cli("convert", src, mc, "--to", "mcore", "--tp", "2", "--pp", "2").returncode == 0
    files = glob.glob(str(mc / "iter_*" / "mp_rank_*" / "model_optim_rng.pt"))
    assert len(files) == 4
    for f in files:
        save_as_if_from(device, torch.load(f, weights_only=False, map_location="cpu"), f, monkeypatch)
    back = tmp_path / "back"
    r = cli("convert", mc, back, "--to", "hf")
    assert r.returncode == 0, r.stderr
    assert_same_tensors(src, str(back))


def test_hf_pytorch_model_bin_saved_on_npu_reads_on_cpu(hf_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    src = hf_cache("llama", layers=2)
    binary = tmp_path / "bin"
    binary.mkdir()
    for n in os.listdir(src):
        if n.endswith(".json"):
            (binary / n).write_bytes((open(os.path.join(src, n), "rb")).read())
    save_as_if_from(
        "npu:3",
        load_file(os.path.join(src, "model.safetensors")),
        str(binary / "pytorch_model.bin"),
        monkeypatch,
    )
    out = tmp_path / "out"
    r = cli("convert", binary, out, "--to", "hf")
    assert r.returncode == 0, r.stderr
    assert_same_tensors(src, str(out))
