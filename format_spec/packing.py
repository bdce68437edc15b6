"""Bit packing of b-bit codes into little-endian uint32 words (SPEC.md §5).

Codes run along the input dimension in packs of 32. The 32 codes of a pack form a
32·b-bit little-endian bit stream (code j occupies bits [j·b, j·b + b)) that fills exactly
b uint32 words, so every pack (and therefore every quantization group) starts on a word
boundary for every bit width. For b = 2, 4, 8 no code straddles two words; for b = 3, 5, 6
some do, and their low bits sit in word w, their high bits at the bottom of word w + 1.
A run of codes may also end with a partial pack of whole words (`word_unit`; vq rows, SPEC.md §12.1): the
same bit stream, cut after the last word.
"""
import math

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)  # affine and lut code widths
PACK_BITS = SUPPORTED_BITS + (12,)  # what packing handles: those, and 12-bit vq indices (SPEC.md §12.1)
CODES_PER_PACK = 32


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {PACK_BITS}")


def word_unit(bits: int) -> int:
    """The fewest codes of `bits` bits that fill whole uint32 words: 32 / gcd(bits, 32) (8 at 4 and 12 bits,
    16 at 6, 4 at 8, 32 at 3 and 5)."""
    return CODES_PER_PACK // math.gcd(bits, CODES_PER_PACK)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) integer codes in [0, 2**bits) with n a multiple of word_unit(bits) → (..., n·bits / 32) uint32:
    whole packs of 32, then (when n % 32 ≠ 0) the words of a partial last pack."""
    _check_bits(bits)
    codes = np.asarray(codes)
    n = codes.shape[-1]
    if n % word_unit(bits):
        raise ValueError(f"code count {n} does not fill whole words at {bits} bits")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    if n % CODES_PER_PACK:  # pad to whole packs, pack, and cut the stream after its last word
        full = np.zeros(codes.shape[:-1] + (-(-n // CODES_PER_PACK) * CODES_PER_PACK,), codes.dtype)
        full[..., :n] = codes
        return np.ascontiguousarray(pack_codes(full, bits)[..., :n * bits // 32])
    packs = codes.reshape(-1, n // CODES_PER_PACK, CODES_PER_PACK).astype(np.uint64)  # (rows, packs, 32)
    words = np.zeros(packs.shape[:2] + (bits,), dtype=np.uint64)  # (rows, packs, b)
    for j in range(CODES_PER_PACK):
        word, shift = divmod(j * bits, 32)
        words[..., word] |= (packs[..., j] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:  # the code's high bits spill into the next word
            words[..., word + 1] |= packs[..., j] >> np.uint64(32 - shift)
    return words.astype(np.uint32).reshape(codes.shape[:-1] + (n // CODES_PER_PACK * bits,))


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """(..., m) uint32 words holding whole codes (m·32 a multiple of bits) → (..., m·32 / bits) codes: uint8,
    uint16 for 12 bits."""
    _check_bits(bits)
    words = np.asarray(words, dtype=np.uint32)
    m = words.shape[-1]
    if m * 32 % bits:
        raise ValueError(f"word count {m} does not hold whole {bits}-bit codes")
    if bits in (6, 12):  # byte-sliced: any run of whole 24-bit units
        unpack = _unpack6 if bits == 6 else _unpack12
        return unpack(words).reshape(words.shape[:-1] + (m * 32 // bits,))
    if m % bits:  # a partial last pack: unpack it as a whole one padded with 0 words, then cut
        full = np.zeros(words.shape[:-1] + (-(-m // bits) * bits,), np.uint32)
        full[..., :m] = words
        return np.ascontiguousarray(unpack_codes(full, bits)[..., :m * 32 // bits])
    packs = words.reshape(-1, m // bits, bits).astype(np.uint64)  # (rows, packs, b)
    mask = np.uint64((1 << bits) - 1)
    dtype = np.uint8 if bits <= 8 else np.uint16
    codes = np.empty(packs.shape[:2] + (CODES_PER_PACK,), dtype=dtype)  # (rows, packs, 32)
    for j in range(CODES_PER_PACK):
        word, shift = divmod(j * bits, 32)
        value = packs[..., word] >> np.uint64(shift)
        if shift + bits > 32:
            value |= packs[..., word + 1] << np.uint64(32 - shift)
        codes[..., j] = value & mask
    return codes.reshape(words.shape[:-1] + (m // bits * CODES_PER_PACK,))


def _unpack6(words: np.ndarray) -> np.ndarray:
    """6-bit codes without the loop over pack positions (1.2–9× faster; 6-bit metadata is unpacked at
    every load): in the little-endian bit string 4 codes fill 3 whole bytes (code 4k + m is bits
    6m … 6m + 5 of bytes 3k … 3k + 2), so each code is two byte slices shifted and masked in uint8."""
    b = np.ascontiguousarray(words, dtype="<u4").view(np.uint8).reshape(-1, 3)  # (n / 4, 3)
    codes = np.empty((len(b), 4), np.uint8)
    codes[:, 0] = b[:, 0] & 63
    codes[:, 1] = (b[:, 0] >> 6) | ((b[:, 1] & 15) << 2)
    codes[:, 2] = (b[:, 1] >> 4) | ((b[:, 2] & 3) << 4)
    codes[:, 3] = b[:, 2] >> 2
    return codes.reshape(-1)


def _unpack12(words: np.ndarray) -> np.ndarray:
    """12-bit codes (vq indices, SPEC.md §12.1) as _unpack6 does 6-bit ones: 2 codes fill 3 whole bytes (code
    2k is the low 12 bits of the little-endian bytes 3k … 3k + 2, code 2k + 1 the high 12)."""
    b = np.ascontiguousarray(words, dtype="<u4").view(np.uint8).reshape(-1, 3).astype(np.uint16)  # (n / 2, 3)
    codes = np.empty((len(b), 2), np.uint16)
    codes[:, 0] = b[:, 0] | ((b[:, 1] & 15) << 8)
    codes[:, 1] = (b[:, 1] >> 4) | (b[:, 2] << 4)
    return codes.reshape(-1)
