"""Megatron-Core backend: one ``model_optim_rng.pt`` per (TP rank, PP stage), streamed."""

from __future__ import annotations

from collections import defaultdict

from ckpt_ir import mcore_format as M
from ckpt_ir.backends.plan import OutputFile, Plan
from ckpt_ir.errors import VerifyError
from ckpt_ir.families import by_name
from ckpt_ir.io.torchzip import Tensor
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint, TensorNode
from ckpt_ir.ir.layout import layer_slots, num_chunks
from ckpt_ir.ir.names import split_layer


def _shard(t: TensorNode, rank: int) -> E.Expr:
    return t.shards[rank] if t.tp > 1 else t.shards[0]


def plan(ckpt: Checkpoint, *, iteration: int | None = None) -> Plan:
    spec, layout = ckpt.spec, ckpt.layout
    if not (layout.fused_qkv and layout.fused_gate_up):
        raise VerifyError("Megatron output needs fused QKV and gate/up; the pipeline must run fuse-qkv and "
                          "fuse-gate-up")
    slots = layer_slots(spec, layout)
    where = {s.real: s for s in slots if s.real is not None}
    chunks = num_chunks(spec, layout)
    table = M.layer_table(layout.norm_names)
    # (stage, chunk) -> ordered [(mcore key, canonical name)]
    content: dict[tuple[int, int], list[tuple[str, str]]] = defaultdict(list)
    by_layer: dict[int, dict[str, str]] = defaultdict(dict)
    for name in ckpt.tensors:
        layer, rest = split_layer(name)
        if layer is not None:
            by_layer[layer]["layers.{i}." + rest] = name
    last = (layout.pp - 1, chunks - 1)
    if "embed.weight" in ckpt.tensors:
        content[(0, 0)].append(("embedding.word_embeddings.weight", "embed.weight"))
    for layer in sorted(by_layer):
        slot = where[layer]
        roles = by_layer[layer]
        for role in M.LAYER_ROLE_ORDER:
            if role in roles:
                key = table.from_canonical(role.replace("{i}", str(slot.local)))
                content[(slot.stage, slot.chunk)].append((key, roles[role]))
                for which in ("a", "b"):  # LoRA adapters right after their base weight
                    lora_role = role[: -len(".weight")] + f".lora_{which}.weight"
                    if lora_role in roles:
                        content[(slot.stage, slot.chunk)].append((M.lora_key(key, which), roles[lora_role]))
        known = set(M.LAYER_ROLE_ORDER) | {r[: -len(".weight")] + f".lora_{w}.weight"
                                           for r in M.LAYER_ROLE_ORDER for w in "ab"}
        unknown = set(roles) - known
        if unknown:
            raise VerifyError(f"layer {layer}: no Megatron name for {sorted(unknown)}")
    content[last].append(("decoder.final_layernorm.weight", "final_norm.weight"))
    if "lm_head.weight" in ckpt.tensors:
        content[last].append(("output_layer.weight", "lm_head.weight"))
    elif spec.tied_embeddings and layout.pp > 1:
        # Megatron keeps a copy of the tied embedding on the last stage when PP > 1
        content[last].append(("output_layer.weight", "embed.weight"))

    family = by_name(spec.family)
    args = M.build_args(spec, layout, ckpt.hf_config, family.mindspeed_names[0] if family.mindspeed_names else spec.family)
    it = iteration if iteration is not None else ckpt.meta.get("iteration", 1)
    files: list[OutputFile] = []
    for stage in range(layout.pp):
        for rank in range(layout.tp):
            tensors: list[tuple[str, E.Expr]] = []
            models = {}
            for chunk in range(chunks):
                sd = {}
                for key, canon in content[(stage, chunk)]:
                    uid = f"model{chunk}/{key}"
                    expr = _shard(ckpt.tensors[canon], rank)
                    tensors.append((uid, expr))
                    sd[key] = Tensor(uid, expr.dtype, expr.shape)
                models["model" if chunks == 1 else f"model{chunk}"] = sd
            obj = {"args": args, "checkpoint_version": 3.0, "iteration": it, **models}
            path = f"{M.iter_dir(it)}/{M.rank_dir(rank, stage, layout)}/model_optim_rng.pt"
            files.append(OutputFile(path, "torch", tuple(tensors), obj=obj))
    files.append(OutputFile("latest_checkpointed_iteration.txt", "text", text=str(it)))
    return Plan(tuple(files), dict(ckpt.dropped))
