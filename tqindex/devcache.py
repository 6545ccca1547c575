"""Per-device copies of constant tensors (rotation matrices, codebook tables): made once per device."""

from __future__ import annotations

import threading
from typing import Callable

import torch

__all__ = ["PerDevice"]


class PerDevice:
    """Lazily built values keyed by torch device.

    ``cache.get(device)`` returns ``make(device)``, computed once per device (thread-safe).
    """

    def __init__(self, make: Callable[[torch.device], object]):
        self._make = make
        self._values: dict[torch.device, object] = {}
        self._lock = threading.Lock()

    def get(self, device) -> object:
        device = torch.device(device)
        value = self._values.get(device)
        if value is None:
            with self._lock:
                value = self._values.get(device)
                if value is None:
                    value = self._values[device] = self._make(device)
        return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
