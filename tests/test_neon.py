"""The NEON fast scan (aarch64) against the portable loop, cross-compiled and run under QEMU.

Needs gcc-aarch64-linux-gnu and qemu-user (Debian packages; .ci/run installs them). The kernels of
tqindex/_scan.h are built into tests/neon/harness.c twice: for aarch64 (run under qemu-aarch64) and
for this machine. Inputs come from real indexes (every nibble layout: 1-, 2- and 4-bit codes, block,
bit-plane and masked Lloyd-Max 5-bit codes, ip and l2, deletions): the integer sums of every block
must be equal, and the scan's heaps equal the compiled extension's portable scan.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tqindex import Index, QuantizerOptions, native
from tqindex.backends import fastscan

from conftest import clustered

HARNESS = Path(__file__).parent / "neon" / "harness.c"
CROSS, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")

pytestmark = pytest.mark.skipif(not (CROSS and QEMU and shutil.which("gcc") and native.kernels is not None),
                                reason="needs aarch64-linux-gnu-gcc, qemu-aarch64, gcc and the compiled extension "
                                       "(apt-get install gcc-aarch64-linux-gnu qemu-user)")

FLAGS = ["-O2", "-std=c11", "-Wall", "-Wno-unused-function", "-ffp-contract=off"]


@pytest.fixture(scope="module")
def harnesses(tmp_path_factory):
    out = tmp_path_factory.mktemp("neon")
    arm, host = out / "harness-arm", out / "harness-host"
    subprocess.run([CROSS, *FLAGS, "-static", "-o", str(arm), str(HARNESS), "-lm"], check=True)
    subprocess.run(["gcc", *FLAGS, "-o", str(host), str(HARNESS), "-lm"], check=True)
    return arm, host


def _inputs(bits, metric, codebook, d=203, n=1500, nq=6, k=13):
    rng = np.random.default_rng(int(10 * bits) + len(metric))
    x, q = clustered(rng, n, d, clusters=30, queries=nq)
    index = Index(dim=d, bits=bits, metric=metric, options=QuantizerOptions(codebook=codebook))
    index.add(x)
    index.remove(np.arange(0, n, 11))
    (segment,) = index._segments
    quantizer = index._quantizer
    layout = fastscan.segment_layout(quantizer, segment, metric)
    rotated, _ = quantizer.prepare_queries(torch.from_numpy(q))
    luts, fluts, delta, bias, tol, magnitude = fastscan.quantized_luts(quantizer, rotated)
    nblocks = layout["blocks"].shape[0]
    assert n % 32  # the last block has padding rows
    qn2 = (q ** 2).sum(1).astype(np.float32)
    # The room for rounding that scan_segments gives a score, in its float32 operations and order.
    f32 = np.float32
    factor, max_norm2 = (f32(2), f32(layout["max_norm2"])) if metric == "l2" else (f32(1), f32(0))
    eps = f32(1e-5) * ((factor * f32(layout["max_scale"])) * magnitude + f32(0) + (max_norm2 + qn2 if metric == "l2"
                                                                                    else f32(0)))
    arrays = dict(codes=layout["blocks"], rows=n, ncols=layout["ncols"], wcols=layout["wcols"], nblocks=nblocks,
                  luts=luts, fluts=fluts, delta=delta, bias=bias, tol=tol, eps=eps, row_scale=layout["scale"],
                  row_norm=layout["norm"] if metric == "l2" else None, query_norm2=qn2 if metric == "l2" else None,
                  deleted=segment.deleted.view(np.uint8), nq=nq, k=k, magnitude=magnitude,
                  max_scale=layout["max_scale"], max_norm2=layout.get("max_norm2", 0.0))
    return arrays


def _write(path, a):
    header = np.array([a["nblocks"], a["ncols"], a["wcols"], a["nq"], a["k"], a["row_norm"] is not None, a["rows"]],
                      np.int64)
    parts = [header, a["codes"], a["luts"], a["fluts"], a["delta"], a["bias"], a["tol"], a["eps"], a["row_scale"],
             a["deleted"]]
    if a["row_norm"] is not None:
        parts += [a["row_norm"], a["query_norm2"]]
    path.write_bytes(b"".join(np.ascontiguousarray(p).tobytes() for p in parts))


def _run(exe, args, cross):
    cmd = ([QEMU] if cross else []) + [str(exe), *map(str, args)]
    subprocess.run(cmd, check=True, timeout=300)


@pytest.mark.parametrize("bits,metric,codebook", [(1, "ip", "vq"), (2, "l2", "vq"), (2, "ip", "scalar"), (3, "ip", "vq"),
                                                  (4, "l2", "vq"), (4.4, "ip", "vq"), (5, "ip", "scalar"),
                                                  (4.5, "l2", "scalar")])
def test_neon_equals_the_portable_loop(harnesses, tmp_path, bits, metric, codebook):
    arm, host = harnesses
    a = _inputs(bits, metric, codebook)
    assert (a["wcols"] > 0) == (codebook == "scalar" and bits in (5, 4.5))  # masked 5-bit columns covered
    _write(tmp_path / "in", a)
    _run(arm, [tmp_path / "in", tmp_path / "neon-sums", "sums-neon"], cross=True)
    _run(host, [tmp_path / "in", tmp_path / "host-sums", "sums-portable"], cross=False)
    neon_sums = np.fromfile(tmp_path / "neon-sums", np.uint32)
    host_sums = np.fromfile(tmp_path / "host-sums", np.uint32)
    assert neon_sums.size == a["nq"] * a["nblocks"] * 32 and neon_sums.any()
    np.testing.assert_array_equal(neon_sums, host_sums)
    # The whole scan under QEMU equals the compiled extension's portable scan, heap for heap.
    _run(arm, [tmp_path / "in", tmp_path / "neon-out", "neon"], cross=True)
    raw = (tmp_path / "neon-out").read_bytes()
    nq, k = a["nq"], a["k"]
    scores = np.frombuffer(raw[:4 * nq * k], np.float32).reshape(nq, k)
    ids = np.frombuffer(raw[4 * nq * k:12 * nq * k], np.int64).reshape(nq, k)
    counts = np.frombuffer(raw[12 * nq * k:], np.int64)
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    count = np.zeros(nq, np.int64)
    plan = fastscan.ScanPlan(ncols=a["ncols"], wcols=a["wcols"], luts=a["luts"], fluts=a["fluts"], delta=a["delta"],
                             bias=a["bias"], tol=a["tol"], query_norm2=a["query_norm2"])
    segment = (a["codes"], a["rows"], a["row_scale"], a["row_norm"], a["deleted"], None, 0, a["max_scale"],
               a["max_norm2"])
    native.kernels.scan_segments(plan, [segment], a["magnitude"], out_s, out_i, count, portable=True)
    np.testing.assert_array_equal(ids, out_i)
    np.testing.assert_array_equal(scores, out_s)
    np.testing.assert_array_equal(counts, count)
