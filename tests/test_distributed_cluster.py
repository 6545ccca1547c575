"""tqindex.distributed on a real two-node Ray cluster on this machine: `ray start --head` plus a second
`ray start --address` (separate processes and object stores), loopback only."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'tqindex[ray]'")

import tqindex.distributed as td  # noqa: E402
from tqindex import Index  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args, timeout=180):
    # One authentication mode for both nodes and this driver: with RAY_AUTH_MODE unset, Ray 2.60 gives
    # a head token mode when ~/.ray/auth_token exists, but never a node or driver that joins by address,
    # which then cannot connect. Unset here means disabled (a loopback cluster that lives for one test);
    # an earlier local ray.init() in this process set it to "token", and then all three use tokens.
    # Workers at the driver's priority, as in test_distributed (Ray's default niceness of 15 starves them on
    # a busy machine).
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_worker_niceness": "0"}
    return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if not Path(RAY).exists() and not shutil.which("ray"):
        pytest.skip("the ray command line is not installed")
    ray.shutdown()  # a local Ray started by another test module
    port = _free_port()
    common = ["--num-cpus=2", "--object-store-memory=150000000", "--disable-usage-stats"]
    head = _ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                *common)
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        worker = _ray("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", *common)
        assert worker.returncode == 0, worker.stderr[-2000:]
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        _ray("stop", "--force")


def test_actors_on_two_nodes_answer_like_one_index(two_nodes, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 16)).astype(np.float32)
    q = rng.standard_normal((10, 16)).astype(np.float32)
    td.build(x, tmp_path / "ix", dim=16, bits=4, seed=2, block_rows=1000)
    index = td.DistributedIndex.open(tmp_path / "ix")             # one actor per node by default
    try:
        nodes = ray.get([a.node.remote() for a in index._actors])
        assert len(nodes) == 2 and len(set(nodes)) == 2            # spread over both nodes
        single = Index(dim=16, bits=4, seed=2)
        single.add(x)
        got, want = index.search(q, 10), single.search(q, 10)
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(np.sort(got.ids, axis=1), np.sort(want.ids, axis=1))
        extra = rng.standard_normal((600, 16)).astype(np.float32)
        index.add(extra)                                           # 300 rows to each node's share
        index.remove(np.arange(0, 4000, 9))
        single.add(extra)
        single.remove(np.arange(0, 4000, 9))
        index.save()                                               # both nodes write; one commit
        loaded = Index.load(tmp_path / "ix")
        np.testing.assert_array_equal(loaded.select(), single.select())
        np.testing.assert_array_equal(loaded.search(q, 10).scores, single.search(q, 10).scores)
        np.testing.assert_array_equal(index.search(q, 10).scores, want := single.search(q, 10).scores)
    finally:
        index.close()
