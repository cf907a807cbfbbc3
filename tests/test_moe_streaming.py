"""Many-tensor MoE writing: outputs byte-identical with 1, 2 and 4 writers, and every zip record's
CRC-32 (inline for small records, carried from the source for records copied whole, computed on
the helper thread otherwise) is the checksum of its bytes, in the local header and the directory."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zipfile
import zlib

import pytest

from tests.conftest import files_of
from tests.test_moe import build_moe


def convert(src: str, dst: str, *flags: str) -> None:
    subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", src, dst, *flags, "--quiet"], check=True)


def check_crcs(root: str) -> int:
    """Every record of every .pt under ``root``: its bytes' CRC-32 in both headers; returns how
    many records are large enough to take the kernel-copy path (over 256 KiB)."""
    large = 0
    for name, data in files_of(root).items():
        if not name.endswith(".pt"):
            continue
        with zipfile.ZipFile(os.path.join(root, name)) as z:
            for info in z.infolist():
                crc = zlib.crc32(z.read(info))
                local = struct.unpack("<I", data[info.header_offset + 14 : info.header_offset + 18])[0]
                assert info.CRC == crc == local, (name, info.filename)
                large += info.file_size > 256 << 10
    return large


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> str:
    # experts of 512 x 256 fp32 (512 KiB): copied in the kernel, not through memory
    root = tmp_path_factory.mktemp("moe")
    return build_moe(str(root / "hf"), "qwen3_moe", hidden_size=512, moe_intermediate_size=256, num_experts=8)


def test_moe_outputs_identical_with_1_2_4_workers_and_crcs_hold(moe, tmp_path):
    outs = []
    for w in ("1", "2", "4"):
        convert(moe, str(tmp_path / f"ep4-{w}"), "--to", "mcore", "--ep", "4", "--workers", w)
        outs.append(files_of(str(tmp_path / f"ep4-{w}")))
    assert outs[0] == outs[1] == outs[2]
    assert check_crcs(str(tmp_path / "ep4-1")) > 0
    # mcore EP4 -> EP2: the experts are source records copied whole, their stored CRCs reused
    resharded = []
    for w in ("1", "2", "4"):
        dst = str(tmp_path / f"ep2-{w}")
        convert(str(tmp_path / "ep4-1"), dst, "--to", "mcore", "--ep", "2", "--workers", w)
        resharded.append(files_of(dst))
    assert resharded[0] == resharded[1] == resharded[2]
    assert check_crcs(str(tmp_path / "ep2-1")) > 0
    # and back to HF: the tensors are the source's, byte for byte
    convert(str(tmp_path / "ep2-1"), str(tmp_path / "back"), "--to", "hf")
    from safetensors.numpy import load_file

    src = {}
    for f in os.listdir(moe):
        if f.endswith(".safetensors"):
            src.update(load_file(os.path.join(moe, f)))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert src.keys() == back.keys()
    assert all(src[k].tobytes() == back[k].tobytes() for k in src)
