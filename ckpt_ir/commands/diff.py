"""``ckpt-ir diff``: compare two checkpoints of any formats at the canonical level.

Both sides are brought to the same canonical form (gathered, unfused) by the standard pipeline,
lazily, and then compared tensor by tensor, one pair in memory at a time.  The vocabulary padding
rows of a Megatron checkpoint are part of it: two Megatron sides are compared with them (a
different padded size is a shape difference); against an HF side, which has none, only the
vocabulary's rows are."""

from __future__ import annotations

from typing import Any

COULD_NOT_COMPARE = 2  # the exit code when a side cannot be read (0: identical, 1: different)


def diff(
    a: str,
    b: str,
    *,
    atol: float = 0.0,
    hf_config: str | None = None,
    iteration: int | str | None = None,
) -> dict[str, Any]:
    """``hf_config``: a directory whose config.json describes a Megatron side whose args do not
    (plain Megatron-LM args), as ``convert --hf-config``; ``iteration``: the iteration read from
    each Megatron side that is a save directory (default its latest).  Each side may be a Hugging
    Face Hub id."""
    import torch

    import ckpt_ir.api as ck
    from ckpt_ir.frontends import MEGATRON_FORMATS, detect
    from ckpt_ir.io.hub import resolve
    from ckpt_ir.ir import expr as E

    cfg = resolve(hf_config, weights=False) if hf_config else None  # a directory: errors name it

    def lift(path: str):
        path = resolve(path)
        megatron = detect(path, iteration) in MEGATRON_FORMATS
        c = ck.load(path, hf_config=cfg if megatron else None, iteration=iteration if megatron else None)
        if c.meta.get("family_from_args"):
            import sys

            print(f"ckpt-ir: {path}: {c.meta['family_from_args']}", file=sys.stderr)
        return c

    def canonical(c, keep_padding: bool):
        steps = ck.derive_pipeline(c, ck.Target(to="hf"))
        return ck.run(c, [p for p in steps if not (keep_padding and p.name == "unpad-vocab")])

    la, lb = lift(a), lift(b)
    both_megatron = la.layout.format == lb.layout.format == "mcore"
    ca, cb = canonical(la, both_megatron), canonical(lb, both_megatron)
    names_a, names_b = set(ca.tensors), set(cb.tensors)
    report: dict[str, Any] = {
        "a": a,
        "b": b,
        "only_in_a": sorted(names_a - names_b),
        "only_in_b": sorted(names_b - names_a),
        "mismatched": [],
        "different": [],
        "equal": 0,
    }
    spec_a, spec_b = ca.spec.summary(), cb.spec.summary()
    report["spec_differences"] = {
        k: [spec_a[k], spec_b[k]] for k in spec_a if spec_a[k] != spec_b.get(k) and k != "dtype"
    }
    with E.Reader() as reader:
        for name in ca.tensors:
            if name not in cb.tensors:
                continue
            ta, tb = ca.tensors[name], cb.tensors[name]
            if ta.shape != tb.shape or ta.dtype != tb.dtype:
                report["mismatched"].append(
                    {"name": name, "a": [list(ta.shape), ta.dtype], "b": [list(tb.shape), tb.dtype]}
                )
                continue
            va, vb = E.evaluate(ta.expr, reader), E.evaluate(tb.expr, reader)
            if torch.equal(va, vb):
                report["equal"] += 1
                continue
            d = (va.double() - vb.double()).abs()
            max_abs = float(d.max()) if d.numel() else 0.0
            if max_abs <= atol:
                report["equal"] += 1
                continue
            idx = int(d.argmax())
            report["different"].append(
                {
                    "name": name,
                    "max_abs_diff": max_abs,
                    "elements_differing": int((d > atol).sum()),
                    "first_max_at": list(_unravel(idx, ta.shape)),
                }
            )
    report["identical"] = not (
        report["only_in_a"]
        or report["only_in_b"]
        or report["mismatched"]
        or report["different"]
        or report["spec_differences"]
    )
    return report


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(i % n)
        i //= n
    return tuple(reversed(out))


def format_report(r: dict[str, Any]) -> str:
    lines = []
    for n in r["only_in_a"]:
        lines.append(f"only in A: {n}")
    for n in r["only_in_b"]:
        lines.append(f"only in B: {n}")
    for m in r["mismatched"]:
        lines.append(f"shape/dtype: {m['name']}: A {m['a'][0]} {m['a'][1]} vs B {m['b'][0]} {m['b'][1]}")
    for d in r["different"]:
        lines.append(
            f"values: {d['name']}: max |A-B| = {d['max_abs_diff']:.6g} at {d['first_max_at']}, "
            f"{d['elements_differing']} element(s) differ"
        )
    for k, (va, vb) in r["spec_differences"].items():
        lines.append(f"spec: {k}: A {va} vs B {vb}")
    total = r["equal"] + len(r["different"]) + len(r["mismatched"])
    verdict = "identical" if r["identical"] else "DIFFERENT"
    lines.append(
        f"{verdict}: {r['equal']}/{total} common tensors equal, {len(r['only_in_a'])} only in A, "
        f"{len(r['only_in_b'])} only in B"
    )
    return "\n".join(lines)
