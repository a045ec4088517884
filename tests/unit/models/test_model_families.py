"""Checks every model family must pass, each on its tiny config (``helpers.FAMILIES``).

``from_dict`` names a missing required key; decoding token by token through the KV cache
gives the logits of one full forward pass.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from moeserve.models.errors import ConfigError
from tests.unit.models.helpers import FAMILIES, Family

each_family = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)


@each_family
def test_from_dict_names_a_missing_key(family: Family) -> None:
    config = {k: v for k, v in family.config.items() if k != family.missing_key}
    with pytest.raises(ConfigError, match=family.missing_key):
        family.module.ModelArgs.from_dict(config)


@each_family
def test_incremental_decoding_matches_the_full_forward(family: Family) -> None:
    model = family.model(**family.decode_over)
    ids = mx.array(family.decode_ids)
    full = model(ids)
    cache = model.make_cache()
    steps = [model(ids[:, :4], cache)] + [model(ids[:, t : t + 1], cache) for t in range(4, 7)]
    assert mx.allclose(mx.concatenate(steps, axis=1), full, atol=1e-4).item()
    # Without the cache the last token alone sees no context: the check above is not vacuous.
    assert not mx.allclose(model(ids[:, 6:7])[:, 0], full[:, 6], atol=1e-4).item()
