"""The doorbell's sockets and handshake, with threads standing in for the ranks.

Rank 0's address comes from the launcher's environment (ring hostfile or JACCL
coordinator); the connections need the handshake's token; every rank gets a doorbell or none
does; a ring wakes a waiting rank, and a closed doorbell is an error on the other side. The
two-rank idle test (``test_distributed_http``) shows what it is for.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from moeserve.server.distributed import doorbell
from moeserve.server.distributed.doorbell import Doorbell, Listener, open_doorbell


def test_rank0_host_from_the_launchers_environment(tmp_path: Path) -> None:
    ring = tmp_path / "hosts.json"
    ring.write_text(json.dumps([["10.0.0.5:5000", "10.0.1.5:5001"], ["10.0.0.6:5002"]]))
    assert doorbell.rank0_host({"MLX_HOSTFILE": str(ring)}) == "10.0.0.5"
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(["127.0.0.1:5000", "127.0.0.1:5001"]))
    assert doorbell.rank0_host({"MLX_HOSTFILE": str(plain)}) == "127.0.0.1"
    jaccl = {"MLX_JACCL_COORDINATOR": "192.168.2.1:32323", "MLX_HOSTFILE": str(ring)}
    assert doorbell.rank0_host(jaccl) == "192.168.2.1"
    assert doorbell.rank0_host({}) is None  # MPI: the launcher did not say
    broken = tmp_path / "broken.json"
    broken.write_text("[]")
    assert doorbell.rank0_host({"MLX_HOSTFILE": str(broken)}) is None
    assert doorbell.rank0_host({"MLX_HOSTFILE": str(tmp_path / "missing.json")}) is None


class _Agreement:
    """``Link.gather_ints`` for threads: every rank's one int, once all have given theirs."""

    def __init__(self, size: int) -> None:
        self.values = [0] * size
        self.barrier = threading.Barrier(size, timeout=60)

    def of(self, rank: int):
        def agree(ok: int) -> list[int]:
            self.values[rank] = ok
            self.barrier.wait()
            return list(self.values)

        return agree


def _open_all(size: int, tokens: dict[int, int] | None = None) -> list[Doorbell | None]:
    """Every rank's ``open_doorbell`` on loopback, each in its thread; by rank."""
    listener = Listener("127.0.0.1")
    agreement = _Agreement(size)
    out: list[Doorbell | None] = [None] * size

    def run(rank: int) -> None:
        token = (tokens or {}).get(rank, listener.token)
        rank0 = ("127.0.0.1", listener.port, token)
        mine = listener if rank == 0 else None
        out[rank] = open_doorbell(rank, size, mine, rank0, agreement.of(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return out


def test_every_rank_connects_and_a_ring_wakes_each_waiting_rank() -> None:
    bells = _open_all(3)
    assert all(b is not None for b in bells)
    assert len(bells[0].socks) == 2  # rank 0 holds one connection per other rank
    woke = []

    def wait(rank: int) -> None:
        bells[rank].wait()
        woke.append(rank)

    waiters = [threading.Thread(target=wait, args=(r,)) for r in (1, 2)]
    for t in waiters:
        t.start()
    bells[0].ring()
    for t in waiters:
        t.join(10)
    assert sorted(woke) == [1, 2]
    for b in bells:
        b.close()


def test_a_wrong_token_leaves_every_rank_without_a_doorbell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(doorbell, "CONNECT_SECONDS", 2.0)  # rank 0 stops waiting sooner
    bells = _open_all(2, tokens={1: 12345})
    assert bells == [None, None]


def test_no_port_means_no_doorbell_anywhere() -> None:
    agreement = _Agreement(2)
    out: list[Doorbell | None] = [None, None]

    def run(rank: int) -> None:
        listener = Listener(None) if rank == 0 else None
        out[rank] = open_doorbell(rank, 2, listener, (None, 0, 0), agreement.of(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == [None, None]


def test_a_closed_doorbell_is_an_error_on_the_other_side() -> None:
    bells = _open_all(2)
    bells[0].close()  # rank 0 is gone
    with pytest.raises(RuntimeError, match="closed the doorbell"):
        bells[1].wait()
    bells = _open_all(2)
    bells[1].close()  # rank 1 is gone: rank 0's ring fails once the reset has come back
    with pytest.raises(RuntimeError, match="doorbell is closed"):
        for _ in range(100):
            bells[0].ring()
            time.sleep(0.01)
