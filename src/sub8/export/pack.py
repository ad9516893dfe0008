"""Integer codes packed at their bit-width: a little-endian bit stream, code after code.

Code i occupies bits [i*b, (i+1)*b) of the stream, least significant bit first, and bit k of
the stream is bit (k mod 8) of byte k // 8. So 4-bit codes go two to a byte (the first in the
low nibble), 2-bit codes four to a byte, 8-bit codes one to a byte, and 3-, 5-, 6- and 7-bit
codes run across byte boundaries. The last byte is padded with zero bits.
"""

from __future__ import annotations

import numpy as np

from ..errors import Sub8Error


def packed_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes in [0, 2**bits) (any shape, read flat) -> uint8 array of packed_bytes()."""
    if not 1 <= bits <= 8:
        raise Sub8Error(f"cannot pack {bits}-bit codes (1..8)")
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise Sub8Error(f"codes outside [0, {2 ** bits - 1}] cannot be packed at {bits} bits")
    flat = flat.astype(np.uint8)
    if bits == 8:
        return flat.copy()
    stream = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of pack(): `count` codes as uint8."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != packed_bytes(count, bits):
        raise Sub8Error(f"{packed.size} bytes cannot hold exactly {count} codes of {bits} bits "
                        f"({packed_bytes(count, bits)} bytes expected)")
    if bits == 8:
        return packed.copy()
    stream = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (stream << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)
