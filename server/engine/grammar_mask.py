"""The allowed-token mask of a batch, from its rows' grammar matchers (``grammar.Matcher``).

Each step, the rows with a constraint get one bit per token from llguidance (filled together,
in parallel native threads, straight into one host bitmask), the other rows all ones; the
device unpacks the bitmask once. Ids the tokenizer does not have (a padded embedding) are
never allowed; ids the model has no row for (a checkpoint whose ``vocab_size`` is smaller
than its tokenizer's) cannot be, so a row whose grammar allows only those fails with a
message naming the cause instead of sampling from nothing. It knows bitmasks and matchers;
it does not compile grammars or decide what a failed row means for its request.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence

import llguidance
import mlx.core as mx

from moeserve.server.engine.grammar import Matcher

logger = logging.getLogger(__name__)


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


def allowed_mask(matchers: Sequence[Matcher | None], vocab_size: int) -> mx.array | None:
    """The allowed-token mask of a batch: grammar rows from their matchers, others all-True.

    Every row is packed on the host into one bitmask of ``vocab_size`` bits a row: constrained
    rows are filled together (in parallel native threads) by llguidance, unconstrained and
    failed rows are all ones, ids past the tokenizer's vocabulary (a padded embedding) are
    zeros. The device then unpacks it once, in one compiled kernel: at a 151,936-token
    vocabulary a per-row concatenate-and-gather on the device cost as much as the unpacking.
    A row whose matcher fails, or allows only ids at or past ``vocab_size``, is left
    all-True; its matcher's ``error`` tells the engine to fail it.

    Args:
        matchers: One entry per batch row; None for rows without a constraint.
        vocab_size: V of the logits (may exceed the tokenizer's vocabulary).

    Returns:
        bool ``[B, V]``, or None when no row is constrained (unconstrained batches pay nothing).
    """
    rows = [(i, m) for i, m in enumerate(matchers) if m is not None and m.error is None]
    if not rows:
        return None
    tok_vocab, row_bytes = rows[0][1].vocab_size, rows[0][1].mask_bytes  # llguidance's size
    bitmask = bytearray(b"\xff" * (len(matchers) * row_bytes))
    _fill([m for _, m in rows], bitmask, row_bytes, [i for i, _ in rows])
    for i, m in rows:
        if m.error is None and m.inner.is_error():
            m.fail(m.inner.get_error())
        if (
            m.error is None
            and vocab_size < tok_vocab
            and _none_below(bitmask, i, row_bytes, vocab_size)
        ):
            m.fail(
                f"the grammar allows only token ids the model has no embedding row for "
                f"(it has {vocab_size}, the tokenizer {tok_vocab}); check the checkpoint's "
                "vocab_size"
            )
        if m.error is not None:
            bitmask[i * row_bytes : (i + 1) * row_bytes] = b"\xff" * row_bytes
        else:  # ids past the tokenizer (a padded embedding) are never grammar
            _clear_bits(bitmask, i * row_bytes, tok_vocab, row_bytes * 8)
    packed = mx.array(memoryview(bitmask)).reshape(len(matchers), row_bytes)  # uint8 [B, V/8]
    mask = _unpack(packed)
    if vocab_size <= row_bytes * 8:
        return mask[:, :vocab_size]
    free = mx.array([m is None or m.error is not None for m in matchers])[:, None]
    return mx.concatenate(
        [mask, mx.broadcast_to(free, (len(matchers), vocab_size - row_bytes * 8))], 1
    )


@mx.compile
def _unpack(packed: mx.array) -> mx.array:
    """Bool [B, 8 * bytes]: bit ``t % 8`` of byte ``t // 8`` is token t (little-endian)."""
    bit_values = mx.array([1 << b for b in range(8)], dtype=mx.uint8)
    return ((packed[:, :, None] & bit_values) != 0).reshape(packed.shape[0], -1)


def _clear_bits(bitmask: bytearray, offset: int, start: int, stop: int) -> None:
    """Zero bits [start, stop) of the row at byte ``offset``."""
    first_full = (start + 7) // 8
    for t in range(start, min(stop, first_full * 8)):
        bitmask[offset + t // 8] &= ~(1 << (t % 8)) & 0xFF
    end = offset + stop // 8
    bitmask[offset + first_full : end] = bytes(end - offset - first_full)


def _fill(matchers: list[Matcher], bitmask: bytearray, row_bytes: int, slots: list[int]) -> None:
    """Fill bitmask row ``slots[k]`` from ``matchers[k]``; on an error, retry row by row.

    Retrying isolates a matcher whose native code raised. Row r starts at byte
    ``r * row_bytes``; bit ``t % 8`` of its byte ``t // 8`` is token t.
    """
    count = len(bitmask) // row_bytes
    address = ctypes.addressof((ctypes.c_char * len(bitmask)).from_buffer(bitmask))
    try:
        jobs = [(m.inner, r) for m, r in zip(matchers, slots)]
        _executor().unsafe_compute_mask_ptr(jobs, address, row_bytes, count)
        return
    except Exception:  # one bad matcher must not take the batch down
        logger.exception("batched grammar mask failed; retrying row by row")
    for m, r in zip(matchers, slots):
        try:
            _executor().unsafe_compute_mask_ptr([(m.inner, r)], address, row_bytes, count)
        except Exception as e:
            m.fail(str(e))


def _none_below(bitmask: bytearray, row: int, row_bytes: int, stop: int) -> bool:
    """Whether row ``row`` allows no token id below ``stop``."""
    offset = row * row_bytes
    whole = stop // 8
    if bitmask[offset : offset + whole] != bytes(whole):
        return False
    return not any(bitmask[offset + whole] >> b & 1 for b in range(stop % 8))
