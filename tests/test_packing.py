import pytest
import torch
from hypothesis import given, settings, strategies as st

from bluelm_quant.packing import (
    PackingError, convert_qzeros, pack, pack_multiple, pack_qweight, pack_qzeros,
    unpack, unpack_qweight, unpack_qzeros,
)

BITS = st.sampled_from([2, 3, 4, 8])


@settings(max_examples=60, deadline=None)
@given(bits=BITS, runs=st.integers(1, 4), cols=st.integers(1, 9), dim=st.sampled_from([0, 1]), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, runs, cols, dim, seed):
    g = torch.Generator().manual_seed(seed)
    length = runs * pack_multiple(bits)
    shape = (length, cols) if dim == 0 else (cols, length)
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    packed = pack(codes, bits, dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == length * bits // 32
    assert torch.equal(unpack(packed, bits, dim), codes)


def test_4bit_layout_matches_gptq_nibble_order():
    # code of row r, column c is nibble r % 8 of qweight[r // 8][c], least significant first
    codes = torch.arange(16, dtype=torch.int32).remainder(16).reshape(16, 1)
    q = pack_qweight(codes, 4)
    assert q.shape == (2, 1)
    assert q[0, 0].item() == 0x76543210
    assert (q[1, 0].item() & 0xFFFFFFFF) == 0xFEDCBA98


def test_3bit_layout_is_a_contiguous_bitstream():
    codes = torch.randint(0, 8, (32, 3), dtype=torch.int32)
    q = pack_qweight(codes, 3).to(torch.int64) & 0xFFFFFFFF
    for c in range(3):
        bits = int(q[0, c]) | (int(q[1, c]) << 32) | (int(q[2, c]) << 64)
        for i in range(32):
            assert (bits >> (3 * i)) & 7 == int(codes[i, c])


@settings(max_examples=40, deadline=None)
@given(bits=BITS, groups=st.integers(1, 5), runs=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_zero_formats_round_trip(bits, groups, runs, seed):
    g = torch.Generator().manual_seed(seed)
    n = runs * pack_multiple(bits)
    zeros = torch.randint(1, 2**bits, (groups, n), generator=g, dtype=torch.int32)
    v1 = pack_qzeros(zeros, bits, "gptq")
    v2 = pack_qzeros(zeros, bits, "gptq_v2")
    assert torch.equal(unpack_qzeros(v1, bits, "gptq"), zeros)
    assert torch.equal(unpack_qzeros(v2, bits, "gptq_v2"), zeros)
    assert torch.equal(convert_qzeros(v1, bits, "gptq", "gptq_v2"), v2)
    assert torch.equal(convert_qzeros(v2, bits, "gptq_v2", "gptq"), v1)


def test_v1_stores_zero_minus_one():
    zeros = torch.full((1, 8), 8, dtype=torch.int32)  # symmetric 4-bit: stored 7 everywhere
    assert pack_qzeros(zeros, 4, "gptq")[0, 0].item() == 0x77777777


def test_unrepresentable_zeros_raise():
    with pytest.raises(PackingError, match="cannot be stored in the v1"):
        pack_qzeros(torch.zeros(1, 8, dtype=torch.int32), 4, "gptq")
    v1_sixteen = pack(torch.full((1, 8), 15, dtype=torch.int32), 4, dim=1)  # means zero 16
    with pytest.raises(PackingError, match="cannot store"):
        convert_qzeros(v1_sixteen, 4, "gptq", "gptq_v2")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(PackingError, match="multiple of 8"):
        pack_qweight(torch.zeros(12, 4, dtype=torch.int32), 4)
    with pytest.raises(PackingError, match=r"\[0, 15\]"):
        pack_qweight(torch.full((8, 1), 16, dtype=torch.int32), 4)
    with pytest.raises(PackingError, match="not supported"):
        pack_qweight(torch.zeros(8, 1, dtype=torch.int32), 5)
    with pytest.raises(PackingError, match="int32"):
        unpack_qweight(torch.zeros(1, 1, dtype=torch.int64), 4)
