"""RMSNorm as a module: ``nn.RMSNorm``'s parameter, computed by ``models.backend.rms_norm``.

The backend's result is bitwise ``mx.fast.rms_norm``'s; on the CPU it takes fewer graph ops
(``models/backend/fastmath.py``). This module knows only the parameter and the call.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from moeserve.models import backend


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter, same output) through ``models.backend.rms_norm``."""

    def __call__(self, x: mx.array) -> mx.array:
        """Normalise the last axis.

        Args:
            x: ``[..., dims]``.

        Returns:
            Same shape.
        """
        return backend.rms_norm(x, self["weight"], self.eps)
