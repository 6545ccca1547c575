"""Fork-server for the crash-safety test (tests/test_storage.py).

Started once; imports tqindex (which costs seconds), then for each "go" line on stdin forks a child
that opens the index directory and commits batches in a loop until it is SIGKILLed, printing
"commit <m>" after each save returns (m = number of batches committed). The server prints
"pid <pid>" after forking and "dead" once the child is reaped. Forking after import but before any
torch op is safe: torch's thread pools start lazily, in the child.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tqindex import Index  # noqa: E402

DIM, BITS, BATCH = 16, 3, 37
PARAMS = dict(dim=DIM, bits=BITS, variant="mse", metric="ip", seed=11, keep_vectors=True)


def batch(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((BATCH, DIM)).astype(np.float32)


def apply_step(index: Index, i: int) -> None:
    """The deterministic i-th step: add batch i; every 3rd step remove 5 rows of the previous
    batch; every 7th step compact."""
    index.add(batch(i))
    if i % 3 == 2:
        index.remove(np.arange((i - 1) * BATCH, (i - 1) * BATCH + 5))
    if i % 7 == 6:
        index.compact()


def say(line: str) -> None:
    """One write(2) per line: a pipe write under PIPE_BUF bytes is atomic, so a child killed at any
    moment leaves either its whole line or none of it (print() may split text and newline)."""
    os.write(1, (line + "\n").encode())


def child(path: str) -> None:
    import torch
    torch.set_num_threads(1)
    index = Index.open(path, **PARAMS)
    while True:
        i = index.next_id // BATCH
        apply_step(index, i)
        index.save()
        say(f"commit {i + 1}")


def main() -> None:
    path = sys.argv[1]
    say("ready")
    for line in sys.stdin:
        if line.strip() != "go":
            break
        pid = os.fork()
        if pid == 0:
            try:
                child(path)
            finally:
                os._exit(1)
        say(f"pid {pid}")
        os.waitpid(pid, 0)
        say("dead")


if __name__ == "__main__":
    main()
