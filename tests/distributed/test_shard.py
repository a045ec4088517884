"""Each rank's part of a model, checked in one process without any communication.

Pipeline: the ranks' layer slices, loaded from the checkpoint by name, run one after the other
give the whole model's logits. Tensor: for every layer, the ranks' partial attention and
feed-forward outputs add up to the whole layer's (what ``all_sum`` does across processes).
The step message survives its encoding.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import pytest

from moeserve.models.loader import load
from moeserve.models.shard import PipelineShard, TensorShard, causal_lm, layer_range
from moeserve.server.distributed.tensor import _local_experts
from moeserve.server.distributed.wire import STEP, Message
from moeserve.server.engine.runner import ChunkWork, StepWork
from tests.distributed.checkpoints import FIXTURES, NEWER_FAMILIES, ORIGINAL_FAMILIES

FAMILIES = ORIGINAL_FAMILIES + NEWER_FAMILIES

TOKENS = mx.array([[3, 17, 42, 99, 5, 64]], dtype=mx.int32)


@pytest.mark.parametrize(("layers", "size"), [(2, 2), (7, 3), (61, 4), (4, 4)])
def test_layer_ranges_cover_every_layer_once(layers: int, size: int) -> None:
    ranges = [layer_range(layers, r, size) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    lengths = [end - start for start, end in ranges]
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1


def test_more_ranks_than_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be split"):
        layer_range(2, 0, 3)


def _run_layers(lm, h: mx.array) -> mx.array:
    for layer in lm.layers:
        h = layer(h, "causal", None)
    return h


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_slices_chain_to_the_whole_model(family: str) -> None:
    path = FIXTURES / f"{family}_a" / "hf"
    whole = load(path).model
    parts = [load(path, shard=PipelineShard(r, 2)).model for r in range(2)]
    first, second = causal_lm(parts[0])[1], causal_lm(parts[1])[1]
    assert "lm_head" not in second and second.stack.names.embedding not in second.stack
    stack = first.stack
    h = stack.embedding(TOKENS)
    if stack.embedding_scale is not None:
        h = h * stack.embedding_scale
    h = _run_layers(second, _run_layers(first, h))
    logits = first.logits(stack[stack.names.norm](h))
    assert mx.allclose(logits, whole(TOKENS), atol=1e-4).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parts_sum_to_each_whole_layer(family: str) -> None:
    path = FIXTURES / f"{family}_a" / "hf"
    whole = causal_lm(load(path).model)[1]
    shards = [TensorShard(r, 2) for r in range(2)]
    parts = [causal_lm(load(path, shard=s).model)[1] for s in shards]
    assert shards[0].summed, "nothing was split"
    for shard, part in zip(shards, parts):
        modules = dict(part.named_modules())
        for glu, (first, count) in shard.experts.items():
            _local_experts(modules[glu], first, count)
    x = mx.random.normal((1, TOKENS.shape[1], whole.stack.embedding.weight.shape[1]))
    for i, layer in enumerate(whole.layers):
        for path_name in shards[0].summed:
            prefix = f"{part_prefix(part)}{i}."
            if not path_name.startswith(prefix):
                continue
            sub = path_name[len(prefix) :]
            want = _call(layer, sub, x)
            got = sum(_call(p.layers[i], sub, x) for p in parts)
            assert mx.allclose(got, want, atol=1e-4).item(), f"layer {i} {sub}"


def part_prefix(lm) -> str:
    """The parameter prefix of a CausalLM's layers, e.g. ``model.layers.``."""
    return f"{lm.stack_name}.{lm.stack.names.layers}."


def _call(layer, sub: str, x: mx.array) -> mx.array:
    """Run what ``sub`` names in a layer on ``x``.

    An attention's output projection stands for the whole attention (its heads are split).
    """
    from moeserve.models.layers.attention import Attention

    module = layer
    for name in sub.split(".")[:-1]:
        module = module[name]
    if isinstance(module, Attention):
        return module(x, "causal", None)
    return module[sub.split(".")[-1]](x.reshape(-1, x.shape[-1]))


def test_step_message_round_trips() -> None:
    work = StepWork(
        leaving=["a-0"],
        chunks=[ChunkWork("b-0", [1, 2, 3], 3, True, True, True)],
        decodes={"c-0": 7, "c-1": 9},
    )
    message = Message(STEP, work, [["snap", "a-0", 4], ["drop", 2]])
    back = Message.decode(message.encode())
    assert back == message
