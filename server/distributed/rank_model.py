"""What a rank's model answers the engine the same way in both modes: the family's facts.

``PipelineModel`` and ``TensorModel`` wrap the loaded model (as ``models.shard`` prepared it
for this rank) and give the runner the model protocol of ``models.base``. The family's
``ModelArgs``, model type, decoder layers and cache kinds come straight from the wrapped
``CausalLM`` in both; what differs (the forward pass, the cache dtype and layout) is each
mode's own. Knows the wrapping; not the modes.
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from moeserve.models.cache import CacheKind
from moeserve.models.shard import causal_lm
from moeserve.server.distributed.link import Link


class RankModel(nn.Module):
    """The wrapped model and what is asked of it unchanged.

    Args:
        model: The model as the loader prepared it for this rank.
        link: The group.
    """

    def __init__(self, model: nn.Module, link: Link) -> None:
        super().__init__()
        self.inner = model
        self._lm = causal_lm(model)[1]
        self._link = link

    @property
    def args(self) -> Any:
        """The family's ``ModelArgs``."""
        return self._lm.args

    @property
    def model_type(self) -> str:
        """The registered model type."""
        return self._lm.model_type

    @property
    def layers(self) -> list[nn.Module]:
        """The decoder layers this rank runs (its slice, or its part of each)."""
        return self._lm.layers

    def cache_kinds(self) -> list[CacheKind]:
        """What this rank's layers keep."""
        return self._lm.cache_kinds()
