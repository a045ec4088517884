"""MLX model code for Mixture-of-Experts language models: layers, architectures, loading.

Knows nothing of HTTP, sessions or chat templates (see the architecture section of the README).
"""

# First: the backend chooses the BLAS before anything loads mlx.core (models/backend/blas.py).
from moeserve.models import backend  # noqa: F401, I001

from moeserve.models.loader import load, load_model

__all__ = ["load", "load_model"]
