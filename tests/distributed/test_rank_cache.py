"""A follower's part of the prompt cache, without a group: its files and its answers.

``RankEntries`` is driven here with the operations and questions rank 0 would send
(``server/distributed/wire.py``); the runner is a stand-in, since only the usable-length
question asks it anything. The two-rank tests (``test_distributed_prompt_cache.py``) cover
the same through ``mlx.launch``; these cover the refusals one by one, in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from moeserve.models.cache import Snapshot
from moeserve.server.distributed.rank_cache import RankEntries, rank_files, tokens_digest

TOKENS = [5, 6, 7, 8]


class _Store:
    """What a ``usable`` question reads of the runner: at most 3 positions resume."""

    def usable_length(self, snap: Snapshot, length: int) -> int:
        return min(length, 3)


class _Runner:
    store = _Store()


def _entries(directory: Path | None, fingerprint: str = "fp") -> RankEntries:
    return RankEntries(_Runner(), directory, fingerprint)  # type: ignore[arg-type]


def _snapshot() -> Snapshot:
    keys = mx.arange(2 * len(TOKENS) * 3, dtype=mx.float32).reshape(1, 2, len(TOKENS), 3)
    return Snapshot(len(TOKENS), [(keys, keys + 1)], [0])


def _saved(tmp_path: Path, fingerprint: str = "fp") -> Path:
    """Save entry 1 as ``s.safetensors`` from a rank with ``fingerprint``; its directory."""
    rank = _entries(tmp_path, fingerprint)
    rank.entries[1] = _snapshot()
    rank.apply(["save", 1, "s.safetensors", TOKENS])
    rank.close()
    return tmp_path


def _ask(rank: RankEntries, question: list[Any], others: list[int]) -> int:
    answer = rank.answer(question)
    rank.settle(question, [answer, *others])
    return answer


def test_files_are_keyed_by_mode_rank_and_world_size(tmp_path: Path) -> None:
    layouts = [("pipeline", 1, 2), ("tensor", 1, 2), ("pipeline", 0, 2), ("pipeline", 1, 4)]
    made = [rank_files(tmp_path, "model", *layout) for layout in layouts]
    assert made[0][0] == tmp_path / "pipeline-rank1-of-2"
    assert len({d for d, _ in made}) == len({f for _, f in made}) == 4


def test_a_saved_part_loads_back_under_rank_0s_key(tmp_path: Path) -> None:
    rank = _entries(_saved(tmp_path))
    assert _ask(rank, ["load", 9, "s.safetensors", tokens_digest(TOKENS)], [1]) == 1
    assert mx.array_equal(rank.entries[9].layers[0][1], _snapshot().layers[0][1])
    assert rank.answer(["usable", 9, 4]) == 3  # asks the runner's store
    assert rank.answer(["usable", 8, 4]) == 0  # an entry it never held


def test_a_part_is_dropped_when_another_rank_could_not_load_its_own(tmp_path: Path) -> None:
    rank = _entries(_saved(tmp_path))
    assert _ask(rank, ["load", 9, "s.safetensors", tokens_digest(TOKENS)], [0]) == 1
    assert 9 not in rank.entries


def test_missing_foreign_or_other_parts_are_misses(tmp_path: Path) -> None:
    digest = tokens_digest(TOKENS)
    rank = _entries(_saved(tmp_path))
    assert _ask(rank, ["load", 9, "gone.safetensors", digest], [1]) == 0
    assert _ask(rank, ["load", 9, "s.safetensors", tokens_digest([5, 6])], [1]) == 0
    assert _entries(tmp_path, "other layout").answer(["load", 9, "s.safetensors", digest]) == 0
    (tmp_path / "s.safetensors").write_bytes(b"not safetensors")
    assert _ask(rank, ["load", 9, "s.safetensors", digest], [1]) == 0
    assert _entries(None).answer(["load", 9, "s.safetensors", digest]) == 0
    assert not rank.entries


def test_delete_removes_the_part_and_saves_never_leave_the_directory(tmp_path: Path) -> None:
    rank = _entries(_saved(tmp_path))
    rank.entries[2] = _snapshot()
    rank.apply(["save", 2, "../escape.safetensors", TOKENS])
    rank.apply(["save", 3, "never-held.safetensors", TOKENS])  # no entry 3: nothing written
    rank.apply(["delete", "s.safetensors"])
    rank.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape.safetensors"]
