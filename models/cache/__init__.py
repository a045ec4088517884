"""Cache state of running sequences: kinds per layer, paged storage, per-pass views.

``kinds`` says what a layer keeps (full, sliding, latent, recurrent) and what a row costs;
``pool`` and ``store`` hold every running row's state in blocks and slots that follow the
tokens held; ``views`` is what one forward pass writes into and reads from. See each module.
"""

from moeserve.models.cache.kinds import (
    BLOCK,
    CacheKind,
    CacheLayout,
    Full,
    Latent,
    Recurrent,
    Sliding,
)
from moeserve.models.cache.store import CacheStore, Row, Snapshot
from moeserve.models.cache.views import LayerView, SequenceCache, StepCache

__all__ = [
    "BLOCK",
    "CacheKind",
    "CacheLayout",
    "CacheStore",
    "Full",
    "Latent",
    "LayerView",
    "Recurrent",
    "Row",
    "SequenceCache",
    "Sliding",
    "Snapshot",
    "StepCache",
]
