"""The step message rank 0 broadcasts, and its encoding as bytes.

A ``Message`` is what every rank needs to run one step on its shard: the runner's
``StepWork`` (leavers, prefill chunks with their tokens, the decode rows' last tokens, which
carry the tokens rank 0 sampled in the step before), and the prompt-cache operations that
happened on rank 0 since the last message, in order:

- ``("snap", seq_id, key)``: keep a copy of this sequence's cache under ``key`` (rank 0 stored
  its own part in the prompt cache);
- ``("adopt", seq_id, key, length)``: start this sequence from entry ``key``'s first
  ``length`` positions (a prompt-cache hit);
- ``("drop", key)``: entry ``key`` left rank 0's prompt cache;
- ``("save", key, name, tokens)``: write this rank's part of entry ``key`` (covering
  ``tokens``) to file ``name`` in this rank's prompt-cache directory (rank 0 queued its own);
- ``("delete", name)``: delete this rank's file ``name`` (rank 0 deleted its own).

Admissions, aborts and preemptions need no operation of their own: they show up as chunks
and leavers. ``kind`` is ``step``, ``ping`` (idle: proves the ranks alive; it also carries
operations that must not wait for the next step), ``stop`` (with the last operations), or
``ask``: the last operation is then a question that every rank answers with one int, which
rank 0 collects with ``Link.gather_ints`` right after the broadcast:

- ``("load", key, name, digest)``: read this rank's part of a session from file ``name``
  into entry ``key``; 1 if it is there and covers the tokens ``digest`` names, else 0. A rank
  keeps it only if every rank answered 1 (else the hit is a miss everywhere);
- ``("usable", key, length)``: the longest prefix of at most ``length`` positions that this
  rank's layers can resume from entry ``key`` (0 if it holds no such entry).

JSON keeps it readable in a log; a step's message is a few hundred bytes plus its tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from moeserve.server.engine.runner import ChunkWork, StepWork

STEP, PING, STOP, ASK = "step", "ping", "stop", "ask"


@dataclass
class Message:
    """One broadcast."""

    kind: str = STEP
    work: StepWork = field(default_factory=StepWork)
    ops: list[list[Any]] = field(default_factory=list)

    def encode(self) -> bytes:
        """The message as UTF-8 JSON.

        Returns:
            The bytes.
        """
        w = self.work
        chunks = [[c.seq_id, c.tokens, c.end, c.is_last, c.samples, c.first] for c in w.chunks]
        body = {"k": self.kind, "o": self.ops, "l": w.leaving, "c": chunks, "d": w.decodes}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Message:
        """Parse what ``encode`` made.

        Args:
            data: The bytes.

        Returns:
            The message.
        """
        body = json.loads(data)
        chunks = [ChunkWork(*c) for c in body["c"]]
        work = StepWork(leaving=body["l"], chunks=chunks, decodes=body["d"])
        return cls(body["k"], work, body["o"])
