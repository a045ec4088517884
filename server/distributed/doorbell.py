"""The doorbell: lets an idle rank sleep in the kernel instead of spinning in a collective.

MLX's ring backend waits for a collective's data by polling its sockets, so a rank that sits
in the step broadcast while rank 0 has no work keeps a core busy for as long as the server is
idle. The doorbell is one plain TCP connection from every other rank to rank 0. When rank 0
marks a broadcast idle (``Link.broadcast(..., idle=True)``: a ping while it waits for work),
the other ranks block in ``recv`` on the doorbell before entering the next collective, and
rank 0 writes one byte to each doorbell just before that broadcast. Busy steps never touch
it, so serving costs nothing extra; a closed doorbell means a peer is gone, as a failed
collective does.

Rank 0's address comes from what ``mlx.launch`` gave the ranks: the ring backend's hostfile
(``MLX_HOSTFILE``, rank 0's first ``ip:port``) or JACCL's coordinator
(``MLX_JACCL_COORDINATOR``). Where neither is set (MPI), or a rank cannot connect, every rank
agrees to go without it (``open_doorbell`` returns None everywhere) and waits as before.
The connections are made during the startup handshake (``launch.attach``): rank 0 listens
only until every rank has connected and shown the handshake's random token. It knows
sockets and the launcher's environment; it does not know MLX's collectives or messages.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable

logger = logging.getLogger("moeserve.distributed")

# Seconds rank 0 waits for every rank to connect, and a rank waits for its connect.
CONNECT_SECONDS = 30.0
_HELLO = struct.Struct("<qi")  # the handshake token, then the connecting rank


def rank0_host(env: dict[str, str] | None = None) -> str | None:
    """Rank 0's address as the launcher gave it, or None when it did not say.

    Args:
        env: The environment to read (default: this process's).

    Returns:
        An IP address (or host name) the other ranks reach rank 0 at.
    """
    env = os.environ if env is None else env
    coordinator = env.get("MLX_JACCL_COORDINATOR", "")
    if coordinator:
        return coordinator.rsplit(":", 1)[0]
    hostfile = env.get("MLX_HOSTFILE", "")
    if not hostfile:
        return None
    try:
        with open(hostfile) as f:
            hosts = json.load(f)
        first = hosts[0][0] if isinstance(hosts[0], list) else hosts[0]
        return str(first).rsplit(":", 1)[0]
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        logger.warning("doorbell: cannot read rank 0's address from %s", hostfile)
        return None


class Listener:
    """Rank 0's side during the handshake: a listening socket and the token to show.

    Args:
        host: The address to listen on (rank 0's address from the launcher), or None.
    """

    def __init__(self, host: str | None) -> None:
        self.token = secrets.randbits(62) if host else 0
        self.sock: socket.socket | None = None
        self.port = 0
        if host:
            try:
                self.sock = socket.create_server((host, 0), backlog=64)
                self.port = self.sock.getsockname()[1]
            except OSError as e:
                logger.warning("doorbell: cannot listen on %s (%s); ranks will poll", host, e)

    def accept(self, peers: int) -> list[socket.socket] | None:
        """Take every other rank's connection, checking its token, then stop listening.

        Args:
            peers: How many ranks connect (the group's size minus one).

        Returns:
            The connections of ranks 1 to ``peers``, in rank order, or None if one failed.
        """
        if self.sock is None:
            return None
        conns: dict[int, socket.socket] = {}
        self.sock.settimeout(CONNECT_SECONDS)
        try:
            while len(conns) < peers:
                conn, _ = self.sock.accept()
                conn.settimeout(CONNECT_SECONDS)
                hello = conn.recv(_HELLO.size, socket.MSG_WAITALL)
                if len(hello) != _HELLO.size:
                    conn.close()  # closed before saying who it is
                    continue
                token, rank = _HELLO.unpack(hello)
                if token != self.token or not 0 < rank <= peers or rank in conns:
                    conn.close()  # not one of ours
                    continue
                conns[rank] = conn
        except OSError as e:
            logger.warning("doorbell: %d of %d ranks connected (%s)", len(conns), peers, e)
            for conn in conns.values():
                conn.close()
            return None
        finally:
            self.sock.close()
        return [conns[r] for r in range(1, peers + 1)]


def connect(host: str, port: int, token: int, rank: int) -> socket.socket | None:
    """A rank's side: connect to rank 0's doorbell and show the token.

    Args:
        host: Rank 0's address.
        port: Its doorbell port (0: rank 0 has none).
        token: The handshake's token.
        rank: This rank.

    Returns:
        The connection, or None if it failed.
    """
    if not port:
        return None
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_SECONDS)
        sock.sendall(_HELLO.pack(token, rank))
    except OSError as e:
        logger.warning("doorbell: rank %d cannot reach %s:%d (%s)", rank, host, port, e)
        return None
    return sock


class Doorbell:
    """The connections once made: rank 0 rings every rank; the others wait for the ring.

    Args:
        socks: Rank 0: one connection per other rank; another rank: its one connection.
    """

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        for sock in socks:
            sock.settimeout(None)  # waiting is bounded by the link's watchdog
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def ring(self) -> None:
        """Rank 0: wake every rank before the broadcast that follows an idle one.

        Raises:
            RuntimeError: A rank's doorbell is closed (the rank is gone).
        """
        for sock in self.socks:
            try:
                sock.sendall(b"\x01")
            except OSError as e:
                raise RuntimeError(f"a rank's doorbell is closed ({e})") from e

    def wait(self) -> None:
        """Another rank: sleep until rank 0 rings.

        Raises:
            RuntimeError: Rank 0 closed the doorbell (it is gone).
        """
        try:
            data = self.socks[0].recv(1)
        except OSError as e:
            raise RuntimeError(f"rank 0's doorbell failed ({e})") from e
        if not data:
            raise RuntimeError("rank 0 closed the doorbell")

    def close(self) -> None:
        """Close the connections."""
        for sock in self.socks:
            sock.close()


def open_doorbell(
    rank: int,
    size: int,
    listener: Listener | None,
    rank0: tuple[str | None, int, int],
    agree: Callable[[int], list[int]],
) -> Doorbell | None:
    """Make the connections after the handshake told every rank the port and token.

    Args:
        rank: This rank.
        size: The group's size.
        listener: Rank 0's listener (None on other ranks).
        rank0: (rank 0's address, doorbell port, token) as the handshake carried them.
        agree: Gathers one int from every rank (``Link.gather_ints``), so that the doorbell
            is used only if every rank has it.

    Returns:
        The doorbell, or None on every rank if any rank lacks it.
    """
    host, port, token = rank0
    socks: list[socket.socket] | None
    if rank == 0:
        socks = listener.accept(size - 1) if listener is not None else None
    else:
        one = connect(host, port, token, rank) if host else None
        socks = [one] if one is not None else None
    if min(agree(1 if socks else 0)) == 0:
        for sock in socks or []:
            sock.close()
        if port:
            logger.warning("doorbell: not every rank connected; idle ranks will poll")
        return None
    return Doorbell(socks)  # type: ignore[arg-type]
