"""Benchmarks: checkpoints, load generators and comparisons (see bench/RESULTS.md).

Importing ``models`` first lets it choose the BLAS before any benchmark imports ``mlx.core``.
"""

import moeserve.models  # noqa: F401
