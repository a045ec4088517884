"""``bench.llamacpp.publisher_checkpoint``: the MLX-layout bench checkpoint in publisher layout.

Checks on a tiny seeded Qwen2-MoE that every routed expert becomes its own tensor, that the
copy loads in moeserve to exactly the same parameters, and that only ``norm_topk_prob``
changes in the config (stock llama.cpp qwen2moe does not renormalise the top-k weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from bench.llamacpp import publisher_checkpoint
from moeserve.devtools.demo import CheckpointSpec, build_checkpoint
from moeserve.models.loader import load


def test_publisher_copy_loads_to_the_same_parameters(tmp_path: Path) -> None:
    spec = CheckpointSpec(num_experts=4, num_experts_per_tok=2, vocab_size=300)
    src = build_checkpoint(tmp_path / "mlx", spec)
    dst = publisher_checkpoint(src, tmp_path / "publisher")

    names = set(mx.load(str(dst / "model.safetensors")))
    assert not any(".switch_mlp." in n for n in names)
    for e in range(spec.num_experts):
        assert f"model.layers.1.mlp.experts.{e}.down_proj.weight" in names

    a = dict(tree_flatten(load(src).model.parameters()))
    b = dict(tree_flatten(load(dst).model.parameters()))
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert mx.array_equal(value, b[name]).item(), name

    before = json.loads((src / "config.json").read_text())
    after = json.loads((dst / "config.json").read_text())
    assert before.pop("norm_topk_prob") is True and after.pop("norm_topk_prob") is False
    assert before == after
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
