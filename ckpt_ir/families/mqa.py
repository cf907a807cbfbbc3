"""Families of DeepSeek-V4's attention block ``mqa``: DeepSeek-V4 (``deepseek_v4``), a composition
of blocks (ir/blocks.py).  Every layer holds DeepSeek-V4's attention (block ``mqa``: low-rank queries, one shared key/value head, a grouped
low-rank output projection, per-head sinks), a KV ``compressor`` in the layers whose config says
so (heavily compressed attention, HCA; or compressed sparse attention, CSA, whose compressor's
windows overlap and which adds the ``csa_indexer``), the hyper-connection mixers ``hc`` around
attention and MLP over ``hc_mult`` residual streams, and a MoE whose first layers route by a
token-id table (``hash_router``) instead of top-k with a score bias.  The model ends in a
hyper-connection head; multi-token-prediction layers (``mtp.{k}.*``) are the same layer without
compressor, with DeepSeek's enorm / hnorm, ``e_proj`` / ``h_proj`` (the two column halves of the
canonical ``eh_proj``), a head norm and a hyper-connection head of their own.

Two HF namings, both read, an HF output written in the one its source used (recorded through a
Megatron checkpoint too), the release's where nothing says:

* the release's (DeepSeek's checkpoints; the only one MindSpeed-LLM's deepseek4 converter reads):
  ``embed.weight``, ``layers.{i}.attn.*``, ``layers.{i}.ffn.*``, ``hc_head_*``, ``norm.weight``,
  ``head.weight``, ``mtp.{k}.*``: this table;
* transformers' save (``transformers/conversion_mapping.py``'s mapping applied backwards, which
  only partly restores the release names): ``model.`` before every body name, the attention's
  ``kv_norm`` as ``norm``, ``model.embed_tokens.weight``, ``model.hc_head.hc_*``, ``head.weight``
  unprefixed; no MTP layers (transformers ignores ``mtp.*``).

Layer kinds from the config: transformers' ``layer_types`` with ``compress_rates`` and
``mlp_layer_types`` (what transformers saves), else the release's ``compress_ratios`` (one entry
per layer, then the MTP layers', possibly two reserved zeros: 0 none, the CSA rate CSA, any other
ratio HCA) and ``num_hash_layers``; transformers' defaults without either.  Shapes: transformers
5.25 ``models/deepseek_v4/modeling_deepseek_v4.py``; see docs/reference/composed-blocks.md §5.
Megatron: MindSpeed-LLM's ``convert_ckpt_deepseek4.py`` layout (megatron/keys.py).
"""

from __future__ import annotations

import re
from typing import Any

from ckpt_ir.errors import FormatError
from ckpt_ir.families import ConfigKey, Family, HfNaming, Joined, Tested, register

L = "layers.{i}."
C = "layers.{i}."

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
# transformers' defaults (configuration_deepseek_v4.py): compress rates, hash-routed layers
DEFAULT_RATES = {CSA: 4, HCA: 128}
DEFAULT_HASH_LAYERS = 3


def _compressor(hf: str, canon: str) -> tuple[tuple[str, str], ...]:
    return tuple((L + hf + t, C + canon + t) for t in ("wkv.weight", "wgate.weight", "ape", "norm.weight"))


def _hc(hf: str, canon: str, layer: str = L, at: str = C) -> tuple[tuple[str, str], ...]:
    return tuple((f"{layer}{hf}{t}", f"{at}{canon}.{t}") for t in ("fn", "base", "scale"))


