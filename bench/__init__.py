"""Benchmarks: checkpoints, load generators and comparisons (see bench/RESULTS.md).

Importing ``moeserve.models`` first lets it choose the BLAS before a benchmark imports MLX.
"""

import moeserve.models  # noqa: F401
