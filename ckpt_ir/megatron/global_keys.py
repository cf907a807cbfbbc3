"""Megatron-Core's keys with global layer numbers, as the formats that store the whole model under
one name per tensor use them: ``torch_dist`` (``dist_checkpointing``: layers stacked on a leading
axis, or ``decoder.layers.<i>.`` unstacked), ``torch_dcp`` and ``fsdp_dtensor`` (the model's own
state dict: one key per layer, experts at global indices).

:func:`names` gives the canonical names one stored key holds (and where in it), for the modules
Megatron-Core builds: dense and MoE layers (``mlp.experts.experts.*`` stacked on an expert axis,
SequentialMLP's ``local_experts.<e>.*`` or TEGroupedMLP's ``linear_fc1.weight<e>``), its own
multi-latent attention and multi-token-prediction layers (``mtp.layers.<k>.``, whose transformer
layer is ``transformer_layer`` on disk, or ``mtp_model_layer``, the module's name since
Megatron-Core 0.17).  :func:`fuse_mla` turns Megatron-Core's separate MLA down-projections into
the fused ``attn.qkv_a`` the IR's Megatron layout holds.
"""

from __future__ import annotations

import re

from ckpt_ir.errors import FormatError
from ckpt_ir.ir.names import layer_name
from ckpt_ir.megatron import keys as M

_UNSTACKED = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED_EXPERTS = re.compile(r"^mlp\.experts\.(?:experts|local_experts)\.(linear_fc[12]\.(?:weight|bias))$")
_ONE_EXPERT = re.compile(
    r"^mlp\.experts\.(?:experts|local_experts)\.(\d+)\.(linear_fc[12]\.(?:weight|bias))$"
)
# TEGroupedMLP's per-expert parameters (the module's state dict, not its sharded one)
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")
_MTP = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")
# the transformer layer inside an MTP layer: its name on disk, and the module's own since 0.17
MTP_INNER = ("transformer_layer.", "mtp_model_layer.")
# an MTP layer's own modules around its transformer layer (Megatron-Core's names)
_MTP_OWN = {
    "enorm.weight": "mtp.enorm.weight",
    "hnorm.weight": "mtp.hnorm.weight",
    "eh_proj.weight": "mtp.eh_proj.weight",
    "final_layernorm.weight": "mtp.norm.weight",
    # DeepSeek-V4's MTP hyper-connection head (MindSpeed-LLM's names)
    **{m[len("mtp.layers.{k}.") :]: c for m, c in M.MTP_HC_HEAD},
}
_MLA_READ = dict(M.MCORE_MLA_KEYS + M.MCORE_MLA_TE_NORMS)
# megatron-core's Mamba mixer keeps its fused tensors in torch_dist as one global tensor per part
# (MambaMixer.sharded_state_dict: ``<key>.z`` ... each TP-sharded on dim 0), in this order; the
# mixer is ``mixer`` in MambaModel's MambaLayer, ``mamba_mixer`` in Megatron-Bridge's FalconH1Layer
# (falconh1_layer.py sharded_state_dict: the same MambaMixer's sharded state dict)
MAMBA_MODULES = ("mixer", "mamba_mixer")
MAMBA_PARTS = {
    "in_proj.weight": ("z", "x", "B", "C", "dt"),
    "conv1d.weight": ("x", "B", "C"),
    "conv1d.bias": ("x", "B", "C"),
}
# and so does its GatedDeltaNet (GatedDeltaNet.sharded_state_dict: ``in_proj.weight.query`` ...)
GDN_PARTS = {
    "self_attention.in_proj.weight": ("query", "key", "value", "z", "beta", "alpha"),
    "self_attention.conv1d.weight": ("query", "key", "value"),
}
MAMBA_PART_KEY = re.compile(  # a part of a Mamba or gated-delta-net mixer's tensor
    r"^(decoder\.layers\.\d+\.(?:(?:"
    + "|".join(MAMBA_MODULES)
    + r")\.(?:"
    + "|".join(re.escape(k) for k in MAMBA_PARTS)
    + r")|"
    + "|".join(re.escape(k) for k in GDN_PARTS)
    + r"))\.(\w+)$"
)


