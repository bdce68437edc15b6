import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mxq.format_spec import SUPPORTED_BITS, pack_codes, unpack_codes
from mxq.format_spec.packing import PACK_BITS


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(PACK_BITS), rows=st.integers(1, 5), packs=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(bits, rows, packs, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, packs * 32))
    words = pack_codes(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (rows, packs * bits)
    np.testing.assert_array_equal(unpack_codes(words, bits), codes)


@pytest.mark.parametrize("bits", PACK_BITS)
def test_packing_matches_the_bit_string_definition(bits):
    """SPEC §5.1: code j of a pack occupies bits [j·b, j·b+b) of a little-endian bit string."""
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=32)
    bit_string = "".join(format(int(c), f"0{bits}b")[::-1] for c in codes)  # bit k at index k
    words = [int(bit_string[32 * w: 32 * w + 32][::-1], 2) for w in range(bits)]
    np.testing.assert_array_equal(pack_codes(codes[None], bits)[0], np.array(words, dtype=np.uint32))
    np.testing.assert_array_equal(unpack_codes(np.array(words, dtype=np.uint32)[None], bits)[0], codes)


def test_known_words():
    assert pack_codes(np.arange(32)[None] % 16, 4)[0, 0] == 0x76543210
    three = np.zeros(32, dtype=int)
    three[10] = 0b111  # straddles words 0 and 1
    assert list(pack_codes(three[None], 3)[0]) == [0xC0000000, 0x1, 0]
    twelve = np.zeros(32, dtype=int)
    twelve[2], twelve[3] = 0xABC, 0x123  # index 2 straddles words 0 and 1 (bits 24–35), index 3 is bits 36–47
    words = pack_codes(twelve[None], 12)[0]
    assert list(words[:2]) == [0xBC000000, 0x123A] and unpack_codes(words[None], 12).dtype == np.uint16


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_codes(np.zeros((1, 31), dtype=int), 4)
    with pytest.raises(ValueError):
        pack_codes(np.full((1, 32), 16), 4)
    with pytest.raises(ValueError):
        pack_codes(np.zeros((1, 32), dtype=int), 7)
