"""GPU search speed and memory against torch fp16 brute force, measured in the same run.

    python bench/bench_gpu.py                                  # 1M and 10M x 1536, 4 and 2 bits
    python bench/bench_gpu.py --n 1000000 --bits 4 --tag quick

Synthetic data, for speed only: the codes are uniformly random bytes (valid codes at 1, 2 and 4
bits) with per-vector scales in [0.8, 1.2]; the brute-force baseline searches random fp16 vectors
of the same shape. Scan time does not depend on the values; the thresholded emission makes the
candidate count depend a little on the score distribution, which random codes and Gaussian
queries give a realistic shape.

Reported, per configuration:
- copy bandwidth of the device (one large device-to-device copy; bytes read + bytes written);
- scan bandwidth: bytes of codes + scales read by one pass of the single-query table kernel
  (``tq_lut_scan``, nothing emitted) over its time (CUDA events), and that as a fraction of copy;
- single-query latency of ``Index.search`` (numpy in, numpy out: rotation, sampled threshold, scan,
  top-k and the copies included), median of many calls;
- QPS at 1, 16, 256 and 4096 queries per call (torch CUDA queries) for tqindex and for
  ``torch.topk(q16 @ X16.T)`` over row blocks (fp16 tensor cores), and their ratio;
- peak GPU memory per vector (torch allocator peak during upload and all searches / n).
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from common import RESULTS, write_json

from tqindex import Index
from tqindex.quantizer import EncodedVectors
from tqindex.segment import Segment


def timed(fn, repeat: int, min_seconds: float = 0.0) -> float:
    """Median wall time of `fn` (synchronised), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if len(times) >= 200:
            break
    return float(np.median(times))


def event_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return float(np.median(times))


def copy_bandwidth() -> float:
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = event_time(lambda: dst.copy_(src), 10)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (2 << 30) / t


def synthetic_index(n: int, dim: int, bits: int, seed: int, codebook: str) -> Index:
    index = Index(dim=dim, bits=bits, device="cuda", seed=seed, codebook=codebook)
    rng = np.random.default_rng(seed)
    code_bytes = index._quantizer.code_bytes
    codes = np.empty((n, code_bytes), dtype=np.uint8)
    for a in range(0, n, 1 << 20):
        codes[a:a + (1 << 20)] = rng.integers(0, 256, (min(n, a + (1 << 20)) - a, code_bytes), dtype=np.uint8)
    scale = rng.uniform(0.8, 1.2, n).astype(np.float32)
    # Internal API: appending encoded rows directly skips encoding 10M real vectors on the CPU.
    index._append(Segment(ids=np.arange(n, dtype=np.int64), encoded=EncodedVectors(codes=codes, norm=None, scale=scale)))
    return index


