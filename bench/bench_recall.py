"""Recall, Recall@1@k, build time, QPS and bytes per vector: tqindex against PQ, RaBitQ and turbovec.

    python bench/bench_recall.py --dataset dbpedia-titles-minilm-100k
    python bench/bench_recall.py --dataset glove-50
    python bench/bench_recall.py --dataset path/to/file.hdf5 --bits 2 4

Every method sees the same database and queries, at the same bits per coordinate, on the same
threads, in one run. Cosine datasets are normalised once up front and searched by inner product by
every method. Writes bench/results/recall-<dataset>.json, .md (the table) and .png (Recall@1@k).

Bytes per vector are what each method stores per vector beyond its id: codes plus per-vector
floats (tqindex: scale; faiss RaBitQ: its code_size, which includes its factors; PQ: M code bytes;
turbovec and rabitqlib: measured from their serialised size, so rabitqlib's figure includes whatever it
stores per vector besides codes, ids among them). A peer that rejects the dataset's dimension (turbovec
needs a multiple of 8, rabitqlib at least 64) runs on zero-padded vectors: the same inner products, and
its bytes per vector include the padding's codes.

tqindex also runs at each peer's bytes per vector (the widest fractional width that fits, `bits_for_bytes`),
once with its per-vector scale in float32 (the default) and once in float16 ("fp16-scale": 2 bytes more
for codes, for a relative error of at most 2^-11 on each score).

tqindex's figures are for rotation seed 0, the default; the rows of its default configuration also
give recall over other seeds (--seeds), since which rotation is drawn moves recall, most at small d.
turbovec's rows too: its rotation is fixed, so its seed s > 0 is turbovec on the data rotated first by a
seeded random orthogonal matrix (inner products unchanged; its own rotation then composes into another).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import RESULTS, load_ip_dataset, median_time, write_json

from tqindex import Index, bits_for_bytes
from tqindex.codebook import VQ_BITS
from tqindex.datasets import load_dataset, recall_1_at_k, recall_at_k

K_CURVE = [1, 2, 4, 8, 16, 32, 64]


class Method:
    """build(x) then search(q, k) -> ids; bytes_per_vector; `skip` says why it cannot run."""

    skip: str | None = None
    trains = False

    def __init__(self, name: str, bits: int):
        self.name, self.bits = name, bits


class TQ(Method):
    seeds = 1  # rotation seeds the default configuration's rows are also measured at (--seeds)

    def __init__(self, bits, dim, variant="mse", rescale=True, rerank=0, center=False, width=None, budget_of=None,
                 scale_dtype="float32", codebook="vq"):
        label = f"tqindex-{variant}" + ("" if rescale or variant == "prod" else "-plain") + \
            ("-scalar" if codebook == "scalar" else "") + \
            ("+center" if center else "") + (f"+rerank{rerank}" if rerank else "") + \
            (f" {width:.3g}b" if budget_of else "") + (" fp16-scale" if scale_dtype == "float16" else "") + \
            (f" ({budget_of})" if budget_of else "")
        super().__init__(label, bits)
        self.kw = dict(dim=dim, bits=width or bits, variant=variant, rescale=rescale, keep_vectors=bool(rerank),
                       scale_dtype=scale_dtype, codebook=codebook)
        self.rerank = rerank
        self.center = center
        self.trains = center  # the mean of a sample is data-dependent: reported as training
        # The default configuration's rows also report their spread over rotation seeds.
        self.spread = variant == "mse" and rescale and not rerank and not center and codebook == "vq"
        if variant == "prod" and bits < 2:
            self.skip = "prod needs >= 2 bits"

    def build(self, x):
        if self.center:
            sample = np.random.default_rng(0).choice(len(x), max(1, len(x) // 100), replace=False)
            self.kw["center"] = x[np.sort(sample)].mean(axis=0)
        self.index = Index(**self.kw)
        self.index.add(x)
        self.bytes_per_vector = self.index.bytes_per_vector()

    def search(self, q, k):
        return self.index.search(q, k, rerank=self.rerank).ids

    def ids_for_seed(self, seed, x, q, k):
        """Top-k ids of the same configuration with another rotation seed (untimed)."""
        index = Index(**dict(self.kw, seed=seed))
        index.add(x)
        return index.search(q, k).ids


class FaissMethod(Method):
    def search(self, q, k):
        return self.index.search(q, k)[1]

    def build(self, x):
        if self.trains:
            self.index.train(x)
        self.index.add(x)


class FaissPQ(FaissMethod):
    trains = True

    def __init__(self, bits, dim, nbits):
        super().__init__("faiss-PQ" if nbits == 8 else "faiss-PQFastScan", bits)
        import faiss
        m = dim * bits // nbits
        if (dim * bits) % nbits or m == 0 or dim % m:
            self.skip = f"M = d*b/{nbits} = {dim * bits / nbits:g} must divide d = {dim}"
            return
        self.index = (faiss.IndexPQ(dim, m, nbits, faiss.METRIC_INNER_PRODUCT) if nbits == 8 else
                      faiss.IndexPQFastScan(dim, m, nbits, faiss.METRIC_INNER_PRODUCT))
        self.bytes_per_vector = m * nbits / 8


class FaissRaBitQ(FaissMethod):
    trains = True  # computes a centroid (one mean vector); no k-means

    def __init__(self, bits, dim, qb):
        super().__init__(f"faiss-RaBitQ(qb={qb})", bits)
        import faiss
        self.rabitq = faiss.IndexRaBitQ(dim, faiss.METRIC_INNER_PRODUCT, bits)
        self.rabitq.qb = qb
        self.index = faiss.IndexPreTransform(faiss.RandomRotationMatrix(dim, dim), self.rabitq)
        self.bytes_per_vector = self.rabitq.code_size


class Padded(Method):
    """A peer that accepts only some dimensions runs on vectors zero-padded to the next one it accepts:
    inner products are unchanged, and the padding's cost shows in its measured bytes per vector."""

    pad_to: int | None = None

    def _pad(self, a):
        if self.pad_to is None:
            return a
        return np.ascontiguousarray(np.pad(a, ((0, 0), (0, self.pad_to - a.shape[1]))))


