"""The tensors of one weight file, safetensors or a ``torch.save`` zip (``pytorch_model.bin``), as
lazy loads: headers are read, data is not."""

from __future__ import annotations

from ckpt_ir.errors import FormatError
from ckpt_ir.io import safetensors as st
from ckpt_ir.io.torchzip import TorchZip, iter_tensors
from ckpt_ir.ir import expr as E


def file_tensors(path: str) -> dict[str, E.Load]:
    """Every tensor of ``path`` (a ``.safetensors`` file, else a torch zip holding a state dict)."""
    if path.endswith(".safetensors"):
        return st.read_header(path)[0]
    z = TorchZip(path)
    obj = z.obj.get("state_dict", z.obj) if isinstance(z.obj, dict) else None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a state dict of tensors")
    return {k: z.load_expr(ref, k) for k, ref in iter_tensors(obj)}