# a decoder layer, release names
LAYER = (
    (L + "attn_norm.weight", C + "attn_norm.weight"),
    (L + "ffn_norm.weight", C + "mlp_norm.weight"),
    *_hc("hc_attn_", "hc_attn"),
    *_hc("hc_ffn_", "hc_ffn"),
    (L + "attn.wq_a.weight", C + "mqa.wq_a.weight"),
    (L + "attn.q_norm.weight", C + "mqa.q_norm.weight"),
    (L + "attn.wq_b.weight", C + "mqa.wq_b.weight"),
    (L + "attn.wkv.weight", C + "mqa.wkv.weight"),
    (L + "attn.kv_norm.weight", C + "mqa.kv_norm.weight"),
    (L + "attn.wo_a.weight", C + "mqa.wo_a.weight"),
    (L + "attn.wo_b.weight", C + "mqa.wo_b.weight"),
    (L + "attn.attn_sink", C + "mqa.sinks"),
    *_compressor("attn.compressor.", "mqa.compressor."),
    (L + "attn.indexer.wq_b.weight", C + "mqa.indexer.wq_b.weight"),
    (L + "attn.indexer.weights_proj.weight", C + "mqa.indexer.weights_proj.weight"),
    *_compressor("attn.indexer.compressor.", "mqa.indexer.compressor."),
    (L + "ffn.gate.weight", C + "mlp.router.weight"),
    (L + "ffn.gate.bias", C + "mlp.router.bias"),
    (L + "ffn.gate.tid2eid", C + "mlp.router.tid2eid"),
    (L + "ffn.experts.{e}.w1.weight", C + "mlp.experts.{e}.gate.weight"),
    (L + "ffn.experts.{e}.w3.weight", C + "mlp.experts.{e}.up.weight"),
    (L + "ffn.experts.{e}.w2.weight", C + "mlp.experts.{e}.down.weight"),
    (L + "ffn.shared_experts.w1.weight", C + "mlp.shared.gate.weight"),
    (L + "ffn.shared_experts.w3.weight", C + "mlp.shared.up.weight"),
    (L + "ffn.shared_experts.w2.weight", C + "mlp.shared.down.weight"),
)
TOP = (
    ("embed.weight", "embed.weight"),
    ("norm.weight", "final_norm.weight"),
    ("head.weight", "lm_head.weight"),
    *(("hc_head_" + t, "hc_head." + t) for t in ("fn", "base", "scale")),
)
# a multi-token-prediction layer's own tensors (mtp.{k}.* renamed to layers.{num_layers + k}.*);
# its e_proj and h_proj are the canonical eh_proj (Family.joined)
MTP = (
    (L + "enorm.weight", C + "mtp.enorm.weight"),
    (L + "hnorm.weight", C + "mtp.hnorm.weight"),
    (L + "norm.weight", C + "mtp.norm.weight"),
    *_hc("hc_head_", "mtp.hc_head"),
    (L + "emb.tok_emb.weight", C + "mtp.embed.weight"),
    (L + "head.weight", C + "mtp.head.weight"),
)
EH_PROJ = Joined(C + "mtp.eh_proj.weight", (L + "e_proj.weight", L + "h_proj.weight"))

# transformers' save: (release name, transformers' name); the MTP layers keep the release names
TRANSFORMERS_NAMING = HfNaming(
    "transformers",
    (
        ("embed.weight", "model.embed_tokens.weight"),
        ("norm.weight", "model.norm.weight"),
        *((f"hc_head_{t}", f"model.hc_head.hc_{t}") for t in ("fn", "base", "scale")),
        *((hf, "model." + hf.replace(".attn.kv_norm.", ".attn.norm.")) for hf, _ in LAYER),
    ),
)

_MTP_KEY = re.compile(r"^mtp\.(\d+)\.(.+)$")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def _mtp_keys(key: str, num_layers: int, to_hf: bool) -> str:
    """The release's mtp.{k}.X <-> layers.{num_layers + k}.X (the table's numbering)."""
    if not to_hf:
        m = _MTP_KEY.match(key)
        return f"layers.{num_layers + int(m.group(1))}.{m.group(2)}" if m else key
    m = _LAYER_KEY.match(key)
    if not m or int(m.group(1)) < num_layers:
        return key
    return f"mtp.{int(m.group(1)) - num_layers}.{m.group(2)}"


def _rates(cfg: dict[str, Any]) -> dict[str, int]:
    """Compress rate per attention kind: transformers' compress_rates, or the older scalar keys."""
    rates = dict(DEFAULT_RATES, **(cfg.get("compress_rates") or {}))
    for kind, key in ((CSA, "compress_rate_csa"), (HCA, "compress_rate_hca")):
        if cfg.get(key) is not None:
            rates[kind] = cfg[key]
    return rates


