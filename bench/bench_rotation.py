"""Dense (Haar) against randomized-Hadamard rotation: distortion and encoding speed.

    python bench/bench_rotation.py

Distortion is the mean ‖x − x̃‖² of unit vectors after mse quantization, on inputs that stress a
rotation differently: random unit vectors (already "rotated"), one-hot vectors (the worst case
for a structured transform), and real embeddings when a dataset is given (--dataset).
Encoding speed is vectors/s through `TurboQuantizer.encode` with each rotation, same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import RESULTS, write_json

from tqindex.quantizer import TurboQuantizer


def inputs(d: int, n: int, dataset: str | None):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d))
    out = {"random unit": x / np.linalg.norm(x, axis=1, keepdims=True),
           "one-hot": np.eye(d)[rng.integers(0, d, n)]}
    if dataset:
        from tqindex.datasets import load_dataset
        db = np.asarray(load_dataset(dataset).database()[:n], dtype=np.float64)
        if db.shape[1] == d:
            out["embeddings"] = db / np.linalg.norm(db, axis=1, keepdims=True)
    return {k: v.astype(np.float32) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[97, 384, 1000, 1536])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--dataset", default=None, help="also measure on this dataset's vectors (matching d)")
    args = parser.parse_args()
    rows = []
    for d in args.dims:
        data = inputs(d, args.n, args.dataset)
        for bits in args.bits:
            for kind in ("dense", "hadamard"):
                q = TurboQuantizer(dim=d, bits=bits, rotation=kind, seed=1)
                row = {"dim": d, "bits": bits, "rotation": kind}
                for name, x in data.items():
                    x_hat = q.decode(q.encode(torch.from_numpy(x)))
                    row[f"mse[{name}]"] = float(np.mean(np.sum((x - x_hat) ** 2, axis=1)))
                big = torch.from_numpy(np.repeat(data["random unit"], max(1, 50_000 // args.n), axis=0))
                q.encode(big[:1000])
                start = time.perf_counter()
                q.encode(big)
                row["encode_vectors_per_s"] = len(big) / (time.perf_counter() - start)
                rows.append(row)
                print("  ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    print("\nratio hadamard/dense (distortion; encoding speed):")
    for dense, had in zip(rows[::2], rows[1::2]):
        ratios = {k: had[k] / dense[k] for k in dense if k.startswith("mse[")}
        print(f"  d={dense['dim']:5d} b={dense['bits']}  " + "  ".join(f"{k} {v:.4f}" for k, v in ratios.items())
              + f"  speed {had['encode_vectors_per_s'] / dense['encode_vectors_per_s']:.2f}x")
    write_json(RESULTS / "rotation.json", {"rows": rows})


if __name__ == "__main__":
    main()
