import json

import numpy as np

from tqindex import Index
from tqindex.cli import main
from tqindex.datasets import write_ann_benchmarks


def test_bench_on_a_small_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 32))
    x = (centres[rng.integers(0, 50, 3000)] + 0.5 * rng.standard_normal((3000, 32))).astype(np.float32)
    q = (centres[rng.integers(0, 50, 40)] + 0.5 * rng.standard_normal((40, 32))).astype(np.float32)
    path = tmp_path / "small-32-ip.hdf5"
    write_ann_benchmarks(path, x, q, "ip", k=100)
    out_json = tmp_path / "report.json"
    assert main(["bench", "--dataset", str(path), "--bits", "4", "--repeat", "1", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "recall@10" in printed and "bytes/vector 20" in printed and "QPS" in printed
    report = json.loads(out_json.read_text())
    assert report["n"] == 3000 and report["queries"] == 40 and report["bytes_per_vector"] == 20
    # A 4-bit index of well-separated clusters finds most true neighbours; a broken scan would not.
    assert report["recall@10"] > 0.8 and report["recall@100"] > 0.8
    assert main(["bench", "--dataset", str(path), "--variant", "prod", "--bits", "3", "--rerank", "4",
                 "--repeat", "1"]) == 0
    assert "rerank x4" in capsys.readouterr().out
    assert main(["bench", "--dataset", str(path), "--bits", "4", "--scale-dtype", "float16", "--repeat", "1"]) == 0
    assert "bytes/vector 18" in capsys.readouterr().out


def test_info_describes_a_saved_index(tmp_path, capsys):
    index = Index(dim=8, bits=2, metric="l2")
    index.add(np.ones((3, 8), dtype=np.float32))
    index.save(tmp_path / "ix")
    index.close()
    assert main(["info", str(tmp_path / "ix")]) == 0
    printed = capsys.readouterr().out
    assert "n=3" in printed and '"metric": "l2"' in printed