class TurboVec(Padded):
    def __init__(self, bits, dim):
        self.dim = dim if dim % 8 == 0 else dim + 8 - dim % 8  # it needs a multiple of 8
        super().__init__("turbovec" + ("" if self.dim == dim else f" (zero-padded to {self.dim}-d)"), bits)
        import turbovec
        self.mod = turbovec
        self.pad_to = None if self.dim == dim else self.dim
        if bits not in (1, 2, 3, 4):
            self.skip = "turbovec supports 1..4 bits"

    def build(self, x):
        x = self._pad(x)
        self.index = self.mod.TurboQuantIndex(self.dim, self.bits)
        self.index.add(x)
        self.index.prepare()
        n = len(x)
        # Serialised size minus that of an index holding half the rows: per-vector bytes, fixed parts cancel.
        half = self.mod.TurboQuantIndex(self.dim, self.bits)
        half.add(x[: n // 2])
        self.bytes_per_vector = (len(self.index.to_bytes()) - len(half.to_bytes())) / (n - n // 2)

    def search(self, q, k):
        return self.index.search(self._pad(q), k)[1]

    # turbovec's rotation is fixed (it takes no seed). Rotating the data by a seeded random orthogonal
    # matrix first leaves every inner product unchanged and composes with its rotation into another
    # random one: so its "seed s" is that, and its recall spread is measured like tqindex's.
    spread = True
    seeds = 1

    def ids_for_seed(self, seed, x, q, k):
        """Top-k ids of turbovec on the (padded) data rotated by a seeded Haar matrix (untimed)."""
        g = np.random.default_rng([7919, seed]).standard_normal((self.dim, self.dim))
        rot, r = np.linalg.qr(g)
        rot = (rot * np.sign(np.diag(r))).T.astype(np.float32)  # Haar-distributed orthogonal
        index = self.mod.TurboQuantIndex(self.dim, self.bits)
        index.add(np.ascontiguousarray(self._pad(x) @ rot.T))
        index.prepare()
        return index.search(np.ascontiguousarray(self._pad(q) @ rot.T), k)[1]


class RaBitQLib(Padded):
    """The official rabitqlib, as a flat scan: an IVF index with one list whose centroid is the mean."""

    trains = True  # the centroid is the data mean
    MIN_DIM = 64   # its FhtKac rotator rejects smaller dimensions

    def __init__(self, bits, dim):
        self.dim = max(dim, self.MIN_DIM)
        super().__init__("rabitqlib (1-list IVF" + ("" if self.dim == dim else f", zero-padded to {self.dim}-d") + ")",
                         bits)
        self.pad_to = None if self.dim == dim else self.dim
        try:
            import rabitqlib
        except ImportError:
            self.skip = "rabitqlib is not installed"
            return
        self.mod = rabitqlib
        try:
            rabitqlib.IvfIndex(self.dim, 16, 1, bits, metric="ip")
        except ValueError as exc:  # e.g. its rotator supports only some dimensions
            self.skip = f"rabitqlib: {exc} (d = {self.dim})"

    def _build(self, x):
        index = self.mod.IvfIndex(self.dim, len(x), 1, self.bits, metric="ip")
        index.build(x, x.mean(axis=0, keepdims=True), np.zeros(len(x), dtype=np.uint32), num_threads=self.threads)
        return index

    def build(self, x):
        import tempfile
        from pathlib import Path
        x = self._pad(x)
        self.index = self._build(x)
        # Saved size minus that of an index of half the rows: per-vector bytes, fixed parts cancel.
        with tempfile.TemporaryDirectory() as tmp:
            self.index.save(str(Path(tmp) / "full"))
            self._build(x[: len(x) // 2]).save(str(Path(tmp) / "half"))
            sizes = [sum(f.stat().st_size for f in Path(tmp, name).rglob("*")) if Path(tmp, name).is_dir()
                     else Path(tmp, name).stat().st_size for name in ("full", "half")]
        self.bytes_per_vector = (sizes[0] - sizes[1]) / (len(x) - len(x) // 2)

    def search(self, q, k):
        return self.index.search(self._pad(q), k, 1, num_threads=self.threads)[0]


def methods_for(bits: int, dim: int, args) -> list[Method]:
    out = [TQ(bits, dim), TQ(bits, dim, rescale=False), TQ(bits, dim, variant="prod"), TQ(bits, dim, center=True)]
    if bits in VQ_BITS:  # the paper's per-coordinate codebook, where the default's block codebook differs
        out.insert(1, TQ(bits, dim, codebook="scalar"))
    if not args.no_peers:
        out += [FaissRaBitQ(bits, dim, qb=8), FaissRaBitQ(bits, dim, qb=4), RaBitQLib(bits, dim), TurboVec(bits, dim),
                FaissPQ(bits, dim, nbits=8), FaissPQ(bits, dim, nbits=4)]
    out += [TQ(bits, dim, rerank=r) for r in args.rerank]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="dbpedia-titles-minilm-100k")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--rerank", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--repeat", type=int, default=3, help="timed searches per method (median)")
    parser.add_argument("--seeds", type=int, default=5,
                        help="tqindex-mse rows also report recall over rotation seeds 0..N-1 (1: off)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every method (default: all cores)")
    parser.add_argument("--no-peers", action="store_true", help="tqindex only (no faiss/turbovec)")
    parser.add_argument("--tag", default=None, help="suffix for the output file names")
    parser.add_argument("--k", type=int, default=10, help="k of the timed search (recall@10 from its first 10)")
    parser.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                        help="run only these methods (names as in the table, e.g. tqindex-mse turbovec)")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="rewrite the table of an earlier run from its JSON (no measurement)")
    args = parser.parse_args()
    if args.render:
        import json
        from pathlib import Path
        saved = json.loads(Path(args.render).read_text())
        ds = load_dataset(args.dataset)
        table = render_table(ds, saved["rows"], saved["n"], saved["queries"], saved["threads"], saved.get("k", 10),
                             command=saved["command"])
        Path(args.render).with_suffix(".md").write_text(table)
        print(table)
        return

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    RaBitQLib.threads = threads
    TQ.seeds = TurboVec.seeds = args.seeds
    try:
        import faiss
        faiss.omp_set_num_threads(threads)
    except ImportError:
        if not args.no_peers:
            raise SystemExit("faiss-cpu is not installed: pip install -e '.[bench]' (or pass --no-peers)")

    ds, x, q = load_ip_dataset(args.dataset)
    gt_ids, gt_scores = ds.groundtruth(100), ds.groundtruth_scores(100)
    print(f"{ds.name}: n={len(x)} d={x.shape[1]} queries={len(q)} metric={ds.metric} threads={threads}", flush=True)

    rows = []
    for bits in args.bits:
        for method in methods_for(bits, x.shape[1], args):
            if args.only is None or method.name in args.only or method.name.split(" (")[0] in args.only:
                rows.append(run_method(method, bits, x, q, gt_ids, gt_scores, args.repeat, args.k))
        # tqindex at each peer's own bytes per vector (fractional bits): the comparison at equal
        # memory, with the scale stored in float32 (a budget equal to tqindex's whole-bit size
        # already has its row) and in float16 (2 bytes more for codes).
        ours = next((r for r in rows if r["bits"] == bits and r["method"] == "tqindex-mse"), None)
        if ours is None:
            continue
        budgets = {}
        for r in rows:
            if r["bits"] == bits and not r["method"].startswith("tqindex") and "exact" not in r["method"] \
                    and "skipped" not in r:
                budgets.setdefault(_budget(r), r["method"].split("(")[0].strip())  # see _budget
        for budget, peer in sorted(budgets.items()):
            for scale_dtype in ("float32", "float16"):
                if scale_dtype == "float32" and budget == ours["bytes_per_vector"]:
                    continue
                try:
                    width = bits_for_bytes(x.shape[1], budget, scale_dtype=scale_dtype)
                except ValueError:  # not even 1 bit fits
                    continue
                if width in args.bits and scale_dtype == "float32":  # measured anyway (verdicts look across widths)
                    continue
                rows.append(run_method(TQ(bits, x.shape[1], width=width, budget_of=f"{budget} B = {peer}",
                                          scale_dtype=scale_dtype), bits, x, q, gt_ids, gt_scores, args.repeat, args.k))

    tag = ds.name + (f"-{args.tag}" if args.tag else "")
    table = render_table(ds, rows, len(x), len(q), threads, args.k)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"recall-{tag}.md").write_text(table)
    write_json(RESULTS / f"recall-{tag}.json", {"dataset": ds.name, "n": len(x), "dim": int(x.shape[1]),
                                                 "queries": len(q), "threads": threads, "k": args.k, "rows": rows})
    plot(rows, RESULTS / f"recall-{tag}.png", f"{ds.name} (n={len(x)}, d={x.shape[1]}): Recall@1@k")


def run_method(method, bits, x, q, gt_ids, gt_scores, repeat, k_timed=10) -> dict:
    row = {"method": method.name, "bits": bits}
    if method.skip:
        row["skipped"] = method.skip
        print(f"  {bits}-bit {method.name:<26} skipped: {method.skip}", flush=True)
        return row
    start = time.perf_counter()
    method.build(x)
    row["build_s"] = time.perf_counter() - start
    # QPS and recall@10 come from the timed search at k_timed (10 by default, ann-benchmarks' setting;
    # rerank m then rescores 10·m candidates); the Recall@1@k curve from one more search at k = 64
    # unless the timed one was that deep (not for rerank rows, whose candidates are sized for k).
    search_s, ids = median_time(lambda: method.search(q, k_timed), repeat)
    ids = np.asarray(ids)
    curve_ids = ids if getattr(method, "rerank", 0) or k_timed >= max(K_CURVE) else \
        np.asarray(method.search(q, max(K_CURVE)))
    row.update({
        "trains": method.trains, "bytes_per_vector": float(method.bytes_per_vector), "k": k_timed,
        "recall@10": recall_at_k(ids, gt_ids, 10, gt_scores, "ip"),
        "recall_1@10": recall_1_at_k(ids, gt_ids, 10),
        "recall_1@k": {k: recall_1_at_k(curve_ids, gt_ids, k) for k in K_CURVE if k <= curve_ids.shape[1]},
        "search_s": search_s, "qps": len(q) / search_s, "vectors_per_s": len(x) / row["build_s"]})
    if getattr(method, "spread", False) and method.seeds > 1:
        # Which rotation is drawn moves recall (most at small d); seed 0 is the default and the row's
        # figures, the others show how far another draw would be from it.
        others = [method.ids_for_seed(seed, x, q, 10) for seed in range(1, method.seeds)]
        row["seeds_recall@10"] = [row["recall@10"]] + [recall_at_k(i, gt_ids, 10, gt_scores, "ip") for i in others]
        row["seeds_recall_1@10"] = [row["recall_1@10"]] + [recall_1_at_k(i, gt_ids, 10) for i in others]
    print(f"  {bits}-bit {method.name:<26} R@10 {row['recall@10']:.4f}  R1@10 {row['recall_1@10']:.4f}  "
          f"B/vec {row['bytes_per_vector']:7.1f}  build {row['build_s']:7.2f}s  QPS {row['qps']:9.0f}", flush=True)
    return row


def render_table(ds, rows, n, nq, threads, k_timed=10, command=None) -> str:
    from common import command_line
    from tqindex import native
    lines = [f"`{command or command_line()}` — {ds.name}, n={n}, d={ds.dim}, {nq} queries, {threads} threads; recall@10 and "
             f"QPS from the same k={k_timed} batch search (median of timed runs); rerank rows rescore {k_timed}·m "
             f"candidates with float32 vectors kept beside the codes. tqindex native kernels: "
             f"{native.simd() or 'not built'}. Seeds: tqindex's figures are for rotation seed 0 (the default); "
             f"the last column gives recall@10 (and Recall@1@10) over seeds 0..N-1, min–max and mean, untimed "
             f"(turbovec, whose rotation is fixed: seed s > 0 is the data rotated first by a seeded random "
             f"orthogonal matrix).",
             "", "| bits | method | recall@10 | Recall@1@10 | bytes/vec | build s | vectors/s | QPS | training | "
             "over seeds |", "|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['bits']} | {r['method']} | n/a | n/a | | | | | {r['skipped']} | |")
            continue
        lines.append(f"| {r['bits']} | {r['method']} | {r['recall@10']:.4f} | {r['recall_1@10']:.4f} | "
                     f"{r['bytes_per_vector']:.1f} | {r['build_s']:.2f} | {r['vectors_per_s']:,.0f} | "
                     f"{r['qps']:,.0f} | {'yes' if r['trains'] else 'no'} | {_spread(r)} |")
    # Say plainly, per peer, how the best training-free tqindex without rerank that takes no more
    # memory compares, on recall and on speed. Any tqindex row qualifies, whatever its nominal width
    # (memory and recall are the criteria); rows of another width's section are marked as such.
    lines.append("")
    ours = [r for r in rows if r["method"].startswith("tqindex") and "rerank" not in r["method"]
            and "skipped" not in r and not r["trains"]]

    def label(r, bits):
        return r["method"] + ("" if r["bits"] == bits else f" [{r['bits']}-bit section]")

    for bits in sorted({r["bits"] for r in rows}):
        peers = [r for r in rows if r["bits"] == bits and not r["method"].startswith("tqindex") and "skipped" not in r
                 and "exact" not in r["method"]]
        for p in peers:
            fit = [r for r in ours if r["bytes_per_vector"] <= _budget(p)]
            head = f"- {bits} bits, {p['method']} ({p['bytes_per_vector']:.0f} B/vec, recall@10 {p['recall@10']:.4f}, " \
                   f"Recall@1@10 {p['recall_1@10']:.4f}, {p['qps']:,.0f} QPS" + \
                   (f"; over seeds {_spread(p)}" if "seeds_recall@10" in p else "") + "): "
            if not fit:
                lines.append(head + "no tqindex row fits its memory.")
                continue
            # Recall: one tqindex configuration within its memory must match it on both measures.
            both = [r for r in fit if r["recall@10"] >= p["recall@10"] and r["recall_1@10"] >= p["recall_1@10"]]
            best = max(both or fit, key=lambda r: (r["recall@10"], r["recall_1@10"]))
            text = head + ("recall at or above" if both else "recall BELOW") + \
                f" with {label(best, bits)} ({best['bytes_per_vector']:.0f} B: {best['recall@10']:.4f} / " \
                f"{best['recall_1@10']:.4f}" + (f"; over seeds {_spread(best)}" if "seeds_recall@10" in best else "") + "); "
            # Speed: the fastest tqindex configuration within its memory at equal or better recall@10.
            peers_recall = [r for r in fit if r["recall@10"] >= p["recall@10"]]
            if peers_recall:
                fast = max(peers_recall, key=lambda r: r["qps"])
                text += (f"at equal or better recall@10 the fastest is {label(fast, bits)}: QPS {fast['qps'] / p['qps']:.2f}x, "
                         f"indexing {fast['vectors_per_s'] / p['vectors_per_s']:.2f}x.")
            else:
                text += "no tqindex row within its memory reaches its recall@10, so no speed comparison."
            lines.append(text)
    return "\n".join(lines) + "\n"


def _budget(row) -> int:
    """A peer's bytes per vector in whole bytes. Serialised-size differences leave a few thousandths
    of a byte of fixed parts (turbovec: 17.9989 B for 14 B of codes + a 4-byte scale): rounded down
    after that margin."""
    return int(row["bytes_per_vector"] + 0.01)


def _spread(row) -> str:
    if "seeds_recall@10" not in row:
        return ""
    r10, r1 = row["seeds_recall@10"], row["seeds_recall_1@10"]
    return f"{min(r10):.4f}–{max(r10):.4f}, mean {np.mean(r10):.4f} ({min(r1):.3f}–{max(r1):.3f}, " \
           f"mean {np.mean(r1):.4f}; {len(r10)} seeds)"


def plot(rows, path, title) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    bits = sorted({r["bits"] for r in rows})
    fig, axes = plt.subplots(1, len(bits), figsize=(5 * len(bits), 4), squeeze=False)
    for ax, b in zip(axes[0], bits):
        for r in rows:
            if r["bits"] != b or "skipped" in r or "exact" in r["method"]:
                continue
            if "rerank" in r["method"]:
                continue
            ks = sorted(int(k) for k in r["recall_1@k"])
            ax.plot(ks, [r["recall_1@k"][k] for k in ks], marker="o", ms=3, label=r["method"],
                    linestyle="-" if r["method"].startswith("tqindex") else "--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("Recall@1@k")
        ax.set_title(f"{b} bits")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
