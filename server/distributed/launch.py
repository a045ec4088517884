"""Starting a distributed server: joining the group, loading a rank's part, the handshake.

``moeserve serve --distributed pipeline|tensor`` under ``mlx.launch`` runs one process per
rank. Every process calls ``join`` first (this process's group, kept for the rest of the
process as MLX keeps its own). Rank 0 then goes on to serve HTTP as a single server does,
loading its part through ``rank_shard`` / ``attach`` and running a ``DistributedEngine``;
every other rank calls ``run_follower``, which loads its part the same way and replays rank
0's steps, and opens no port.

``attach`` is the startup handshake (after every rank loaded): each rank reports its layers
or experts and its weight bytes, and rank 0 reports the activations' dtype and the hidden
size that pipeline hand-offs need, and its doorbell's port and token (``doorbell``), which
the others then connect to. ``summary`` turns the reports into the startup line.
``prompt_cache_files`` says where each rank keeps its part of the persisted prompt cache.

A rank other than 0 given SIGTERM (``mlx.launch`` and process-group kills signal every rank)
stays until rank 0's ``stop``, which carries the session files rank 0 saved while it
drained, and writes its queued files before it leaves; if no ``stop`` comes within
``SIGTERM_GRACE_SECONDS`` it leaves anyway.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from moeserve.models.loader import LoadedModel, load
from moeserve.models.shard import PipelineShard, Shard, causal_lm
from moeserve.server.distributed import doorbell
from moeserve.server.distributed.link import Link, init_group
from moeserve.server.distributed.rank_cache import RankEntries, rank_files
from moeserve.server.engine.prompt_cache import SHUTDOWN_FLUSH_SECONDS
from moeserve.server.settings import Settings

logger = logging.getLogger("moeserve.distributed")

_DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# How long a rank other than 0 waits for rank 0's stop after a SIGTERM.
SIGTERM_GRACE_SECONDS = 30.0
_LINK: Link | None = None  # this process's group (set once by ``join``)
_REPORTS: list[list[int]] = []  # every rank's handshake report, by rank


def join(settings: Settings) -> Link:
    """Join the group ``mlx.launch`` set up; every rank calls this first.

    Args:
        settings: With ``distributed`` set.

    Returns:
        The link.

    Raises:
        RuntimeError: Not started by ``mlx.launch`` with two or more ranks.
    """
    global _LINK
    _LINK = Link(init_group(), timeout=settings.distributed_timeout_seconds)
    return _LINK


def link() -> Link:
    """The link ``join`` made (rank 0's startup and engine use it).

    Returns:
        The link.
    """
    if _LINK is None:
        raise RuntimeError("join() has not been called")
    return _LINK


def rank_shard(settings: Settings) -> Shard | None:
    """The part of the model this rank loads, or None when not distributed.

    Args:
        settings: The server settings.

    Returns:
        The shard for ``models.loader.load``.
    """
    if settings.distributed is None:
        return None
    group = link()
    if settings.distributed == "pipeline":
        return PipelineShard(group.rank, group.size)
    from moeserve.models.shard import TensorShard

    return TensorShard(group.rank, group.size)


def _weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def attach(loaded: LoadedModel, shard: Shard) -> nn.Module:
    """The handshake, then the rank's model with its communication (every rank calls it).

    Args:
        loaded: This rank's loaded part.
        shard: What ``rank_shard`` gave the loader.

    Returns:
        The model the runner drives.
    """
    group = link()
    lm = causal_lm(loaded.model)[1]
    dtype_code, hidden = 0, 0
    if group.rank == 0:
        dtype_code = _DTYPES.index(lm.cache_dtype())
        hidden = lm.stack[lm.stack.names.norm].weight.shape[-1]
    first, last, experts = _extent(shard)
    host = doorbell.rank0_host()
    listener = doorbell.Listener(host) if group.rank == 0 else None
    bell = [listener.port, listener.token] if listener is not None else [0, 0]
    mine = [first, last, experts, _weight_bytes(loaded.model), os.getpid(), dtype_code, hidden]
    _REPORTS[:] = group.gather_ints([*mine, *bell])
    dtype, hidden = _DTYPES[_REPORTS[0][5]], _REPORTS[0][6]
    port, token = _REPORTS[0][7], _REPORTS[0][8]

    def agree(ok: int) -> list[int]:
        return [row[0] for row in group.gather_ints([ok], "the doorbell handshake")]

    group.doorbell = doorbell.open_doorbell(
        group.rank, group.size, listener, (host, port, token), agree
    )
    if isinstance(shard, PipelineShard):
        from moeserve.server.distributed.pipeline import PipelineModel

        return PipelineModel(loaded.model, shard, group, dtype, hidden)
    from moeserve.server.distributed.tensor import TensorModel

    return TensorModel(loaded.model, shard, group)


def prompt_cache_files(settings: Settings, fingerprint: str) -> tuple[Path | None, str]:
    """This rank's prompt-cache directory and fingerprint (``rank_cache.rank_files``).

    Args:
        settings: With ``distributed`` set.
        fingerprint: The model's (``startup.weights_fingerprint``).

    Returns:
        ``(directory, fingerprint)``; the directory is None without ``prompt_cache_dir``.
    """
    group = link()
    if not settings.prompt_cache or settings.prompt_cache_dir is None:
        return None, fingerprint
    mode = settings.distributed or ""
    return rank_files(settings.prompt_cache_dir, fingerprint, mode, group.rank, group.size)


def _extent(shard: Shard) -> tuple[int, int, int]:
    """(first layer, one past the last, experts held per MoE layer; 0: all) of a shard."""
    if isinstance(shard, PipelineShard):
        return shard.start, shard.end, 0
    return 0, 0, getattr(shard, "experts_held", 0)


def summary(mode: str) -> str:
    """The distributed part of the startup line: world size, mode, each rank's part.

    Args:
        mode: ``pipeline`` or ``tensor``.

    Returns:
        E.g. ``distributed pipeline over 2 ranks: rank 0 layers 0-11, 1.2 GiB (pid 7); ...``.
    """
    from moeserve.server.startup import format_bytes

    parts = []
    for rank, (first, last, experts, nbytes, pid, *_rest) in enumerate(_REPORTS):
        held = (
            f"layers {first}-{last - 1}"
            if mode == "pipeline"
            else (f"{experts} experts per MoE layer" if experts else "heads and columns")
        )
        parts.append(f"rank {rank} {held}, weights {format_bytes(nbytes)} (pid {pid})")
    return f"distributed {mode} over {len(_REPORTS)} ranks: " + "; ".join(parts)


def run_follower(settings: Settings) -> int:
    """A rank other than 0: load its part, shake hands, replay steps; no port is opened.

    Args:
        settings: The server settings (model, dtype, distributed, kv_cache_bits).

    Returns:
        The exit status.
    """
    from moeserve.devtools.demo import demo_model_dir
    from moeserve.server.distributed.engine import follow
    from moeserve.server.engine.runner import Runner
    from moeserve.server.startup import apply_compute_settings, weights_fingerprint

    group = link()
    apply_compute_settings(settings)
    shard = rank_shard(settings)
    source = settings.model if settings.model is not None else demo_model_dir()
    loaded = load(source, dtype=settings.resolved_dtype(), shard=shard)
    model = attach(loaded, shard)
    logger.info("rank %d: %s", group.rank, summary(settings.distributed or ""))
    runner = Runner(model, kv_bits=settings.kv_cache_bits)
    directory, fingerprint = None, ""
    if settings.prompt_cache and settings.prompt_cache_dir is not None:
        fingerprint = weights_fingerprint(loaded, settings.resolved_dtype())
        directory, fingerprint = prompt_cache_files(settings, fingerprint)
    wait = min(SHUTDOWN_FLUSH_SECONDS, settings.distributed_timeout_seconds / 2)
    cache = RankEntries(runner, directory, fingerprint, settings.prompt_cache_max_bytes, wait)
    signal.signal(signal.SIGTERM, _stay_for_stop)
    return follow(runner, group, cache)


def _stay_for_stop(signum: int, frame: object) -> None:
    """SIGTERM on a rank other than 0: wait for rank 0's stop, but not for ever."""

    def leave() -> None:
        time.sleep(SIGTERM_GRACE_SECONDS)
        logger.warning("rank %d: no stop from rank 0 after SIGTERM; exiting", link().rank)
        os._exit(1)

    threading.Thread(target=leave, daemon=True).start()
