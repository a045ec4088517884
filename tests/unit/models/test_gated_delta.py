"""The gated DeltaNet layer (``models/layers/gated_delta.py``) against its own definitions.

The parity fixtures compare whole models with transformers on 7-token prompts. Here, at the
layer: the block inverse inverts; the chunked delta rule equals the token-by-token recurrence
(written out below) for chunk sizes and lengths that pad the last chunk; a prefill cut into
chunks equals one pass and the token-by-token decode, outputs and state alike; rows decoded
together equal each row alone; the state and the convolution tail both matter. Then the same
through Qwen3-Next's tiny model and the engine's store, rows of different lengths together.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from moeserve.models.cache import Recurrent
from moeserve.models.layers.gated_delta import (
    GatedDeltaConfig,
    GatedDeltaNet,
    _unit_lower_inverse,
    delta_rule,
    l2_normalize,
)
from tests.unit.models.cache.toy_models import close, forward, new_store, solo_run
from tests.unit.models.helpers import QWEN3_NEXT

CFG = GatedDeltaConfig(
    hidden_size=32, num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=6, chunk_size=8
)


class View:
    """The part of a cache view a recurrent layer uses: ``state``, read then assigned."""

    def __init__(self, state: list[mx.array]) -> None:
        self.state = state


def zero_view(batch: int, cfg: GatedDeltaConfig = CFG) -> View:
    return View([mx.zeros((batch, *shape)) for shape in GatedDeltaNet(cfg).cache_kind().shapes])


def slow(layer: GatedDeltaNet, seed: int = 0) -> GatedDeltaNet:
    """Decays of 0.6 to 0.99 a token, so the state carries across a test's tokens."""
    rng = np.random.default_rng(seed)
    layer.A_log = mx.array(np.log(rng.uniform(0.02, 0.4, layer.cfg.num_v_heads)), mx.float32)
    return layer


def make_layer(seed: int = 0) -> GatedDeltaNet:
    mx.random.seed(seed)
    layer = slow(GatedDeltaNet(CFG), seed)
    mx.eval(layer.parameters())
    return layer


def recurrence(q, k, v, g, beta, state):
    """The gated delta rule one token at a time, as the module docstring states it."""
    outs = []
    for t in range(q.shape[1]):
        state = state * mx.exp(g[:, t])[..., None, None]  # [B, H, Dk, Dv]
        kt = k[:, t][..., None]  # [B, H, Dk, 1]
        u = (v[:, t] - (state * kt).sum(axis=-2)) * beta[:, t][..., None]  # [B, H, Dv]
        state = state + kt * u[..., None, :]
        outs.append((state * q[:, t][..., None]).sum(axis=-2))
    return mx.stack(outs, axis=1), state


def delta_inputs(B: int, L: int, H: int = 3, Dk: int = 8, Dv: int = 5, seed: int = 0):
    mx.random.seed(seed)
    q = l2_normalize(mx.random.normal((B, L, H, Dk))) * Dk**-0.5
    k = l2_normalize(mx.random.normal((B, L, H, Dk)))
    v = mx.random.normal((B, L, H, Dv))
    g = -mx.random.uniform(0.0, 0.5, (B, L, H))
    beta = mx.random.uniform(0.0, 1.0, (B, L, H))
    state = mx.random.normal((B, H, Dk, Dv))
    return q, k, v, g, beta, state


@pytest.mark.parametrize("size", [1, 2, 8, 64])
def test_block_inverse_inverts_a_delta_rule_system(size: int) -> None:
    # The systems the rule solves: beta_t (k_t . k_j) below the diagonal, unit keys, and
    # here no decay, the hardest case (keys alike give the largest inverse entries).
    mx.random.seed(size)
    k = l2_normalize(mx.random.normal((3, size, 4)) + 1.0)
    beta = mx.random.uniform(0.0, 1.0, (3, size, 1))
    lower = mx.tril(mx.ones((size, size)), k=-1)
    a = (beta * k) @ k.swapaxes(-1, -2) * lower
    eye = mx.eye(size)
    inv = _unit_lower_inverse(a)
    assert mx.allclose((eye + a) @ inv, mx.broadcast_to(eye, a.shape), atol=1e-4).item()
    assert mx.array_equal(inv * (1 - mx.tril(mx.ones((size, size)))), mx.zeros_like(a)).item()


