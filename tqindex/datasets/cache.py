"""Where downloaded and generated datasets are cached."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """Where built datasets are cached: $TQINDEX_CACHE, else ~/.cache/tqindex."""
    return Path(os.environ.get("TQINDEX_CACHE", Path.home() / ".cache" / "tqindex"))


# -- exact search and recall ---------------------------------------------------------------------
