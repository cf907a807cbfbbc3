"""PEFT adapter frontend: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``)
lifted as canonical adapter tensors that attach to a base checkpoint of the same family.

What peft's options mean for the merge becomes data of the IR: each target's rank is its A's rows
(``rank_pattern`` is checked against them), its alpha a per-target entry of the spec when
``alpha_pattern`` changes it, ``use_rslora`` a spec flag, DoRA's ``lora_magnitude_vector`` a
``lora_magnitude`` tensor, and a ``modules_to_save`` copy a ``lora_saved`` tensor.  LoRA on
transformers-5 fused MoE experts (``target_parameters``) becomes per-expert LoRA: slices of the
fused factors, exactly the products peft's einsum forms.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import attrs

from ckpt_ir.errors import CoverageError, FormatError, UsageError
from ckpt_ir.families import Family, Packed
from ckpt_ir.io.side_files import TOKENIZER_FILES, side_files
from ckpt_ir.io.weight_files import file_tensors
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import TensorNode
from ckpt_ir.ir.names import layer_name, saved_name, template_pattern
from ckpt_ir.ir.spec import ModelSpec

PREFIX = "base_model.model."
KEY = re.compile(r"^(.*)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.default)?(?:\.weight)?$")
SUFFIX = {
    "lora_A": ".lora_a.weight",
    "lora_B": ".lora_b.weight",
    "lora_magnitude_vector": ".lora_magnitude.weight",
}
# transformers 5 keeps a MoE layer's experts fused in one module, ``model.layers.N.mlp.experts``,
# with gate_up_proj [E, 2F, H] ([gate; up] rows per expert) and down_proj [E, H, F]; peft's
# target_parameters wraps each targeted parameter in a ParamWrapper, nested in the order the
# module declares them, so their LoRA keys differ only by ``.base_layer`` repeats.  A [E*r, in]
# holds expert e's rows at e*r..(e+1)*r; B [out, r*E] its columns at e, e+E, ... (peft's einsum).
FUSED_EXPERTS = re.compile(r"^(?P<stem>model\.layers\.(?P<i>\d+)\.mlp\.experts)(?:\.base_layer)*$")

# adapter_config.json keys that do not change what the adapter adds to the weights
HARMLESS = {
    "auto_mapping",
    "base_model_name_or_path",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",
    # peft sets it per module whatever the config says (dispatch_default in tuners/lora/layer.py):
    # True for a Conv1D (GPT-2's weights stored [in, out]), False for an nn.Linear; A and B are
    # [r, in] / [out, r] either way, which is the canonical [out, in] form they merge in
    "fan_in_fan_out",
    "inference_mode",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_dropout",
    "megatron_config",
    "megatron_core",
    "peft_version",
    "qalora_group_size",
    "revision",
    "task_type",
    "target_modules",
}
SUPPORTED = {
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "modules_to_save",
    "target_parameters",
    "init_lora_weights",
    "bias",
}
# initialisations that change the base weights too (the adapter then applies to a different base)
SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")


def detect(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def read_config(path: str) -> dict:
    """adapter_config.json; any option that changes the adapter's math and is not supported is a
    one-line error naming it."""
    where = f"{path}/adapter_config.json"
    try:
        cfg = json.load(open(os.path.join(path, "adapter_config.json")))
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: cannot read ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise FormatError(
            f"{where}: peft_type={cfg.get('peft_type')!r} is not supported; only LoRA adapters "
            f"(with rsLoRA, DoRA, rank/alpha patterns, modules_to_save) merge"
        )
    init = cfg.get("init_lora_weights", True)
    if init not in SAFE_INITS:
        raise FormatError(
            f"{where}: init_lora_weights={init!r} changes the base weights at initialisation; "
            f"save the adapter with peft's path_initial_model_for_weight_conversion first"
        )
    if cfg.get("bias", "none") != "none":
        raise FormatError(f"{where}: bias={cfg['bias']!r} (trained base biases) is not supported")
    for key, value in cfg.items():
        if value and key not in HARMLESS and key not in SUPPORTED:
            raise FormatError(
                f"{where}: {key}={value!r} is not supported (it changes what the adapter computes)"
            )
    return cfg


def tokenizer(path: str) -> tuple[tuple[str, ...], int | None]:
    """The tokenizer files saved beside the adapter at ``path`` (HF Trainer saves the tokenizer it
    trained with there), and the largest token id they know: ``tokenizer.json``'s vocabulary with
    its added tokens (read by the tokenizers library), the added tokens of a slow tokenizer
    (``tokenizer_config.json``'s ``added_tokens_decoder``, ``added_tokens.json``); None where no
    file says."""
    files = side_files(path, patterns=TOKENIZER_FILES)
    ids: list[int] = []
    fast = os.path.join(path, "tokenizer.json")
    if os.path.isfile(fast):
        from tokenizers import Tokenizer

        try:
            ids.append(Tokenizer.from_file(fast).get_vocab_size(with_added_tokens=True) - 1)
        except Exception as e:  # the library's own error type is not public
            raise FormatError(f"{fast}: cannot read the tokenizer ({e})") from None
    for name, read in (
        ("tokenizer_config.json", lambda d: d.get("added_tokens_decoder") or {}),
        ("added_tokens.json", lambda d: {v: k for k, v in d.items()}),
    ):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            try:
                ids += [int(i) for i in read(json.load(open(f)))]
            except (ValueError, TypeError, AttributeError) as e:
                raise FormatError(f"{f}: cannot read the added tokens ({e})") from None
    return files, max(ids, default=None)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key (in order) that matches the end
    of the module name at a dot boundary, as a regular expression."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lift_adapter(path: str, family: Family, spec: ModelSpec) -> tuple[dict[str, TensorNode], ModelSpec]:
    """Canonical adapter tensors of a PEFT adapter, and ``spec`` with its LoRA settings."""
    if family.peft_refused:
        raise UsageError(
            f"{path}: a PEFT adapter of {family.name} cannot be read ({family.peft_refused}); merge it "
            f"with peft's merge_and_unload, save the merged model and convert that"
        )
    cfg = read_config(path)
    files = [
        os.path.join(path, n)
        for n in ("adapter_model.safetensors", "adapter_model.bin")
        if os.path.isfile(os.path.join(path, n))
    ]
    if not files:
        raise FormatError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    raw = file_tensors(files[0])
    r_default, alpha_default = cfg.get("r"), cfg.get("lora_alpha")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    to_save = cfg.get("modules_to_save") or []
    names = family.names
    out: dict[str, TensorNode] = {}
    alphas: dict[str, float] = {}  # canonical target weight -> its alpha, where not the default
    fused: dict[str, dict[str, E.Expr]] = {}
    unknown = []

    def add(name: str, expr: E.Expr) -> None:
        out[name] = TensorNode.whole(name, expr)

    def check(module: str, rank: int, targets: list[str]) -> None:
        want = pattern_value(rank_pattern, module, r_default)
        if want is not None and rank != want:
            raise FormatError(
                f"{files[0]}: {module} has LoRA rank {rank} but adapter_config.json implies r={want}"
            )
        alpha = pattern_value(alpha_pattern, module, alpha_default)
        if alpha is not None and alpha != alpha_default:
            alphas.update((t, float(alpha)) for t in targets)

    def table(hf: str) -> str:  # an HF name as the family's table names it (Family.table_key)
        hf = family.disk_name(hf)  # peft names the modules transformers builds (Family.memory)
        key = family.table_key(hf, spec, False) if family.renames() else hf
        if names.to_canonical(key) is None:  # a module of another naming (InternVL's remote code)
            for naming in family.namings:
                if names.to_canonical(other := family.table_key(hf, spec, False, naming)) is not None:
                    return other
        return key

    def packs(module: str) -> list[tuple[Packed, str]]:
        """The packed tensors a module may hold a part of: (pack, the module's weight named as the
        pack's ``hf`` names it), the table's and other namings' (InternVL's remote attn.qkv)."""
        own = [(p, table(module + ".weight")) for p in family.packed]
        weight = family.disk_name(module + ".weight")
        return own + [(p, weight) for naming in family.namings for p in naming.packed]

    for key, load in raw.items():
        k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = KEY.match(k)
        if not m:
            k = table(k)
            canon = names.to_canonical(k)
            owner = k.rsplit(".", 1)[0]
            if canon is not None and any(owner == s or owner.endswith("." + s) for s in to_save):
                # modules_to_save: a full copy replacing the base tensor, stored as the base is
                add(saved_name(canon), family.as_stored(k, load))
            else:
                unknown.append(key)
            continue
        module, which = m.group(1), m.group(2)
        if FUSED_EXPERTS.match(module):
            fused.setdefault(module, {})[which] = load
            continue
        suffix = SUFFIX[which]
        canon = names.to_canonical(table(module + ".weight"))
        if canon is not None:
            add(canon[: -len(".weight")] + suffix, load)
            if which == "lora_A":
                check(module, load.shape[0], [canon])
            continue
        # e.g. Phi-3 qkv_proj: A shared by the parts, B (and m) stacked like the weight
        for p, weight in packs(module):
            mm = template_pattern(p.hf).match(weight)
            if not mm:
                continue
            # B and m rows follow the weight's packing (interleaved per head for BLOOM)
            rows = None if which == "lora_A" else p.rule(spec).split(load)
            parts = []
            for part in p.parts:
                parts.append(part.format(**mm.groupdict()))
                add(parts[-1][: -len(".weight")] + suffix, load if rows is None else rows[part])
            if which == "lora_A":
                check(module, load.shape[0], parts)
            break
        else:
            unknown.append(key)
    if unknown:
        raise CoverageError(
            f"{files[0]}: {len(unknown)} adapter tensor(s) not understood and would be lost: "
            f"{', '.join(unknown[:5])}"
        )
    for module, factors in sorted(fused.items()):
        if set(factors) != {"lora_A", "lora_B"}:
            raise FormatError(
                f"{files[0]}: {module}: fused-expert LoRA needs lora_A and lora_B (and no DoRA)"
            )
        param, split = _split_fused_experts(module, factors["lora_A"], factors["lora_B"], spec, files[0])
        for name, expr in split.items():
            add(name, expr)
        check(
            f"{FUSED_EXPERTS.match(module).group('stem')}.{param}",  # type: ignore[union-attr]
            factors["lora_A"].shape[0] // spec.num_experts,
            [n[: -len(".lora_a.weight")] + ".weight" for n in split if n.endswith(".lora_a.weight")],
        )
    if not out:
        raise FormatError(f"{files[0]}: the adapter holds no tensors")
    ranks = sorted({t.shape[0] for n, t in out.items() if n.endswith(".lora_a.weight")})
    r = r_default if r_default is not None else (ranks[0] if len(ranks) == 1 else None)
    if r is None:
        raise FormatError(f"{path}: adapter_config.json gives no r and the LoRA ranks differ ({ranks})")
    return out, attrs.evolve(
        spec,
        lora_rank=r,
        lora_alpha=None if alpha_default is None else float(alpha_default),
        lora_rslora=bool(cfg.get("use_rslora")),
        lora_alphas=tuple(alphas.items()),
    )


def _split_fused_experts(
    module: str, a: E.Expr, b: E.Expr, spec: ModelSpec, where: str
) -> tuple[str, dict[str, E.Expr]]:
    """The fused parameter's name and its per-expert LoRA.  Which parameter: from the shapes,
    which always differ (in = H, out = 2F for gate_up_proj; in = F, out = H for down_proj)."""
    from ckpt_ir.families import by_name

    if by_name(spec.family).stacked:  # gpt-oss: [E, H, 2F], gate / up interleaved, not the layout below
        raise FormatError(
            f"{where}: {module}: LoRA on the {spec.family} family's stacked experts (target_parameters) "
            f"is not supported; merge it with peft's merge_and_unload first"
        )
    n, h, f = spec.num_experts, spec.hidden_size, spec.moe_ffn_hidden_size
    layer = int(FUSED_EXPERTS.match(module).group("i"))  # type: ignore[union-attr]
    (rows, into), out_rows = a.shape, b.shape[0]
    if not n or rows % n or b.shape[1] != rows:
        raise FormatError(
            f"{where}: {module}: LoRA shapes {list(a.shape)}, {list(b.shape)} do not fit {n} experts"
        )
    parts: tuple[tuple[str, int, int], ...]
    if (into, out_rows) == (h, 2 * f):
        param, parts = "gate_up_proj", (("gate", 0, f), ("up", f, 2 * f))
    elif (into, out_rows) == (f, h):
        param, parts = "down_proj", (("down", 0, h),)
    else:
        raise FormatError(
            f"{where}: {module}: LoRA shapes {list(a.shape)}, {list(b.shape)} match neither "
            f"gate_up_proj [{2 * f}, {h}] nor down_proj [{h}, {f}] of the experts"
        )
    r = rows // n
    out: dict[str, E.Expr] = {}
    for e in range(n):
        a_e = E.simplify(E.Slice(a, 0, e * r, (e + 1) * r))
        b_e = E.Reshape(E.Slice(E.Reshape(b, (out_rows, r, n)), 2, e, e + 1), (out_rows, r))
        for part, lo, hi in parts:
            stem = layer_name(layer, f"mlp.experts.{e}.{part}")
            out[stem + ".lora_a.weight"] = a_e
            out[stem + ".lora_b.weight"] = E.simplify(E.Slice(b_e, 0, lo, hi))
    return param, out
