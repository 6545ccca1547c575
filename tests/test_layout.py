"""The block layout: the one form an index holds, stores and scans its codes in (tqindex.layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tqindex import Index, QuantizerOptions, quantizer as quantizer_module
from tqindex.backends import fastscan
from tqindex.layout import BLOCK
from tqindex.quantizer import TurboQuantizer
from tqindex.storage import SHARDS

from conftest import clustered

HERE = Path(__file__).parent

# Every kind of group the layout has: block codewords (1-2 bits vq), scalar codes that are their own
# nibbles (1, 2, 4 bits), 3-bit codes (a nibble each), two groups (fractional), bit planes (5 vq),
# masked 5-bit Lloyd-Max codes alone and beside a 4-bit group.
KINDS = [(1, "vq"), (1, "scalar"), (2, "vq"), (2, "scalar"), (2.5, "vq"), (3, "scalar"), (3.75, "vq"),
         (4, "scalar"), (4.4, "vq"), (5, "vq"), (5, "scalar"), (4.5, "scalar")]


def _quantizer(bits, codebook, d=203):
    return TurboQuantizer(dim=d, bits=bits, codebook=codebook, seed=3)


def _x(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("bits,codebook", KINDS)
def test_blocks_round_trip_to_the_packed_codes(bits, codebook):
    q = _quantizer(bits, codebook)
    assert q.layout is not None
    codes = q.encode(torch.from_numpy(_x(1000, 203))).codes
    blocks = q.layout.from_codes(codes)
    assert blocks.shape == (-(-1000 // BLOCK), q.layout.width, BLOCK)
    for start, stop in [(0, 1000), (0, 1), (31, 33), (64, 96), (999, 1000), (500, 500)]:
        np.testing.assert_array_equal(q.layout.codes(blocks, start, stop), codes[start:stop])
    # Padding rows of the last block are zero.
    assert not blocks[-1, :, 1000 % BLOCK:].any()


@pytest.mark.parametrize("bits,codebook", KINDS)
def test_encoding_into_blocks_equals_converting_rows(bits, codebook, monkeypatch):
    # Small chunks: several of them, the last one partial, each written into the final blocks.
    monkeypatch.setattr(quantizer_module, "_ENCODE_CHUNK_BYTES", 16 * 203 * 40)
    monkeypatch.setattr(quantizer_module, "_ENCODE_MIN_ROWS", 1)
    q = _quantizer(bits, codebook)
    x = torch.from_numpy(_x(333, 203, seed=1))
    rows = q.encode(x)
    held = q.encode(x, blocks=True)
    assert held.codes is None
    np.testing.assert_array_equal(held.blocks, q.layout.from_codes(rows.codes))
    np.testing.assert_array_equal(held.scale, rows.scale)
    np.testing.assert_array_equal(q.row_codes(held, 10, 300), rows.codes[10:300])


@pytest.mark.parametrize("bits,codebook", KINDS)
def test_device_transfers_equal_the_host_conversions(bits, codebook):
    """What the GPU encoder writes (`write_device_rows`) and the GPU upload reads (`device_rows`),
    run on CPU tensors: the same blocks and rows as the host conversions."""
    q = _quantizer(bits, codebook)
    codes = q.encode(torch.from_numpy(_x(1000, 203))).codes
    expected = q.layout.from_codes(codes)
    blocks = q.layout.empty(1000)
    for start in range(0, 1000, 96):  # whole blocks per chunk, the last one partial
        q.layout.write_device_rows(blocks, start, torch.from_numpy(codes[start:start + 96]))
    np.testing.assert_array_equal(blocks, expected)
    with pytest.raises(ValueError, match="block boundary"):
        q.layout.write_device_rows(blocks, 5, torch.from_numpy(codes[:10]))
    for start, stop in [(0, 1000), (0, 1), (31, 33), (64, 96), (999, 1000), (500, 500), (17, 900)]:
        rows = q.layout.device_rows(expected, start, stop, "cpu")
        assert rows.dtype == torch.uint8
        np.testing.assert_array_equal(rows.numpy(), codes[start:stop])


@pytest.mark.parametrize("bits,codebook", KINDS + [(3, "prod")])
def test_the_torch_encoder_gives_the_compiled_encoders_codes(bits, codebook, monkeypatch):
    """The torch encoder (the GPU's, run here on CPU tensors with the extension off) against the
    compiled encoder: the same rotation, so the same codes, and the same per-vector floats up to
    rounding."""
    variant = "prod" if codebook == "prod" else "mse"
    q = TurboQuantizer(dim=203, bits=bits, variant=variant, codebook="vq" if variant == "prod" else codebook, seed=3)
    x = torch.from_numpy(_x(700, 203, seed=4) * np.float32(3))
    host = q.encode(x)
    monkeypatch.setenv("TQINDEX_NATIVE", "0")
    dev = q._encode_chunk(x)
    assert set(dev) == {"codes", "norm", "scale", "qjl", "residual_norm"}
    assert isinstance(dev["codes"], torch.Tensor)  # the torch path ran, not the compiled one
    codes = dev["codes"].numpy()
    differ = np.flatnonzero((q.unpack(codes) != q.unpack(host.codes)).any(axis=1))
    assert len(differ) <= 2, f"rows {differ[:5]} coded differently"  # a coordinate on a boundary, at most
    same = np.setdiff1d(np.arange(700), differ)
    np.testing.assert_allclose(dev["norm"].numpy(), host.norm, rtol=1e-6)
    np.testing.assert_allclose(dev["scale"].numpy()[same], host.scale[same], rtol=1e-5)
    if variant == "prod":
        assert np.mean(dev["qjl"].numpy()[same] != host.qjl[same]) < 1e-3
        np.testing.assert_allclose(dev["residual_norm"].numpy()[same], host.residual_norm[same], rtol=1e-4)
    else:
        assert dev["qjl"] is None and dev["residual_norm"] is None


def test_codes_without_a_block_layout_stay_row_major():
    for q in (TurboQuantizer(dim=40, bits=3, variant="prod"), TurboQuantizer(dim=40, bits=6)):
        assert q.layout is None
        enc = q.encode(torch.from_numpy(_x(50, 40)), blocks=True)
        assert enc.blocks is None and enc.codes.shape == (50, q.code_bytes)


@pytest.mark.parametrize("bits,codebook", [(2.5, "vq"), (5, "scalar"), (4, "scalar")])
def test_gather_takes_rows_across_sources(bits, codebook):
    q = _quantizer(bits, codebook)
    rng = np.random.default_rng(5)
    parts = [q.encode(torch.from_numpy(_x(n, 203, seed=n))).codes for n in (70, 1, 300)]
    picks = [np.sort(rng.choice(len(c), size=max(1, len(c) // 2), replace=False)) for c in parts]
    merged = q.layout.gather([(q.layout.from_codes(c), p) for c, p in zip(parts, picks)])
    expected = np.concatenate([c[p] for c, p in zip(parts, picks)])
    np.testing.assert_array_equal(q.layout.codes(merged, 0, len(expected)), expected)


def test_gather_in_several_chunks(monkeypatch):
    from tqindex import layout as layout_module
    monkeypatch.setattr(layout_module, "_CHUNK_ROWS", 40)  # chunks that do not end on a block
    q = _quantizer(3, "scalar")
    codes = q.encode(torch.from_numpy(_x(500, 203))).codes
    keep = np.flatnonzero(np.arange(500) % 3 != 0)
    merged = q.layout.gather([(q.layout.from_codes(codes), keep), (q.layout.from_codes(codes[:77]), np.arange(77))])
    np.testing.assert_array_equal(q.layout.codes(merged, 0, len(keep) + 77), np.concatenate([codes[keep], codes[:77]]))


def test_an_index_holds_one_copy_of_its_codes():
    d, n = 96, 5000
    index = Index(dim=d, bits=4, seed=1)
    index.add(_x(n, d))
    index.add(_x(1000, d, seed=2))
    index.search(_x(3, d, seed=3), 10)
    index.remove(np.arange(0, 6000, 5))
    index.search(_x(3, d, seed=3), 10)
    code_bytes = index._quantizer.code_bytes
    for segment in index._segments:
        assert segment.encoded.codes is None and segment.encoded.blocks is not None
    # What the scanners cached beside the segments: per-row floats only, no copy of the codes.
    seen: set = set()
    held = sum(s.nbytes(seen) for s in index._segments)
    cached = sum(scanner.cache.nbytes(seen) for scanner in index._scanners)
    assert cached <= 3 * 4 * 6016 + 4096, cached   # scale, masked scale, (l2: norm²) per padded row
    assert held < 6016 * (code_bytes + 8 + 4 + 1) + 4096


@pytest.mark.parametrize("bits,codebook", [(1, "scalar"), (2, "scalar"), (3, "scalar"), (4, "scalar")])
def test_rescoring_from_block_columns_equals_the_torch_scan(bits, codebook):
    # Scalar codes of 1-4 bits are rescored from their nibble columns (3-bit codes: 4 bits each).
    if not fastscan.available():
        pytest.skip("no SIMD fast scan on this machine")
    from tqindex.backends.torch_scan import BlockDecoder, scan_topk
    rng = np.random.default_rng(bits)
    x, queries = clustered(rng, 1500, 203, clusters=30, queries=8)
    index = Index(dim=203, bits=bits, options=QuantizerOptions(codebook=codebook))
    index.add(x)
    index.remove(np.arange(0, 1500, 9))
    q = index._quantizer
    rotated, _ = q.prepare_queries(torch.from_numpy(queries))
    sq = rotated.square().sum(1)
    ref_s, ref_p = scan_topk(q, BlockDecoder(q), index._segments, rotated, None, sq, 20, "ip")
    for portable in (False, True):
        s, p = fastscan.scan_topk_fast(q, index._segments, rotated, sq, 20, "ip", portable=portable)
        np.testing.assert_allclose(s.numpy(), ref_s.numpy(), rtol=2e-5, atol=1e-6)
        same = p.numpy() == ref_p.numpy()
        # Positions may differ only where scores tie.
        assert same.all() or np.allclose(s.numpy()[~same], ref_s.numpy()[~same], rtol=1e-6)


def test_format_1_index_loads_into_blocks_and_is_upgraded_on_save(tmp_path):
    fixture = HERE / "fixtures" / "v1"
    expected = json.loads((fixture / "expected.json").read_text())
    shutil.copytree(fixture / "index", tmp_path / "ix")
    queries = np.asarray(expected["queries"], dtype=np.float32)
    index = Index.load(tmp_path / "ix")
    for segment in index._segments:  # converted in memory
        assert segment.encoded.codes is None and segment.encoded.blocks.flags.owndata
    assert not list((tmp_path / "ix" / SHARDS).glob("codes-*"))
    before = index.search(queries, expected["k"])
    index.save()                                   # rewritten once, in the block layout
    index.close()
    manifest = json.loads((tmp_path / "ix" / "MANIFEST.json").read_text())
    assert manifest["body"]["format_version"] == 2
    assert len(list((tmp_path / "ix" / SHARDS).glob("codes-*"))) == len(manifest["body"]["shards"]) >= 1
    loaded = Index.load(tmp_path / "ix", mmap=True)
    for segment in loaded._segments:
        blocks = segment.encoded.blocks
        assert not blocks.flags.owndata and not blocks.flags.writeable   # mapped, not built
    after = loaded.search(queries, expected["k"])
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.ids, np.asarray(expected["ids"]))
