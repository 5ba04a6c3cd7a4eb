"""flnode: federated learning with no central server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__version__ = "0.1.0"


def load_model(home: str | Path, height: int | None = None) -> dict[str, np.ndarray]:
    """The committed global model of `height` (default: the tip) of a node home, as name -> float32 array, after
    its hash is checked against the chain (raises flnode.node.export.ExportError otherwise)."""
    from flnode.node.export import load_model as load

    return load(home, height)


__all__ = ["__version__", "load_model"]
