"""Counting the host memory an index holds, each buffer once (views, shared arrays and Arrow buffers
included)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

__all__ = ["held_bytes"]


def held_bytes(value, seen: set | None = None) -> int:
    """Bytes of the numpy arrays, CPU tensors and pyarrow Tables in `value` (nested in dicts, tuples
    and lists), counting each owning buffer once: a view counts as the array that owns its memory, and
    buffers whose ids are in `seen` (updated) are not counted again."""
    seen = set() if seen is None else seen
    if isinstance(value, dict):
        return sum(held_bytes(item, seen) for item in value.values())
    if isinstance(value, (tuple, list)):
        return sum(held_bytes(item, seen) for item in value)
    if isinstance(value, np.ndarray):
        while isinstance(value.base, np.ndarray):  # a view: count the array that owns the memory
            value = value.base
        key = ("np", id(value))
        if key in seen:
            return 0
        seen.add(key)
        return value.nbytes
    if isinstance(value, pa.Table):  # its buffers (memory-mapped ones included), by address
        total = 0
        for column in value.columns:
            for chunk in column.chunks:
                for buf in chunk.buffers():
                    if buf is not None and ("arrow", buf.address) not in seen:
                        seen.add(("arrow", buf.address))
                        total += buf.size
        return total
    if isinstance(value, torch.Tensor) and value.device.type == "cpu":
        key = ("ptr", value.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    return 0
