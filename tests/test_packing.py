import numpy as np
import pytest
import torch

from tqindex.packing import pack_codes, packed_row_bytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("d", [1, 3, 8, 97, 1000, 1536])
@pytest.mark.parametrize("n", [0, 1, 5])
def test_round_trip(bits, d, n):
    rng = np.random.default_rng(bits * 1000 + d + n)
    codes = rng.integers(0, 2 ** bits, size=(n, d), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (n, packed_row_bytes(d, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, d), codes)
    # torch in, torch out, same bytes
    packed_t = pack_codes(torch.from_numpy(codes), bits)
    assert isinstance(packed_t, torch.Tensor)
    np.testing.assert_array_equal(packed_t.numpy(), packed)


def test_layout_is_little_endian_bitstream():
    # Codes 0b101, 0b011, 0b110 at 3 bits: stream bits (LSB first) 1,0,1, 1,1,0, 0,1,1 ->
    # byte0 = bits 0..7 = 1,0,1,1,1,0,0,1 = 0b10011101, byte1 = bit 8 = 1.
    packed = pack_codes(np.array([[0b101, 0b011, 0b110]], dtype=np.uint8), 3)
    assert packed.tolist() == [[0b10011101, 0b1]]
    # 4 bits: code j=0 in the low nibble.
    assert pack_codes(np.array([[0x3, 0xA]], dtype=np.uint8), 4).tolist() == [[0xA3]]
    # Reference: numpy's own bit packing of the same stream.
    rng = np.random.default_rng(1)
    for bits in range(1, 9):
        codes = rng.integers(0, 2 ** bits, size=(4, 37), dtype=np.uint8)
        stream = ((codes[:, :, None] >> np.arange(bits)) & 1).reshape(4, -1).astype(np.uint8)
        np.testing.assert_array_equal(pack_codes(codes, bits), np.packbits(stream, axis=1, bitorder="little"))


def test_rejects_out_of_range():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(np.array([[4]], dtype=np.uint8), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.zeros((1, 4), dtype=np.uint8), 9)
    with pytest.raises(ValueError, match="shape"):
        unpack_codes(np.zeros((1, 3), dtype=np.uint8), 4, 8)