def brute_force(x16: torch.Tensor, q: torch.Tensor, k: int):
    q16 = q.half()
    nq, n = q16.shape[0], x16.shape[0]
    rows = max(1 << 16, min(n, (2 << 30) // (2 * nq)))  # a block's fp16 score matrix ≤ 2 GiB
    best_v = best_i = None
    for a in range(0, n, rows):
        v, i = torch.topk(q16 @ x16[a:a + rows].T, k, dim=1)
        i = i + a
        if best_v is None:
            best_v, best_i = v, i
        else:
            v, j = torch.topk(torch.cat([best_v, v], 1), k, dim=1)
            best_i, best_v = torch.gather(torch.cat([best_i, i], 1), 1, j), v
    return best_v, best_i


def run(n: int, dim: int, bits: int, k: int, batches: list[int], copy_bw: float, seed: int,
        codebook: str, profile: bool = False) -> dict:
    out = {"n": n, "dim": dim, "bits": bits, "k": k, "codebook": codebook}
    rng = np.random.default_rng(seed + 1)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    index = synthetic_index(n, dim, bits, seed, codebook)
    q1 = rng.standard_normal((1, dim)).astype(np.float32)
    start = time.perf_counter()
    index.search(q1, k)
    out["upload_and_first_search_s"] = time.perf_counter() - start
    # The scan alone: one pass of the table kernel for one query, threshold +inf (nothing emitted).
    scanner = index._backend("cuda")
    segment = index._segments[0]
    data = scanner.segment_data(segment, torch.device("cuda"))
    rotated, _ = index._quantizer.prepare_queries(torch.from_numpy(q1).cuda())
    prep = scanner._prepare_lut(rotated, None)
    qsq = rotated.square().sum(1)
    tau = torch.full((1,), torch.inf, device="cuda")
    parts = [(data, 0, None)]
    scan_s = event_time(lambda: scanner._pass(prep, parts, qsq, tau, 16, False), 20)
    scan_bytes = data["words"].numel() * 4 + data["scale"].numel() * 4
    out.update(scan_s=scan_s, scan_bytes=scan_bytes, scan_bandwidth=scan_bytes / scan_s,
               scan_fraction_of_copy=scan_bytes / scan_s / copy_bw)
    out["latency_s"] = timed(lambda: index.search(q1, k), 30, 1.0)
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                index.search(q1, k)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
    ours = {}
    for b in batches:
        q = torch.randn(b, dim, device="cuda")
        t = timed(lambda: index.search(q, k), 3, 0.5)
        ours[b] = {"s": t, "qps": b / t, "kernel": scanner.last_stats["kernel"],
                   "uncertified": scanner.last_stats["uncertified"], "paths": {}}
        for path in ("lut", "mma", "gemm"):  # every path, to check the automatic choice
            if (path == "lut" and b > 16) or (path == "mma" and b > 256):
                continue
            scanner.force = path
            t = timed(lambda: index.search(q, k), 2, 0.3)
            ours[b]["paths"][path] = b / t
        scanner.force = None
        print(b, {p: round(v) for p, v in ours[b]["paths"].items()}, flush=True)
    out["tqindex"] = ours
    out["tqindex_peak_bytes_per_vector"] = (torch.cuda.max_memory_allocated() - base) / n
    out["tqindex_bytes_per_vector"] = index.bytes_per_vector()
    del index, scanner, segment, data, parts, prep
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x16 = torch.empty((n, dim), dtype=torch.float16, device="cuda")
    for a in range(0, n, 1 << 20):
        x16[a:a + (1 << 20)] = torch.randn((min(n, a + (1 << 20)) - a, dim), device="cuda", generator=gen).half()
    brute = {}
    for b in batches:
        q = torch.randn(b, dim, device="cuda")
        t = timed(lambda: brute_force(x16, q, k), 3, 1.0)
        brute[b] = {"s": t, "qps": b / t}
    out["torch_fp16"] = brute
    out["torch_fp16_peak_bytes_per_vector"] = (torch.cuda.max_memory_allocated() - base) / n
    out["qps_ratio"] = {b: ours[b]["qps"] / brute[b]["qps"] for b in batches}
    del x16
    torch.cuda.empty_cache()
    return out


def table(rows: list[dict], device: str, copy_bw: float) -> str:
    lines = [f"GPU: {device}; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write); "
             f"codebook {rows[0]['codebook']!r}", "",
             "| n × d | bits | scan GB/s (of copy) | 1-query latency | batch | tqindex QPS | torch fp16 QPS | ratio "
             "| kernel | QPS by kernel (table / fused mma / gemm) | peak B/vec tq / fp16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for i, (b, ours) in enumerate(r["tqindex"].items()):
            head = (f"{r['n']:,} × {r['dim']} | {r['bits']} | {r['scan_bandwidth'] / 1e9:,.0f} "
                    f"({r['scan_fraction_of_copy']:.0%}) | {r['latency_s'] * 1e3:.2f} ms") if i == 0 else " | | |"
            mem = (f"{r['tqindex_peak_bytes_per_vector']:.0f} / {r['torch_fp16_peak_bytes_per_vector']:.0f}"
                   if i == 0 else "")
            by_path = " / ".join(f"{ours['paths'][p]:,.0f}" if p in ours["paths"] else "–"
                                 for p in ("lut", "mma", "gemm"))
            lines.append(f"| {head} | {b} | {ours['qps']:,.0f} | {r['torch_fp16'][b]['qps']:,.0f} | "
                         f"{r['qps_ratio'][b]:.2f}× | {ours['kernel']} | {by_path} | {mem} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--codebook", choices=["vq", "scalar"], default="vq",
                        help="Index codebook (the default's; block codebooks apply at 1 and 2 bits)")
    parser.add_argument("--profile", action="store_true", help="print a torch profile of single-query search")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs an NVIDIA GPU")
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    rows = []
    for n in args.n:
        for bits in args.bits:
            rows.append(run(n, args.dim, bits, args.k, args.batches, copy_bw, args.seed, args.codebook, args.profile))
            print(table(rows[-1:], device, copy_bw), flush=True)
    text = table(rows, device, copy_bw)
    name = "gpu" + (f"-{args.tag}" if args.tag else "")
    write_json(RESULTS / f"{name}.json", {"device": device, "copy_bandwidth": copy_bw, "rows": rows})
    (RESULTS / f"{name}.md").write_text(f"`{' '.join(['python', 'bench/bench_gpu.py'] + __import__('sys').argv[1:])}`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
