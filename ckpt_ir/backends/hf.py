"""HF backend: size-capped safetensors shards + ``model.safetensors.index.json`` + ``config.json``
(+ tokenizer/generation files copied from the source when it has them)."""

from __future__ import annotations

import fnmatch
import json
import os

from ckpt_ir.backends.plan import OutputFile, Plan
from ckpt_ir.errors import VerifyError, setting
from ckpt_ir.families import Family, by_name
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import Checkpoint
from ckpt_ir.ir.names import split_layer, template_pattern
from ckpt_ir.ir.roles import canonical_order
from ckpt_ir.quant import Fp8Output, without_quant_config

# an MTP layer's embedding and output head: Megatron shares (and keeps in sync) the main ones, and
# families like Hunyuan V3 store no HF copy of them, so a family without HF names drops them
MTP_SHARED = ("mtp.embed.weight", "mtp.head.weight")

DEFAULT_MAX_SHARD = 5 * 1000**3


def hf_tensors(ckpt: Checkpoint, family: Family) -> list[tuple[str, E.Expr]]:
    """(HF name, expression) for every output tensor, in canonical order; packed HF tensors
    (Phi-3 qkv_proj) are concatenations of their canonical parts."""
    if ckpt.layout.tp != 1 or ckpt.layout.fused_qkv or ckpt.layout.fused_gate_up:
        raise VerifyError(
            f"HF output needs an unsharded, unfused HF layout, got {ckpt.layout.describe()}; "
            f"the pipeline must end with gather, unfuse-qkv, unfuse-gate-up"
        )
    names = family.names
    # the naming the source was read in (else the one its config's model type implies)
    naming = family.naming(ckpt.meta.get("hf_naming")) or family.naming_of_config(ckpt.hf_config)
    packed: set[str] = set()
    out: list[tuple[str, str, E.Expr]] = []
    for p in family.packs(naming):
        pat = template_pattern(p.parts[0])
        rule = p.rule(ckpt.spec)
        for name in list(ckpt.tensors):
            m = pat.match(name)
            if m:
                groups = m.groupdict()
                parts = {template: template.format(**groups) for template in p.parts}
                out.append(
                    (
                        parts[p.parts[0]],
                        p.hf.format(**groups),
                        rule.fuse({template: ckpt.tensors[n].expr for template, n in parts.items()}),
                    )
                )
                packed.update(parts.values())
    for st in family.stacked:  # gpt-oss: one HF tensor per layer holds every expert's parts
        pat = template_pattern(st.parts[0].replace("{e}", "0"))
        for name in list(ckpt.tensors):
            m = pat.match(name)
            if m:
                experts = [
                    {p: p.format(e=e, **m.groupdict()) for p in st.parts}
                    for e in range(ckpt.spec.num_experts)
                ]
                exprs = [{p: ckpt.tensors[n].expr for p, n in ex.items()} for ex in experts]
                out.append((name, st.hf.format(**m.groupdict()), st.fuse(exprs)))
                packed.update(n for ex in experts for n in ex.values())
    for r in family.reshaped:  # ERNIE 4.5: the score bias [E] stored as [1, E]
        pat = template_pattern(r.canonical)
        for name, t in ckpt.tensors.items():
            if m := pat.match(name):
                out.append((name, r.hf.format(**m.groupdict()), E.Reshape(t.expr, r.shape(ckpt.spec))))
                packed.add(name)
    for w in family.swapped:  # MiMo's MTP input_proj: eh_proj's halves in the other order
        pat = template_pattern(w.canonical)
        for name, t in ckpt.tensors.items():
            if m := pat.match(name):
                out.append((name, w.hf.format(**m.groupdict()), w.swap(t.expr, name)))
                packed.add(name)
    for j in family.joined:  # DeepSeek-V4's MTP eh_proj, OLMo-Hybrid's q / k / v convs
        pat = template_pattern(j.canonical)
        for name, t in ckpt.tensors.items():
            if m := pat.match(name):
                for part, (a, b) in zip(j.parts, j.cut(t.expr.shape[j.dim], name)):
                    piece = E.simplify(E.Slice(t.expr, j.dim, a, b))
                    out.append((name, part.format(**m.groupdict()), piece))
                packed.add(name)
    for name, t in ckpt.tensors.items():
        if name in packed:
            continue
        hf_name = names.from_canonical(name)
        if hf_name is None and name.endswith(MTP_SHARED) and split_layer(name)[0] is not None:
            continue  # an MTP layer's embedding / head that this family's HF layout does not copy
        if hf_name is None:
            raise VerifyError(f"{name}: the {family.name} family has no HF name for this tensor")
        out.append((name, hf_name, t.expr))
    out.sort(key=lambda item: canonical_order(item[0]))
    out = [(name, hf, family.as_stored(hf, e)) for name, hf, e in out]
    if naming is not None and naming.transposed:  # expert stacks in the naming's orientation
        out = [(name, hf, naming.as_stored(hf, e)) for name, hf, e in out]
    if family.renames(naming):
        return [(family.table_key(hf, ckpt.spec, True, naming), e) for _, hf, e in out]
    return [(hf, e) for _, hf, e in out]


