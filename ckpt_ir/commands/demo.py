"""``ckpt-ir demo``: build a tiny random Llama with transformers, convert HF -> Megatron-Core
(TP=2, PP=2) -> HF, and check the round trip bit for bit and the logits in transformers.

Its three checkpoints go to ``DIR/hf``, ``DIR/mcore-tp2-pp2`` and ``DIR/hf-roundtrip``, each
written atomically and replacing only a previous checkpoint (as ``convert --overwrite``); without
DIR they go to a temporary directory that is removed at the end."""

from __future__ import annotations

import os
import sys
import tempfile
import time


def run_demo(workdir: str | None) -> int:
    """The demo in ``workdir`` (kept), or in a temporary directory removed at the end."""
    if workdir is not None:
        return _demo(workdir)
    with tempfile.TemporaryDirectory(prefix="ckpt-ir-demo-") as root:
        return _demo(root, " (temporary, removed at the end)")


def _demo(root: str, note: str = "") -> int:
    from ckpt_ir.frontends import check_replaceable
    from ckpt_ir.io import atomic

    hf, mc, back = (os.path.join(root, n) for n in ("hf", "mcore-tp2-pp2", "hf-roundtrip"))
    for out in (hf, mc, back):  # each replaces only a previous checkpoint: refuse before writing any
        atomic.check_destination(out, True, check_replaceable)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import ckpt_ir.api as ck
    from ckpt_ir.commands.diff import diff

    os.makedirs(root, exist_ok=True)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    say(f"ckpt-ir demo in {root}{note}")
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # random norms too, so a swapped tensor cannot hide
            p.normal_(0, 0.5)
    with atomic.claim(hf, True, check_replaceable) as claim, atomic.output_dir(claim) as tmp:
        model.save_pretrained(tmp)
    say(f"1. built a tiny random Llama (4 layers, GQA 4/2 heads) -> {hf}")

    t0 = time.perf_counter()
    first = ck.convert(hf, mc, ck.Target(to="mcore", tp=2, pp=2), overwrite=True)
    say(f"2. HF -> Megatron-Core TP=2 PP=2 with pipeline `{first.pipeline}` -> {mc}")
    ranks = sorted(os.listdir(os.path.join(mc, "iter_0000001")))
    say(f"   rank directories: {', '.join(ranks)}")

    second = ck.convert(mc, back, ck.Target(to="hf"), overwrite=True)
    say(
        f"3. Megatron-Core -> HF with pipeline `{second.pipeline}` -> {back}  ({time.perf_counter() - t0:.2f}s)"
    )

    report = diff(hf, back)
    say(f"4. tensor-by-tensor diff: {report['equal']} tensors equal, identical={report['identical']}")
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    reloaded = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    with torch.no_grad():
        a, b = model(ids).logits, reloaded(ids).logits
    max_diff = float((a - b).abs().max())
    say(f"5. transformers logits, original vs round trip: max |diff| = {max_diff:.3g}")
    ok = report["identical"] and max_diff == 0.0
    say("demo: OK (bit-exact round trip, identical logits)" if ok else "demo: FAILED")
    if not ok:
        print(report, file=sys.stderr)
    return 0 if ok else 1
