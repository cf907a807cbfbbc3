"""``ckpt-ir mm-convert``: a drop-in for MindSpeed-MM's ``mm-convert`` (its ``checkpoint/`` package,
``convert_cli.py``) for vision-language models, running ckpt-ir's engine:

    ckpt-ir mm-convert Qwen2_5_VLConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF \\
        --cfg.parallel_config.llm_pp_layers [[1,9,9,9]] --cfg.parallel_config.vit_pp_layers [[32,0,0,0]] \\
        --cfg.parallel_config.tp_size 2
    ckpt-ir mm-convert Qwen2_5_VLConverter mm_to_hf --cfg.save_hf_dir OUT_HF --cfg.mm_dir MM \\
        --cfg.hf_config.hf_dir HF --cfg.parallel_config.llm_pp_layers [1,9,9,9] \\
        --cfg.parallel_config.vit_pp_layers [32,0,0,0] --cfg.parallel_config.tp_size 2

``hf_to_mm`` takes nested layer lists (virtual chunks of pipeline stages), ``mm_to_hf`` flat ones,
as MindSpeed-MM does.  The rank files hold no args: the way back takes the HF directory (its config
and side files) and checks the parallel settings against what the files hold.  Where MindSpeed-MM
is wrong ckpt-ir is right, and says so in docs/cli.md: a first stage with no layers (MindSpeed-MM
shifts every stage's content and loses the last layers, the final norm and the output layer), a
vocabulary the TP size does not divide (MindSpeed-MM drops the last rows; ckpt-ir pads to a
multiple of TP with copies of the last row, as Megatron-LM's tools pad, trimmed on the way back),
GLM-4.1V at TP > 1 (``GlmConverter``: MindSpeed-MM copies every tensor whole to every rank; ckpt-ir
splits what MindSpeed-MM's GLM model splits: the language model's layers, embedding and output
layer, and the tower's MLP, keeping the tower's attention, convolutions and projector whole) and
GLM-4.1V's way back (MindSpeed-MM's ``GlmConverter.mm_to_hf`` writes nothing),
InternVL's vision qkv at TP > 1 on the way back (MindSpeed-MM joins the ranks' [q_r; k_r; v_r]
with a plain concatenation; ckpt-ir unpacks each rank's parts), the canonical layout's
(``--cfg.common_model_config.enable_canonical_hf_struct true``) vision qkv at TP > 1 (MindSpeed-MM
cuts the tower's [q; k; v] as plain rows, but its canonical attention reads rank r's as
[q_r; k_r; v_r], which ckpt-ir writes), and Qwen3-VL-MoE's experts as
transformers saves them (MindSpeed-MM transposes them the wrong way; ckpt-ir reads the hub's
orientation and transformers', and ``mm_to_hf`` writes the one of the weights in
``--cfg.hf_config.hf_dir``).  ``--cfg.trust_remote_code`` is
accepted and never runs anything (ckpt-ir reads config.json as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ckpt_ir.errors import FormatError, UsageError

# MindSpeed-MM's converter classes ckpt-ir implements -> the ckpt-ir family
# (the families a converter class reads: Qwen3VLMegatronConverter takes Qwen3-VL and Qwen3-VL-MoE,
# MindSpeed-MM converters/qwen3vl_megatron.py)
CONVERTERS = {
    "Qwen2_5_VLConverter": ("qwen2_5_vl",),
    "Qwen2VLConverter": ("qwen2_vl",),
    "Qwen3VLMegatronConverter": ("qwen3_vl", "qwen3_vl_moe"),
    "GlmConverter": ("glm4v",),
    "InternVLConverter": ("internvl",),
}
# MindSpeed-MM's converter classes with no Megatron conversion of their own -> why, and what to use
NO_MEGATRON = {
    # converters/qwen3_5.py:303-308: hf_to_mm / mm_to_hf are `pass` (its qwen3_5 recipes train
    # with FSDP2 from DCP checkpoints: hf_to_dcp / dcp_to_hf)
    "Qwen35Converter": (
        "MindSpeed-MM has no Megatron layout of Qwen3.5 (its Qwen35Converter.hf_to_mm and mm_to_hf do "
        "nothing; its qwen3_5 recipes use DCP checkpoints); convert to Megatron-Bridge's layout with "
        "ckpt-ir convert --to mcore"
    ),
}
# the converters with MindSpeed-MM's canonical layout (--cfg.common_model_config.enable_canonical_hf_struct:
# converters/qwen2vl.py:152-160, 205-221; qwen2_5vl.py:194-213)
CANONICAL = ("Qwen2_5_VLConverter", "Qwen2VLConverter")
METHODS = ("hf_to_mm", "mm_to_hf")
# a setting the rank files hold -> its --cfg field, where not parallel_config's
_FIELD_OF = {"enable_canonical_hf_struct": "common_model_config.enable_canonical_hf_struct"}
# --cfg fields: where each method reads them; a field not listed here is refused, not ignored
_FIELDS = {
    "hf_to_mm": {
        "mm_dir",
        "hf_config.hf_dir",
        "parallel_config.llm_pp_layers",
        "parallel_config.vit_pp_layers",
        "parallel_config.tp_size",
        "parallel_config.vit_tp_size",
        "parallel_config.ep_size",
        "common_model_config.enable_canonical_hf_struct",
        "trust_remote_code",
    },
    "mm_to_hf": {
        "save_hf_dir",
        "mm_dir",
        "hf_config.hf_dir",
        "parallel_config.llm_pp_layers",
        "parallel_config.vit_pp_layers",
        "parallel_config.tp_size",
        "parallel_config.vit_tp_size",
        "parallel_config.ep_size",
        "common_model_config.enable_canonical_hf_struct",
        "trust_remote_code",
    },
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "mm-convert",
        help="MindSpeed-MM mm-convert compatible front end (vision-language models)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("converter", help=f"MindSpeed-MM converter class: {', '.join(CONVERTERS)}")
    p.add_argument("method", choices=METHODS)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output directory that holds a checkpoint and nothing else",
    )
    p.add_argument(
        "--cfg",
        nargs=2,
        action="append",
        default=[],
        metavar=("FIELD", "VALUE"),
        help="given as --cfg.<field>[.<field>] VALUE (or =VALUE), as MindSpeed-MM takes them",
    )


def argv(words: list[str]) -> list[str]:
    """The command line with MindSpeed-MM's ``--cfg.a.b VALUE`` / ``--cfg.a.b=VALUE`` spelled as
    ``--cfg a.b VALUE``, which the parser takes."""
    out: list[str] = []
    for word in words:
        if word.startswith("--cfg."):
            key, eq, value = word[len("--cfg.") :].partition("=")
            out += ["--cfg", key, *([value] if eq else [])]
        else:
            out.append(word)
    return out


def parse_cfg(pairs: list[list[str]]) -> dict[str, Any]:
    """(field, value) pairs as {field: value}; a value is JSON (``[[1,9]]``, ``2``), ``true`` /
    ``false`` in any case, or else the text itself."""
    return {key: _value(value) for key, value in pairs}


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _layers(cfg: dict[str, Any], key: str, nested: bool, method: str) -> list:
    """A layer list of the shape ``method`` takes (nested: virtual chunks of stages), checked."""
    value = cfg.get(f"parallel_config.{key}")
    flag = f"--cfg.parallel_config.{key}"
    if value is None:
        raise UsageError(f"mm-convert {method}: {flag} is required")
    shape = "a list of lists ([[1,9,9]]: virtual chunks of stages)" if nested else "a flat list ([1,9,9])"
    ok = isinstance(value, list) and bool(value)
    if ok and nested:
        ok = all(isinstance(c, list) and c and all(isinstance(n, int) and n >= 0 for n in c) for c in value)
        ok = ok and len({len(c) for c in value}) == 1
    elif ok:
        ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)
    if not ok:
        raise UsageError(f"mm-convert {method}: {flag} must be {shape}, got {json.dumps(value)}")
    return value


def _size(cfg: dict[str, Any], key: str, default: int) -> int:
    value = cfg.get(f"parallel_config.{key}", default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UsageError(
            f"mm-convert: --cfg.parallel_config.{key} must be a non-negative integer, got {value!r}"
        )
    return value


def _path(cfg: dict[str, Any], key: str, method: str) -> str:
    value = cfg.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"mm-convert {method}: --cfg.{key} DIR is required")
    return value


def run(args: argparse.Namespace) -> int:
    import ckpt_ir.api as ck
    from ckpt_ir.commands.common import RunOptions, resolve_sources, run_conversion

    families = CONVERTERS.get(args.converter)
    if args.converter in NO_MEGATRON:
        raise UsageError(f"mm-convert {args.converter}: {NO_MEGATRON[args.converter]}")
    if families is None:
        raise UsageError(
            f"mm-convert {args.converter}: not supported by this version of ckpt-ir; supported: "
            f"{', '.join(CONVERTERS)}"
        )
    method = args.method
    cfg = parse_cfg(args.cfg)
    unknown = sorted(set(cfg) - _FIELDS[method])
    if unknown:
        raise UsageError(
            f"mm-convert {method}: --cfg.{unknown[0]} is not supported by this version of ckpt-ir"
        )
    canonical = cfg.get("common_model_config.enable_canonical_hf_struct", False)
    if not isinstance(canonical, bool):
        raise UsageError(
            f"mm-convert: --cfg.common_model_config.enable_canonical_hf_struct must be true or false, got {canonical!r}"
        )
    if canonical and args.converter not in CANONICAL:
        raise UsageError(
            f"mm-convert {args.converter}: --cfg.common_model_config.enable_canonical_hf_struct is not a setting "
            f"of this converter (MindSpeed-MM's canonical layout exists for {', '.join(CANONICAL)})"
        )
    hf_dir = _path(cfg, "hf_config.hf_dir", method)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise UsageError(f"mm-convert: --cfg.hf_config.hf_dir {hf_dir} has no config.json")
    nested = method == "hf_to_mm"
    llm, vit = _layers(cfg, "llm_pp_layers", nested, method), _layers(cfg, "vit_pp_layers", nested, method)
    tp, vit_tp, ep = _size(cfg, "tp_size", 1), _size(cfg, "vit_tp_size", 0), _size(cfg, "ep_size", 1)
    moe = any(f.endswith("_moe") for f in families)  # a converter for a mixture-of-experts family
    if tp < 1 or ep < 1 or (ep != 1 and not moe):
        raise UsageError(
            f"mm-convert: --cfg.parallel_config.tp_size must be at least 1 and ep_size "
            f"{'at least 1' if moe else '1'} ({args.converter}'s models{'' if moe else ' have no experts'})"
        )
    flat_llm = [n for chunk in llm for n in chunk] if nested else llm
    flat_vit = [n for chunk in vit for n in chunk] if nested else vit
    pp = len(llm[0]) if nested else len(llm)
    if len(flat_vit) != len(flat_llm):
        raise UsageError(
            "mm-convert: --cfg.parallel_config.vit_pp_layers and llm_pp_layers must give a count for the same "
            f"pipeline stages (and virtual chunks); got {json.dumps(vit)} and {json.dumps(llm)}"
        )
    if method == "hf_to_mm":
        out = _path(cfg, "mm_dir", method)
        target = ck.Target(
            to="mcore",
            tp=tp,
            pp=pp,
            num_layer_list=tuple(flat_llm),
            mm_keys="mindspeed-canonical" if canonical else "mindspeed",
            vision_tp=vit_tp or tp,
            vision_layer_list=tuple(flat_vit),
            ep=ep,
            # a vocabulary TP does not divide: padded to a multiple of TP (MindSpeed-MM drops rows)
            vocab_divisible_by=1,
            optimizer=False,
        )
        src, load_options = hf_dir, {}
    else:
        out = _path(cfg, "save_hf_dir", method)
        src = _path(cfg, "mm_dir", method)
        target = ck.Target(to="hf", hf_config_dir=hf_dir)
        load_options = {"hf_config": hf_dir}
    opts = RunOptions.from_args(args, dst=out, quiet=False, progress=None)
    found = resolve_sources(
        opts, {"SRC": src, "--cfg.hf_config.hf_dir": hf_dir}, configs=("--cfg.hf_config.hf_dir",)
    )
    src = found["SRC"] or src

    def check_source(ckpt: ck.Checkpoint) -> None:
        if ckpt.spec.family not in families:
            raise UsageError(
                f"mm-convert {args.converter}: {src} holds a {ckpt.spec.family} model, not "
                f"{' or '.join(families)}"
            )
        if method == "hf_to_mm" and ep > 1 and not ckpt.spec.num_experts:
            raise UsageError(
                f"mm-convert: --cfg.parallel_config.ep_size {ep}: {src} holds {ckpt.spec.family}, which has no experts"
            )
        if method == "mm_to_hf":
            # the rank files record no HF naming: write the one of the HF directory's own weights
            # (Qwen3-VL-MoE's experts in the hub's orientation or transformers'), when it has any
            naming = hf_naming(hf_dir, ckpt.spec)
            if naming is not None and "hf_naming" not in ckpt.meta:
                ckpt.meta["hf_naming"] = naming
            lay = ckpt.layout
            held = {
                "llm_pp_layers": list(lay.num_layer_list or (ckpt.spec.num_layers,) * lay.pp),
                "vit_pp_layers": list(lay.vision_layer_list or [ckpt.spec.stack_spec("vision").num_layers]),
                "tp_size": lay.tp,
                "ep_size": lay.ep,
            }
            given = {"llm_pp_layers": flat_llm, "vit_pp_layers": flat_vit, "tp_size": tp, "ep_size": ep}
            # the rank files say which layout they hold: the flag must say the same (MindSpeed-MM
            # reads canonical files only with it, and default ones only without)
            held["enable_canonical_hf_struct"] = lay.mm_keys == "mindspeed-canonical"
            given["enable_canonical_hf_struct"] = canonical
            for key, value in given.items():
                if held[key] != value:
                    raise UsageError(
                        f"mm-convert mm_to_hf: {src} holds {key} {json.dumps(held[key])}, but "
                        f"--cfg.{_FIELD_OF.get(key, 'parallel_config.' + key)} is {json.dumps(value)}; give the "
                        f"settings it was written with"
                    )

    return run_conversion(src, target, opts, load_options, check_source)


def hf_naming(hf_dir: str, spec: Any) -> str | None:
    """The HF naming (``Family.namings``) of the weights in ``hf_dir`` (headers only), or None:
    the family table's own, or a directory holding a config and no weights."""
    from ckpt_ir.families import by_name
    from ckpt_ir.frontends.hf import weight_files
    from ckpt_ir.io.weight_files import file_tensors

    family = by_name(spec.family)
    if not family.namings:
        return None
    try:
        files = weight_files(hf_dir)
    except FormatError:
        return None
    loads = {k: v for f in files for k, v in file_tensors(f).items()}
    return family.naming_of(loads, hf_dir, spec) if loads else None