@pytest.mark.parametrize(("length", "chunk"), [(1, 64), (5, 64), (8, 4), (37, 8), (130, 64)])
def test_chunked_rule_equals_the_recurrence(length: int, chunk: int) -> None:
    q, k, v, g, beta, state = delta_inputs(2, length)
    want_out, want_state = recurrence(q, k, v, g, beta, state)
    out, new_state = delta_rule(q, k, v, g, beta, state, chunk)
    assert out.shape == want_out.shape
    assert mx.allclose(out, want_out, atol=1e-5).item()
    assert mx.allclose(new_state, want_state, atol=1e-5).item()


def test_prefill_in_chunks_equals_one_pass_and_token_by_token() -> None:
    layer = make_layer()
    x = mx.random.normal((1, 40, CFG.hidden_size))
    whole = zero_view(1)
    full = layer(x, None, whole)
    assert close(layer(x, None, None), full)  # stateless starts from zeros
    chunked = zero_view(1)
    cuts = [0, 13, 14, 29, 40]  # a 1-token chunk and a chunk below the chunk size
    parts = [layer(x[:, a:b], None, chunked) for a, b in itertools.pairwise(cuts)]
    stepped = zero_view(1)
    steps = [layer(x[:, t : t + 1], None, stepped) for t in range(40)]
    for outs, view in ((parts, chunked), (steps, stepped)):
        assert close(mx.concatenate(outs, axis=1), full)
        for got, want in zip(view.state, whole.state):
            assert close(got, want)


def test_rows_decoded_together_equal_each_row_alone() -> None:
    layer = make_layer(1)
    lengths, steps = (5, 11, 20), 4
    rng = np.random.default_rng(2)
    prompts = [mx.array(rng.standard_normal((1, n, CFG.hidden_size)), mx.float32) for n in lengths]
    tokens = mx.array(rng.standard_normal((3, steps, CFG.hidden_size)), mx.float32)
    views = [zero_view(1) for _ in lengths]
    for prompt, view in zip(prompts, views):
        layer(prompt, None, view)
    batch = View([mx.concatenate(parts, axis=0) for parts in zip(*(v.state for v in views))])
    together = [layer(tokens[:, t : t + 1], None, batch) for t in range(steps)]
    for b, view in enumerate(views):
        alone = [layer(tokens[b : b + 1, t : t + 1], None, view) for t in range(steps)]
        assert close(mx.concatenate(together, axis=1)[b], mx.concatenate(alone, axis=1)[0])


def test_the_matrix_state_and_the_convolution_tail_both_matter() -> None:
    layer = make_layer(3)
    x = mx.random.normal((1, 12, CFG.hidden_size))
    view = zero_view(1)
    layer(x[:, :11], None, view)
    tail, state = view.state
    want = layer(x[:, 11:], None, View([tail, state]))
    for cleared in ([mx.zeros_like(tail), state], [tail, mx.zeros_like(state)]):
        assert not close(layer(x[:, 11:], None, View(cleared)), want, atol=1e-3)


def test_cache_kind_and_value_head_grouping_are_checked() -> None:
    kind = GatedDeltaNet(CFG).cache_kind()
    assert kind == Recurrent(((3, 2 * 16 + 24), (4, 8, 6)))
    with pytest.raises(ValueError, match="value heads"):
        GatedDeltaNet(
            GatedDeltaConfig(32, num_k_heads=3, num_v_heads=4, head_k_dim=8, head_v_dim=6)
        )
    with pytest.raises(ValueError, match="power of two"):
        GatedDeltaConfig(32, 2, num_v_heads=4, head_k_dim=8, head_v_dim=6, chunk_size=24)


def test_qwen3_next_rows_of_different_lengths_decode_together_through_the_store() -> None:
    # The real model and the engine's store: one row per prefill pass, then every row's
    # next token in one pass, against each row alone in its own store.
    model = QWEN3_NEXT.model()
    for i, layer in enumerate(model.layers):
        if "linear_attn" in layer:
            slow(layer.linear_attn, seed=i)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 96, n).tolist() for n in (3, 9, 17)]
    decoded = rng.integers(0, 96, (3, 3)).tolist()
    store = new_store(model)
    ids = [f"row{i}" for i in range(3)]
    for seq_id, prompt in zip(ids, prompts):
        store.add(seq_id)
        forward(model, store, [seq_id], [prompt])
    together = [forward(model, store, ids, [[row[t]] for row in decoded]) for t in range(3)]
    for b, (prompt, row) in enumerate(zip(prompts, decoded)):
        alone = solo_run(model, prompt, row)[1:]
        for t in range(3):
            assert close(together[t][b, -1], alone[t])
