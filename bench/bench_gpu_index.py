"""Indexing on the GPU: `Index.add` on a CUDA index (rotation and coding there), and search over
what it built, up to 100M × 1536 on one GPU.

    python bench/bench_gpu_index.py                       # 100k, 10M × 1536 at 2 and 4 bits; 100M at 2 bits
    python bench/bench_gpu_index.py --large 10000000 --large-bits 4 --tag quick

Vectors are Gaussian, generated on the GPU (speed does not depend on their values). Reported:

- the paper's setting, 100k × 1536 (Zandieh et al., Table 2: TurboQuant 0.0013 s, PQ 239.75 s,
  RaBitQ 2,267.59 s), each a median of repeated CUDA-synchronised wall times after a warm-up:
  * ``encode``: rotation, codes and per-vector scales of vectors already on the GPU, left there
    (the quantizer's GPU encoder alone: what a quantization time counts);
  * ``add (GPU tensor)``: `Index.add` of the same tensor: encode, codes copied to the host in the
    block layout the index holds and saves, ids and bookkeeping;
  * ``add (numpy)``: the same from a host float32 array (its upload included);
  * ``add on the CPU``: a CPU index's `add` of the numpy array on this machine's CPU, for scale.
- larger indexes, added `--chunk` rows at a time from GPU tensors: total add time and vectors/s;
  the first search (the codes uploaded to the GPU in its layout); QPS at 1, 256 and 4096 queries
  per call (k = 10); peak GPU memory of the torch allocator (add and all searches) and host RSS.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time

import numpy as np
import torch

from common import RESULTS, write_json

from tqindex import Index

PAPER_S = {"TurboQuant (paper)": 0.0013, "PQ (paper)": 239.75, "RaBitQ (paper)": 2267.59}


def timed(fn, repeat: int) -> float:
    """Median CUDA-synchronised wall time of `fn` after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def paper_setting(n: int, dim: int, bits: int, seed: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn((n, dim), device="cuda", generator=gen)
    xn = x.cpu().numpy()
    q = Index(dim=dim, bits=bits, seed=seed, device="cuda")._quantizer
    out = {"n": n, "dim": dim, "bits": bits}
    out["encode_s"] = timed(lambda: q._encode_chunk(x), 20)
    out["add_gpu_tensor_s"] = timed(lambda: Index(dim=dim, bits=bits, seed=seed, device="cuda").add(x), 5)
    out["add_numpy_s"] = timed(lambda: Index(dim=dim, bits=bits, seed=seed, device="cuda").add(xn), 5)
    out["add_cpu_s"] = timed(lambda: Index(dim=dim, bits=bits, seed=seed).add(xn), 2)
    print(out, flush=True)
    return out


def large(n: int, dim: int, bits: int, chunk: int, batches: list[int], k: int, seed: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    index = Index(dim=dim, bits=bits, seed=seed, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    add_s = 0.0
    for a in range(0, n, chunk):
        x = torch.randn((min(n, a + chunk) - a, dim), device="cuda", generator=gen)
        torch.cuda.synchronize()
        start = time.perf_counter()
        index.add(x)
        torch.cuda.synchronize()
        add_s += time.perf_counter() - start
        del x
    out = {"n": n, "dim": dim, "bits": bits, "chunk": chunk, "add_s": add_s, "add_vectors_per_s": n / add_s,
           "add_peak_gpu_bytes": torch.cuda.max_memory_allocated() - base}
    print(out, flush=True)
    q1 = torch.randn((1, dim), generator=torch.Generator().manual_seed(seed + 1)).numpy()
    start = time.perf_counter()
    index.search(q1, k)
    torch.cuda.synchronize()
    out["first_search_s"] = time.perf_counter() - start
    scanner = index._backend("cuda")
    out["qps"], out["kernel"] = {}, {}
    for b in batches:
        q = torch.randn((b, dim), device="cuda", generator=gen)
        t = timed(lambda: index.search(q, k), 3 if n < 50_000_000 else 1)
        out["qps"][b], out["kernel"][b] = b / t, scanner.last_stats["kernel"]
        print(n, bits, b, round(b / t, 1), scanner.last_stats["kernel"], flush=True)
    out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() - base
    out["peak_gpu_bytes_per_vector"] = out["peak_gpu_bytes"] / n
    out["bytes_per_vector"] = index.bytes_per_vector()
    out["host_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(out, flush=True)
    return out  # the index goes with this frame: the next size starts by collecting it


def tables(device: str, cpu: str, paper: list[dict], big: list[dict]) -> str:
    lines = [f"GPU: {device}; host CPU: {cpu}", "",
             "Paper setting (Zandieh et al., Table 2: TurboQuant 0.0013 s, PQ 239.75 s, RaBitQ 2,267.59 s, "
             "100k × 1536):", "",
             "| n × d | bits | encode on the GPU | add (GPU tensor) | add (numpy) | add on the CPU |",
             "|---|---|---|---|---|---|"]
    for r in paper:
        lines.append(f"| {r['n']:,} × {r['dim']} | {r['bits']} | {r['encode_s'] * 1e3:.2f} ms | "
                     f"{r['add_gpu_tensor_s'] * 1e3:.1f} ms | {r['add_numpy_s'] * 1e3:.1f} ms | "
                     f"{r['add_cpu_s'] * 1e3:.0f} ms |")
    if big:
        batches = list(big[0]["qps"])
        lines += ["", "Larger indexes, added from GPU tensors " + f"{big[0]['chunk']:,} rows at a time:", "",
                  "| n × d | bits | add | vectors/s | first search | " + " | ".join(f"QPS @{b}" for b in batches)
                  + " | peak GPU B/vec | B/vec held | host max RSS |",
                  "|---|---|---|---|---|" + "---|" * len(batches) + "---|---|---|"]
        for r in big:
            qps = " | ".join(f"{r['qps'][b]:,.1f} ({r['kernel'][b]})" for b in batches)
            lines.append(f"| {r['n']:,} × {r['dim']} | {r['bits']} | {r['add_s']:.1f} s | "
                         f"{r['add_vectors_per_s'] / 1e6:.2f} M | {r['first_search_s']:.1f} s | {qps} | "
                         f"{r['peak_gpu_bytes_per_vector']:.0f} | {r['bytes_per_vector']} | "
                         f"{r['host_max_rss_bytes'] / 2**30:.1f} GiB |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="*", default=[100_000], help="paper-setting sizes")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--large", type=int, nargs="*", default=[10_000_000, 100_000_000])
    parser.add_argument("--large-bits", type=int, nargs="+", default=[2, 4],
                        help="widths of the large indexes (those above 50M rows run at the first one only)")
    parser.add_argument("--chunk", type=int, default=1 << 20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256, 4096])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_index.py needs an NVIDIA GPU")
    device, cpu = torch.cuda.get_device_name(), cpu_model()
    paper = [paper_setting(n, args.dim, bits, args.seed) for n in args.n for bits in args.bits]
    big = []
    name = "gpu-index" + (f"-{args.tag}" if args.tag else "")
    for n in args.large:
        for bits in (args.large_bits if n <= 50_000_000 else args.large_bits[:1]):
            big.append(large(n, args.dim, bits, args.chunk, args.batches, args.k, args.seed))
            # Written after every size: a later one that runs out of time leaves the earlier ones.
            write_json(RESULTS / f"{name}.json", {"device": device, "cpu": cpu, "paper_s": PAPER_S,
                                                  "paper_setting": paper, "large": big})
    text = tables(device, cpu, paper, big)
    write_json(RESULTS / f"{name}.json", {"device": device, "cpu": cpu, "paper_s": PAPER_S,
                                          "paper_setting": paper, "large": big})
    (RESULTS / f"{name}.md").write_text(f"`{' '.join(['python', 'bench/bench_gpu_index.py'] + sys.argv[1:])}`\n\n"
                                        f"{text}\n")
    print(text)


if __name__ == "__main__":
    main()