def mamba_parts(key: str) -> tuple[str, ...] | None:
    """The part names megatron-core stores the Mamba (or gated-delta-net) mixer tensor ``key``
    (below the layer) as, or None when it is no such tensor."""
    module, _, rest = key.partition(".")
    return MAMBA_PARTS.get(rest) if module in MAMBA_MODULES else GDN_PARTS.get(key)


def layer_mamba_parts(key: str) -> tuple[str, ...] | None:
    """:func:`mamba_parts` of a whole model's key ``decoder.layers.<i>.<tensor>``."""
    if not key.startswith(M.LAYERS):
        return None
    return mamba_parts(key[len(M.LAYERS) :].partition(".")[2])


def mamba_part_sizes(spec, key: str) -> tuple[int, ...]:
    """Rows of each part of the Mamba (or gated-delta-net) mixer tensor ``key`` (below the layer,
    see :func:`mamba_parts`)."""
    if key in GDN_PARTS:
        return spec.gdn_in_proj_parts if ".in_proj." in key else spec.gdn_conv_parts
    return spec.mamba_in_proj_parts if key.partition(".")[2].startswith("in_proj") else spec.mamba_conv_parts


def names(
    key: str, shape: tuple[int, ...], num_layers: int, tables, where: str, mla: bool = False
) -> list[tuple[str, tuple[int, ...]]] | None:
    """[(canonical name, index into the stored tensor's leading axes)] for the stored key ``key``
    of shape ``shape``, or None when the key means nothing to us.  Multi-token-prediction layer k
    (``mtp.layers.<k>.``) is model layer ``num_layers + k``; ``mla``: Megatron-Core's own MLA
    keys."""
    layers: list[tuple[int, str, tuple[int, ...]]]  # (model layer, key below it, index into the stack)
    m = _MTP.match(key)
    if m:
        layer, rest = num_layers + int(m.group(1)), m.group(2)
        if rest in _MTP_OWN:
            return [(layer_name(layer, _MTP_OWN[rest]), ())]
        inner = next((p for p in MTP_INNER if rest.startswith(p)), None)
        if inner is None:
            return None
        layers = [(layer, rest[len(inner) :], ())]
    elif (m := _UNSTACKED.match(key)) is not None:
        layers = [(int(m.group(1)), m.group(2), ())]
    elif key.startswith(M.LAYERS):
        if not shape or shape[0] != num_layers:
            raise FormatError(
                f"{where}: {key} {list(shape)} should stack {num_layers} layers on its first axis; "
                f"the checkpoint does not match its args"
            )
        rest = key[len(M.LAYERS) :]
        layers = [(i, rest, (i,)) for i in range(num_layers)]
    else:
        canon = M.canonical_key(key, 0, 0, tables)
        return None if canon is None else [(_resolve(canon), ())]
    out: list[tuple[str, tuple[int, ...]]] = []
    for i, rest, index in layers:
        m = _STACKED_EXPERTS.match(rest)
        if m:
            n = shape[len(index)] if len(shape) > len(index) else 0
            per = [(f"mlp.experts.local_experts.{e}.{m.group(1)}", index + (e,)) for e in range(n)]
        elif (m := _ONE_EXPERT.match(rest)) is not None:
            per = [(f"mlp.experts.local_experts.{m.group(1)}.{m.group(2)}", index)]
        elif (m := _GROUPED_EXPERT.match(rest)) is not None:
            per = [(f"mlp.experts.local_experts.{m.group(3)}.{m.group(1)}.{m.group(2)}", index)]
        else:
            per = [(rest, index)]
        for sub, idx in per:
            if mla and sub in _MLA_READ:
                out.append((layer_name(i, _MLA_READ[sub]), idx))
                continue
            canon = M.canonical_key(f"{M.LAYERS}{i}.{sub}", 0, 0, tables)
            if canon is None:
                return None
            out.append((_resolve(canon), idx))
    return out


def _resolve(canon: str | M.LocalName) -> str:
    """Global layer numbers: a "local" layer is the model's layer."""
    return canon if isinstance(canon, str) else layer_name(canon.local, canon.rest)