def plan(
    ckpt: Checkpoint,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    hf_config_dir: str | None = None,
    quantize: Fp8Output | None = None,
) -> Plan:
    family = by_name(ckpt.spec.family)
    tensors = hf_tensors(ckpt, family)
    quant_cfg = None
    if quantize is not None:
        tensors, quant_cfg = quantize.tensors(tensors)
    shards: list[list[tuple[str, E.Expr]]] = [[]]
    size = 0
    for name, e in tensors:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, e))
        size += e.nbytes
    files: list[OutputFile] = []
    meta = {"format": "pt"}
    if len(shards) == 1:
        files.append(OutputFile("model.safetensors", "safetensors", tuple(shards[0]), metadata=meta))
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            files.append(OutputFile(fname, "safetensors", tuple(shard), metadata=meta))
            weight_map.update({name: fname for name, _ in shard})
        index = {"metadata": {"total_size": sum(e.nbytes for _, e in tensors)}, "weight_map": weight_map}
        files.append(
            OutputFile("model.safetensors.index.json", "text", text=json.dumps(index, indent=2) + "\n")
        )
    base_cfg = ckpt.hf_config
    from ckpt_ir.io.side_files import side_file_name, side_files

    aux = [f for f in ckpt.aux_files if side_file_name(f) != "config.json"]  # written from the IR below
    dropped = dict(ckpt.dropped)
    if hf_config_dir:  # an explicit --hf-config wins over the source's side files
        from ckpt_ir.frontends.hf import read_config

        base_cfg = read_config(hf_config_dir)
        given = list(side_files(hf_config_dir))
        left = sorted({side_file_name(f) for f in aux} - {side_file_name(f) for f in given})
        if left:
            dropped[", ".join(left)] = (
                f"side files of the source that {setting('hf_config_dir', hf_config_dir)} lacks (the "
                f"output takes that directory's side files instead); copy them there to keep them"
            )
        aux = given
    cfg = family.config_from_spec(ckpt.spec, base_cfg)
    # describes the written tensors only when they are quantized (a VLM's may be its text_config's)
    cfg = without_quant_config(cfg)
    if quant_cfg is not None:
        cfg["quantization_config"] = quant_cfg
    files.append(OutputFile("config.json", "text", text=json.dumps(cfg, indent=2, sort_keys=True) + "\n"))
    for src in aux:
        files.append(OutputFile(side_file_name(src), "copy", source=src))
    from ckpt_ir.io.side_files import TOKENIZER_PATTERNS

    def tokenizer(files) -> bool:
        return any(fnmatch.fnmatch(os.path.basename(f), p) for f in files for p in TOKENIZER_PATTERNS)

    if not tokenizer(aux) and not tokenizer(ckpt.aux_files):
        dropped["tokenizer"] = (
            "the source has no tokenizer files, so neither has the output; pass --hf-config DIR "
            "to copy them from DIR"
        )
    return Plan(tuple(files), dropped)