def attention_kinds(cfg: dict[str, Any]) -> list[str]:
    """Each main layer's attention kind (SLIDING, CSA, HCA): ``layer_types``, else the release's
    ``compress_ratios`` (0: sliding; the CSA rate: CSA; any other ratio: HCA), else transformers'
    default schedule (two HCA layers, then CSA and HCA alternating)."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None and cfg.get("compress_ratios") is not None:
        ratios = list(cfg["compress_ratios"])
        if len(ratios) < n:
            raise FormatError(
                f"config.json: compress_ratios has {len(ratios)} entries for {n} layers; give one per layer"
            )
        csa = _rates(cfg)[CSA]
        types = [SLIDING if r == 0 else CSA if r == csa else HCA for r in ratios[:n]]
    if types is None:
        types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    unknown = sorted({t for t in types if t not in (SLIDING, CSA, HCA)})
    if unknown or len(types) != n:
        raise FormatError(
            f"config.json: layer_types must list {n} of {SLIDING}, {CSA}, {HCA}; got {len(types)} "
            f"with {unknown or 'no'} unknown"
        )
    return list(types)


def _ratios(cfg: dict[str, Any]) -> tuple[int, ...]:
    """Each main layer's compress ratio: the release's own numbers, else the rate of its kind."""
    kinds = attention_kinds(cfg)
    if cfg.get("layer_types") is None and cfg.get("compress_ratios") is not None:
        return tuple(cfg["compress_ratios"][: len(kinds)])
    rates = _rates(cfg)
    return tuple(0 if k == SLIDING else rates[k] for k in kinds)


def hash_layers(cfg: dict[str, Any]) -> list[bool]:
    """Whether each main layer's MoE routes by token id: ``mlp_layer_types`` (hash_moe / moe),
    else the first ``num_hash_layers`` layers (transformers' default 3)."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("mlp_layer_types")
    if types is None:
        k = cfg.get("num_hash_layers")
        return [i < (DEFAULT_HASH_LAYERS if k is None else k) for i in range(n)]
    if len(types) != n or any(t not in ("hash_moe", "moe") for t in types):
        raise FormatError(f"config.json: mlp_layer_types must list {n} of hash_moe, moe; got {types}")
    return [t == "hash_moe" for t in types]


def _mindspeed_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """What MindSpeed-LLM's deepseek4 converter reads from a checkpoint's args to convert it back
    (its own names): the leading hash-routed layers, each layer's compress ratio."""
    hashed = hash_layers(cfg)
    leading = next((i for i, h in enumerate(hashed) if not h), len(hashed))
    ratios = cfg.get("compress_ratios")
    return {"n_hash_layers": leading, "compress_ratios": list(_ratios(cfg) if ratios is None else ratios)}


def _layer_blocks(cfg: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    out = []
    for kind, hashed in zip(attention_kinds(cfg), hash_layers(cfg)):
        compressor = (
            () if kind == SLIDING else ("compressor", "csa_indexer") if kind == CSA else ("compressor",)
        )
        out.append(("mqa", *compressor, "hc", "moe", *(("hash_router",) if hashed else ())))
    return tuple(out)


register(
    Family(
        name="deepseek_v4",
        model_types=("deepseek_v4",),
        architecture="DeepseekV4ForCausalLM",
        tensors=TOP + LAYER + MTP,
        joined=(EH_PROJ,),
        namings=(TRANSFORMERS_NAMING,),
        hf_rename=_mtp_keys,
        config=(
            ConfigKey("num_layers", "num_hidden_layers"),
            ConfigKey("hidden_size", "hidden_size"),
            ConfigKey("vocab_size", "vocab_size"),
            ConfigKey("num_heads", "num_attention_heads"),
            ConfigKey("head_dim", "head_dim", 512),
            ConfigKey("norm_eps", "rms_norm_eps", 1e-6),
            ConfigKey("tied_embeddings", "tie_word_embeddings", False),
            ConfigKey("q_lora_rank", "q_lora_rank", 1024),
            ConfigKey("mqa_o_groups", "o_groups", 8),
            ConfigKey("mqa_o_rank", "o_lora_rank", 1024),
            ConfigKey("hc_mult", "hc_mult", 4),
            ConfigKey("index_heads", "index_n_heads", 64),
            ConfigKey("index_head_dim", "index_head_dim", 128),
            ConfigKey("num_experts", "n_routed_experts", 256),
            ConfigKey("moe_topk", "num_experts_per_tok", 6),
            ConfigKey("moe_ffn_hidden_size", "moe_intermediate_size", 2048),
            # DeepSeek's reference: n_shared_experts x moe_intermediate_size (transformers builds
            # one expert's width whatever the count; the released models have one)
            ConfigKey(
                "shared_ffn_hidden_size",
                None,
                lambda cfg: (cfg.get("n_shared_experts") or 0) * cfg.get("moe_intermediate_size", 2048),
            ),
            ConfigKey("ffn_hidden_size", None, lambda cfg: cfg.get("moe_intermediate_size", 2048)),
            ConfigKey("layer_blocks", None, _layer_blocks),
            ConfigKey("compressor_ratios", None, _ratios),
            # read-only: transformers saves no MTP weights, so the frontend counts the layers present
            ConfigKey("mtp_layers", None, lambda cfg: cfg.get("num_nextn_predict_layers") or 0),
        ),
        # MTP layers: attention without compressor, hyper-connections, a top-k MoE (the release,
        # MindSpeed-LLM's deepseek4); the score bias on top-k routers.  mqa's one key = value head
        # is no grouped-query attention: num_kv_heads stays 0
        constants=(
            ("mtp_blocks", ("mqa", "hc", "moe")),
            ("router_bias", True),
        ),
        mindspeed_names=("deepseek4", "deepseek4_base"),
        megatron_args=_mindspeed_args,
        tested=Tested(
            round_trip=(
                "--tp 2 --ep 2",
                "--tp 2 --pp 2 --etp 1 --num-layer-list 1,2",
                "--ep 2 --moe-grouped-gemm",
                "--pp 2 --ep 2 --vpp-layers 1 --noop-layers 3",
            ),
            mcore_missing="no: megatron-core 0.16 has no DeepSeek-V4 modules (hyper-connections, KV compressors)",
            mindspeed=(
                ("deepseek4-mtp-tp1ep2-grouped", "identical"),
                ("deepseek4-mtp-tp2ep2", "identical (MindSpeed adds copies outside Megatron's expert grid)"),
                (
                    "deepseek4-mtp-tp2ep2-grouped",
                    "identical (MindSpeed adds copies outside Megatron's expert grid)",
                ),
                ("deepseek4-mtp-tp2pp2-layers", "identical"),
            ),
        ),
    )
)
