"""Fork-server for the crash-safety test (tests/test_storage.py).

Started once; imports tqindex (which costs seconds), then for each "go <save> <phase>" line on stdin
forks a child that opens the index directory and commits batches in a loop. When the child's
<save>-th save reaches <phase> (one of PHASES), it prints "stop <phase>" and stops itself with
SIGSTOP, so the parent's SIGKILL lands exactly there, whatever the machine's speed. A phase the
save does not pass through (no garbage to collect, say) stops it at "returned" instead. After each
save returns the child prints "commit <m>" (m = number of batches committed). The server prints
"pid <pid>" after forking and "dead" once the child is reaped. Forking after import but before any
torch op is safe: torch's thread pools start lazily, in the child.
"""

import os
import signal
import sys

import numpy as np

from tqindex import Index, storage

DIM, BITS, BATCH = 16, 3, 37
PARAMS = dict(dim=DIM, bits=BITS, variant="mse", metric="ip", seed=11, keep_vectors=True)

#: Where a child can be stopped, in the order a save passes them. "opened": before its first step;
#: "shard": after the save's first shard file is written and fsynced; "shards-done": every new file
#: written, the manifest not yet; "manifest-tmp": the new manifest written to its temporary name;
#: "renamed": the manifest renamed into place (committed), old files not yet removed; "gc": the first
#: superseded file removed; "returned": save() has returned, its "commit" line not yet printed.
PHASES = ("opened", "shard", "shards-done", "manifest-tmp", "renamed", "gc", "returned")
#: The phases at which a commit is under way (the interesting kills).
MID_COMMIT = ("shard", "shards-done", "manifest-tmp", "renamed", "gc")


def batch(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((BATCH, DIM)).astype(np.float32)


def metadata(i: int) -> dict:
    """Batch i's payload: each row's text names its id, so a row and its payload can be matched."""
    ids = range(i * BATCH, (i + 1) * BATCH)
    return {"text": [f"row {j}" for j in ids], "batch": [i] * BATCH}


def apply_step(index: Index, i: int) -> None:
    """The deterministic i-th step: add batch i with its payload; every 3rd step remove 5 rows of
    the previous batch; every 7th step compact."""
    index.add(batch(i), metadata=metadata(i))
    if i % 3 == 2:
        index.remove(np.arange((i - 1) * BATCH, (i - 1) * BATCH + 5))
    if i % 7 == 6:
        index.compact()


def say(line: str) -> None:
    """One write(2) per line: a pipe write under PIPE_BUF bytes is atomic, so a child killed at any
    moment leaves either its whole line or none of it (print() may split text and newline)."""
    os.write(1, (line + "\n").encode())


class _Stopper:
    """Stops the process (SIGSTOP) when save number `target` reaches `phase`."""

    def __init__(self, target: int, phase: str):
        self.target, self.phase, self.save = target, phase, 0

    def at(self, phase: str) -> None:
        if self.save == self.target and phase == self.phase:
            self.stop(phase)

    @staticmethod
    def stop(phase: str) -> None:
        say(f"stop {phase}")
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(3)  # only reached if the parent continued us instead of killing: a test bug

    def install(self) -> None:
        """Wrap the storage steps that mark each phase (the child is a throwaway process)."""
        write_table, write_durable = storage._write_table, storage._write_durable
        fsync_dir, unlink = storage._fsync_dir, storage._unlink_quietly

        def _write_table(*args, **kwargs):
            entry = write_table(*args, **kwargs)
            self.at("shard")
            return entry

        def _write_durable(path, data):
            write_durable(path, data)
            if path.name.startswith(storage.MANIFEST):
                self.at("manifest-tmp")

        def _fsync_dir(path):
            fsync_dir(path)
            self.at("shards-done" if path.name == storage.SHARDS else "renamed")

        def _unlink_quietly(path):
            unlink(path)
            self.at("gc")

        storage._write_table, storage._write_durable = _write_table, _write_durable
        storage._fsync_dir, storage._unlink_quietly = _fsync_dir, _unlink_quietly


def child(path: str, target: int, phase: str) -> None:
    import torch
    torch.set_num_threads(1)
    stopper = _Stopper(target, phase)
    stopper.install()
    index = Index.open(path, **PARAMS)  # on a new directory this commits an empty index: save 0
    if phase == "opened":
        stopper.stop("opened")
    while True:
        i = index.next_id // BATCH
        apply_step(index, i)
        stopper.save += 1
        index.save()
        if stopper.save == target:  # the chosen phase was not on this save's path
            stopper.stop("returned")
        say(f"commit {i + 1}")


def main() -> None:
    path = sys.argv[1]
    say("ready")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "go":
            break
        pid = os.fork()
        if pid == 0:
            try:
                child(path, int(words[1]), words[2])
            finally:
                os._exit(1)
        say(f"pid {pid}")
        os.waitpid(pid, 0)
        say("dead")


if __name__ == "__main__":
    main()
