"""The lazy expression algebra: evaluation matches torch, and the simplifier keeps values while
reading fewer bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_ir.errors import VerifyError
from ckpt_ir.ir import expr as E
from ckpt_ir.ir.checkpoint import gather_exprs, shard_expr
from ckpt_ir.ir.names import COLUMN, COLUMN_BLOCKS2, ROW


@pytest.fixture
def stored(tmp_path):
    """A file holding two tensors behind a 16-byte preamble; returns (loads, tensors)."""
    a = torch.randn(12, 6)
    b = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\0" * 16 + a.numpy().tobytes() + b.numpy().tobytes())
    la = E.Load(str(path), "a", (12, 6), "F32", 16)
    lb = E.Load(str(path), "b", (4, 6), "F32", 16 + a.numel() * 4)
    return (la, lb), (a, b)


def ev(e):
    with E.Reader() as r:
        return E.evaluate(e, r)


def test_each_op_matches_torch(stored):
    (la, lb), (a, b) = stored
    assert torch.equal(ev(la), a)
    assert torch.equal(ev(E.Slice(la, 1, 2, 5)), a[:, 2:5])
    assert torch.equal(ev(E.Concat((la, lb), 0)), torch.cat([a, b]))
    assert torch.equal(ev(E.Concat((E.Slice(la, 0, 0, 4), lb), 1)), torch.cat([a[:4], b], 1))
    assert torch.equal(ev(E.Reshape(la, (6, 12))), a.reshape(6, 12))
    assert torch.equal(ev(E.Transpose(la, 0, 1)), a.t())
    assert torch.equal(ev(E.Cast(la, "BF16")), a.to(torch.bfloat16))
    padded = ev(E.PadRows(lb, 7))
    assert torch.equal(padded[:4], b) and all(torch.equal(padded[i], b[-1]) for i in range(4, 7))
    assert torch.equal(ev(E.Add(E.Slice(la, 0, 0, 4), lb)), a[:4] + b)
    assert torch.allclose(ev(E.Matmul(lb, E.Transpose(lb, 0, 1))), b @ b.t())
    assert torch.equal(ev(E.Scale(lb, 0.5)), b * 0.5)


def test_shapes_known_without_reading(stored):
    (la, lb), _ = stored
    e = E.Cast(E.Concat((E.Slice(la, 0, 2, 6), lb), 0), "BF16")
    assert e.shape == (8, 6) and e.dtype == "BF16" and e.nbytes == 8 * 6 * 2


def test_invalid_expressions_are_refused(stored):
    (la, lb), _ = stored
    with pytest.raises(VerifyError):
        E.Slice(la, 0, 5, 20)
    with pytest.raises(VerifyError):
        E.Concat((la, E.Slice(lb, 1, 0, 3)), 0)
    with pytest.raises(VerifyError):
        E.Reshape(la, (5, 5))
    with pytest.raises(VerifyError):
        E.Concat((la, E.Cast(lb, "BF16")), 0)


def test_slice_of_load_becomes_smaller_read(stored):
    (la, _), (a, _) = stored
    e = E.Slice(la, 0, 3, 5)
    s = E.simplify(e)
    assert isinstance(s, E.Load) and s.rows == (3, 5)
    assert E.bytes_read(s) == 2 * 6 * 4 < E.bytes_read(e)
    assert torch.equal(ev(s), a[3:5])


def test_slice_of_concat_reads_only_the_needed_part(stored):
    (la, lb), (a, b) = stored
    e = E.Slice(E.Concat((la, lb), 0), 0, 10, 14)
    s = E.simplify(e)
    assert E.bytes_read(s) == 4 * 6 * 4 < E.bytes_read(e)
    assert torch.equal(ev(s), torch.cat([a, b])[10:14])


def test_adjacent_row_ranges_merge_into_one_load(stored):
    (la, _), _ = stored
    s = E.simplify(E.Concat((E.Slice(la, 0, 0, 5), E.Slice(la, 0, 5, 12)), 0))
    assert s == la


def test_noop_cast_disappears_and_slice_moves_below_cast(stored):
    (la, _), (a, _) = stored
    assert E.simplify(E.Cast(la, "F32")) == la
    s = E.simplify(E.Slice(E.Cast(la, "BF16"), 0, 1, 2))
    assert isinstance(s, E.Cast) and isinstance(s.x, E.Load) and s.x.rows == (1, 2)
    assert torch.equal(ev(s), a[1:2].to(torch.bfloat16))


def test_a_stored_transpose_split_and_fused_again_is_the_original_load(stored):
    """A weight stored [in, out] (GPT-2's Conv1D), read transposed, split into parts along its
    rows and written back fused and transposed, is the load itself: an HF -> HF copy of it reads
    each byte once, as a plain copy."""
    (la, _), (a, _) = stored
    parts = [E.Slice(E.Transpose(la, 0, 1), 0, lo, lo + 2) for lo in (0, 2, 4)]
    fused = E.Transpose(E.Concat(tuple(parts), 0), 0, 1)
    assert E.simplify(fused) == la
    assert E.simplify(E.Transpose(E.Transpose(la, 0, 1), 1, 0)) == la
    assert torch.equal(ev(E.simplify(parts[1])), a.t()[2:4])


def test_swapped_column_ranges_of_one_load_read_it_once(stored):
    """Per-head pieces of a weight stored [in, out] (GPT-2's c_attn into Megatron's per-group
    linear_qkv): the load is read once for all of them and each piece swapped straight into the
    output."""
    (la, _), (a, _) = stored
    order = (2, 0, 4)  # not adjacent: no simplification joins them
    e = E.Concat(tuple(E.Transpose(E.Slice(la, 1, lo, lo + 2), 0, 1) for lo in order), 0)
    with E.Reader() as r:
        reads = []
        read_into = r.read_into
        r.read_into = lambda *args: (reads.append(args[1]), read_into(*args))  # type: ignore[method-assign]
        got = E.evaluate(e, r)
    assert torch.equal(got, torch.cat([a.t()[lo : lo + 2] for lo in order])) and len(reads) == 1


def test_unpadding_a_padded_tensor_is_the_original_load(stored):
    (_, lb), _ = stored
    assert E.simplify(E.Slice(E.PadRows(lb, 8), 0, 0, 4)) == lb


@pytest.mark.parametrize("rule", [COLUMN, ROW, COLUMN_BLOCKS2])
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_gather_of_shard_is_identity(stored, rule, tp):
    (la, _), (a, _) = stored
    shards = shard_expr(la, rule, tp)
    assert E.simplify(gather_exprs(tuple(shards), rule)) == la
    assert torch.equal(ev(gather_exprs(tuple(shards), rule)), a)


def test_gate_up_shard_takes_part_of_each_half(stored):
    (la, _), (a, _) = stored  # 12 rows: gate = 0..5, up = 6..11
    r1 = ev(shard_expr(la, COLUMN_BLOCKS2, 2)[1])
    assert torch.equal(r1, torch.cat([a[3:6], a[9:12]]))


def test_reshard_reads_each_byte_once(stored):
    """TP=2 -> TP=4 through gather: every new shard reads only its own rows."""
    (la, _), _ = stored
    tp2 = shard_expr(la, COLUMN, 2)
    for s in shard_expr(gather_exprs(tuple(tp2), COLUMN), COLUMN, 4):
        assert E.bytes_read(s) == la.nbytes // 4


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_slice_chains_keep_values(stored, data):
    (la, lb), (a, b) = stored
    e, ref = E.Concat((la, lb), 0), torch.cat([a, b])
    for _ in range(data.draw(st.integers(1, 4))):
        dim = data.draw(st.integers(0, 1))
        n = ref.shape[dim]
        lo = data.draw(st.integers(0, n - 1))
        hi = data.draw(st.integers(lo + 1, n))
        e, ref = E.Slice(e, dim, lo, hi), ref.narrow(dim, lo, hi - lo)
        if data.draw(st.booleans()):
            e, ref = E.Cast(e, "BF16"), ref.to(torch.bfloat16)
    s = E.simplify(e)
    assert E.bytes_read(s) <= E.bytes_read(e)
    assert torch.equal(ev(s), ref)
