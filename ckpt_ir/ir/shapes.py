"""Expected full (unsharded) shape of every canonical role, from the ModelSpec and Layout."""

from __future__ import annotations

from ckpt_ir.ir.layout import Layout
from ckpt_ir.ir.names import SAVED, is_lora, lora_target, role_of
from ckpt_ir.ir.spec import ModelSpec


def expected_shape(spec: ModelSpec, layout: Layout, name: str, rank: int | None = None) -> tuple[int, ...] | None:
    """None when the role is unknown (the verifier reports it)."""
    h, d, f = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    q, kv = spec.q_size, spec.kv_size
    vocab = layout.padded_vocab or spec.vocab_size
    table: dict[str, tuple[int, ...]] = {
        "embed.weight": (vocab, h),
        "lm_head.weight": (vocab, h),
        "final_norm.weight": (h,),
        "layers.{i}.attn_norm.weight": (h,),
        "layers.{i}.attn.q.weight": (q, h),
        "layers.{i}.attn.k.weight": (kv, h),
        "layers.{i}.attn.v.weight": (kv, h),
        "layers.{i}.attn.q.bias": (q,),
        "layers.{i}.attn.k.bias": (kv,),
        "layers.{i}.attn.v.bias": (kv,),
        "layers.{i}.attn.qkv.weight": (q + 2 * kv, h),
        "layers.{i}.attn.qkv.bias": (q + 2 * kv,),
        "layers.{i}.attn.o.weight": (h, q),
        "layers.{i}.attn.q_norm.weight": (d,),
        "layers.{i}.attn.k_norm.weight": (d,),
        "layers.{i}.post_attn_norm.weight": (h,),
        "layers.{i}.mlp_norm.weight": (h,),
        "layers.{i}.mlp.gate.weight": (f, h),
        "layers.{i}.mlp.up.weight": (f, h),
        "layers.{i}.mlp.gate_up.weight": (2 * f, h),
        "layers.{i}.mlp.down.weight": (h, f),
        "layers.{i}.post_mlp_norm.weight": (h,),
        "layers.{i}.mlp.router.weight": (spec.num_experts, h),
        "layers.{i}.mlp.router.bias": (spec.num_experts,),
        "layers.{i}.mlp.experts.{e}.gate.weight": (spec.moe_ffn_hidden_size, h),
        "layers.{i}.mlp.experts.{e}.up.weight": (spec.moe_ffn_hidden_size, h),
        "layers.{i}.mlp.experts.{e}.gate_up.weight": (2 * spec.moe_ffn_hidden_size, h),
        "layers.{i}.mlp.experts.{e}.down.weight": (h, spec.moe_ffn_hidden_size),
        "layers.{i}.mlp.shared.gate.weight": (spec.shared_ffn_hidden_size, h),
        "layers.{i}.mlp.shared.up.weight": (spec.shared_ffn_hidden_size, h),
        "layers.{i}.mlp.shared.gate_up.weight": (2 * spec.shared_ffn_hidden_size, h),
        "layers.{i}.mlp.shared.down.weight": (h, spec.shared_ffn_hidden_size),
        "layers.{i}.mlp.shared_gate.weight": (1, h),
        "layers.{i}.attn.q_a.weight": (spec.q_lora_rank, h),
        "layers.{i}.attn.q_a_norm.weight": (spec.q_lora_rank,),
        "layers.{i}.attn.q_b.weight": (spec.mla_q_size, spec.q_lora_rank),
        "layers.{i}.attn.kv_a.weight": (spec.kv_lora_rank + spec.qk_rope_dim, h),
        "layers.{i}.attn.kv_a_norm.weight": (spec.kv_lora_rank,),
        "layers.{i}.attn.kv_b.weight": (spec.num_heads * (spec.qk_nope_dim + spec.v_head_dim), spec.kv_lora_rank),
        "layers.{i}.attn.qkv_a.weight": ((spec.q_lora_rank or spec.mla_q_size) + spec.kv_lora_rank + spec.qk_rope_dim, h),
        "layers.{i}.mtp.enorm.weight": (h,),
        "layers.{i}.mtp.hnorm.weight": (h,),
        "layers.{i}.mtp.eh_proj.weight": (h, 2 * h),
        "layers.{i}.mtp.norm.weight": (h,),
        "layers.{i}.mtp.embed.weight": (vocab, h),
        "layers.{i}.mtp.head.weight": (vocab, h),
    }
    if spec.mla:  # MLA: q is [heads x (nope + rope), H] when not low-rank; o maps heads x v back
        table["layers.{i}.attn.q.weight"] = (spec.mla_q_size, h)
        table["layers.{i}.attn.o.weight"] = (h, spec.num_heads * spec.v_head_dim)
    role = role_of(name)
    if is_lora(role):  # the rank is each target's own (peft's rank_pattern): ``rank`` is read from the tensor
        target = table.get(lora_target(role))
        if target is None:
            return None
        if SAVED in role:
            return target
        if role.endswith(".lora_magnitude.weight"):
            return target[:1]
        r = rank if rank is not None else spec.lora_rank
        if r is None:
            return None
        return (r, target[1]) if role.endswith(".lora_a.weight") else (target[0], r)
    return table.get(role)


def expected_names(spec: ModelSpec, layout: Layout) -> set[str]:
    """Every canonical tensor the spec implies (LoRA aside), for completeness checks."""
    split_qkv = ("attn.q", "attn.k", "attn.v")
    names = {"embed.weight", "final_norm.weight"}
    if not spec.tied_embeddings:
        names.add("lm_head.weight")

    def mlp(prefix: str) -> list[str]:
        fused = [prefix + "gate_up.weight"] if layout.fused_gate_up else [prefix + "gate.weight", prefix + "up.weight"]
        return fused + [prefix + "down.weight"]

    for i in range(spec.total_layers):
        rest = ["attn_norm.weight", "mlp_norm.weight", "attn.o.weight"]
        if spec.mla:
            q_down = ["attn.q_a.weight"] if spec.q_lora_rank else ["attn.q.weight"]
            rest += ["attn.qkv_a.weight"] if layout.fused_qkv else q_down + ["attn.kv_a.weight"]
            rest += ["attn.kv_a_norm.weight", "attn.kv_b.weight"]
            if spec.q_lora_rank:
                rest += ["attn.q_a_norm.weight", "attn.q_b.weight"]
            qkv = []
        else:
            qkv = ["attn.qkv"] if layout.fused_qkv else list(split_qkv)
            rest += [q + ".weight" for q in qkv]
        if spec.qkv_bias:
            rest += [q + ".bias" for q in qkv]
        if spec.qk_norm:
            rest += ["attn.q_norm.weight", "attn.k_norm.weight"]
        if spec.post_norms:
            rest += ["post_attn_norm.weight", "post_mlp_norm.weight"]
        if spec.is_moe_layer(i):
            rest.append("mlp.router.weight")
            if spec.router_bias:
                rest.append("mlp.router.bias")
            for e in range(spec.num_experts):
                rest += mlp(f"mlp.experts.{e}.")
            if spec.shared_ffn_hidden_size:
                rest += mlp("mlp.shared.")
            if spec.shared_expert_gate:
                rest.append("mlp.shared_gate.weight")
        else:
            rest += mlp("mlp.")
        if i >= spec.num_layers:
            rest += ["mtp.enorm.weight", "mtp.hnorm.weight", "mtp.eh_proj.weight", "mtp.norm.weight",
                     "mtp.embed.weight", "mtp.head.weight"]
        names.update(f"layers.{i}.{r}" for r in rest)
    return names
