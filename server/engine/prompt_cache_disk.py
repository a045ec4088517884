"""The prompt cache's files: safetensors written from plain bytes, in the background.

A persisted session is one safetensors file: an 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`` padded with spaces to
8 bytes, then the raw tensor bytes. ``mx.load`` reads it back (``server/engine/kv_io.load``).

``Writer`` is a small daemon thread with a queue of pending writes, one per file: a newer
write for the same file replaces one still waiting, and the bytes waiting are bounded (over
the bound a write is refused, and the caller keeps its entry as unsaved). Each write goes to
a hidden temporary file next to its target and is renamed over it (``os.replace``), so a
crash or ``kill -9`` never leaves a torn file under a real name, only a hidden one that
``remove_stale_temps`` deletes at the next startup.

Knows bytes, paths and threads. It never calls MLX (only the engine thread may): the engine
turns arrays into bytes first (``kv_io.tensors``). It knows nothing of sessions or lookups.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

Tensor = tuple[str, list[int], bytes]  # safetensors dtype name ("F32", "BF16"), shape, data
TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """The hidden file a write of ``path`` goes through.

    Args:
        path: The target file.

    Returns:
        ``.<name>.tmp`` in the same directory (same filesystem, so the rename is atomic).
    """
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def encode(tensors: dict[str, Tensor], metadata: dict[str, str]) -> list[bytes]:
    """Lay tensors out as a safetensors file.

    Args:
        tensors: Name -> ``(dtype, shape, data)``.
        metadata: String metadata.

    Returns:
        The file's pieces in order (header length, header, each tensor's data).
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    # ensure_ascii keeps any odd character in the metadata a valid JSON escape.
    text = json.dumps(header, separators=(",", ":")).encode("ascii")
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return [len(text).to_bytes(8, "little"), text, *(data for _, _, data in tensors.values())]


def write_temp(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file under its hidden temporary name, flushed to the disk.

    Args:
        path: The target file (its directory is created when missing).
        tensors: Name -> ``(dtype, shape, data)``.
        metadata: String metadata.

    Returns:
        The temporary file; renaming it to ``path`` publishes it.

    Raises:
        OSError: The disk refused.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with tmp.open("wb") as f:
        for piece in encode(tensors, metadata):
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())  # the rename must never publish a file the disk lacks
    return tmp


def read_metadata(path: Path) -> tuple[dict[str, str], int, float]:
    """Read a safetensors file's metadata without its tensors.

    Args:
        path: The file.

    Returns:
        ``(metadata, size in bytes, modification time)``.

    Raises:
        Exception: The file is truncated, not safetensors, or unreadable.
    """
    from moeserve.models.loader import check_safetensors

    check_safetensors(path)
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(size)).get("__metadata__", {})
    stat = path.stat()
    return meta, stat.st_size, stat.st_mtime


def remove_stale_temps(directory: Path) -> int:
    """Delete hidden leftovers of writes a crash interrupted.

    Args:
        directory: The prompt-cache directory.

    Returns:
        How many files were removed.
    """
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.glob(".*"):
        # ".x.safetensors" is the temporary name older versions used.
        if path.is_file() and path.name.endswith((TEMP_SUFFIX, ".safetensors")):
            try:
                path.unlink()
                removed += 1
            except OSError as e:
                logger.warning("prompt cache: could not remove %s: %s", path, e)
    if removed:
        logger.info("prompt cache: removed %d unfinished write(s) in %s", removed, directory)
    return removed


@dataclass
class _Job:
    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    nbytes: int
    cancelled: bool = False


class Writer:
    """Writes files on a background thread, newest write per file only.

    Args:
        max_pending_bytes: Bytes allowed to wait; ``submit`` refuses beyond this.
    """

    def __init__(self, max_pending_bytes: int) -> None:
        self.max_pending_bytes = max_pending_bytes
        self._cond = threading.Condition()
        self._pending: dict[Path, _Job] = {}
        self._inflight: _Job | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.written = 0  # files completed, for tests and logs

    def submit(self, path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> bool:
        """Queue a write of ``path``, replacing any write of it still waiting.

        Args:
            path: The target file.
            tensors: Name -> ``(dtype, shape, data)`` (plain bytes, owned by the writer now).
            metadata: String metadata.

        Returns:
            Whether it was queued (False: closed, or too many bytes already waiting).
        """
        nbytes = sum(len(data) for _, _, data in tensors.values())
        with self._cond:
            if self._closing:
                return False
            old = self._pending.pop(path, None)
            waiting = sum(j.nbytes for j in self._pending.values())
            if waiting + nbytes > self.max_pending_bytes and waiting:
                if old is not None:
                    self._pending[path] = old
                return False
            self._pending[path] = _Job(path, tensors, metadata, nbytes)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="moeserve-prompt-cache-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        return True

    def discard(self, path: Path) -> None:
        """Cancel writes of ``path`` and delete the file (after a write in progress ends).

        Args:
            path: The file.
        """
        with self._cond:
            self._pending.pop(path, None)
            if self._inflight is not None and self._inflight.path == path:
                self._inflight.cancelled = True
            # Under the lock: a write in progress renames only while holding it, so the file
            # cannot come back after this.
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                logger.warning("prompt cache: could not remove %s: %s", path, e)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is on disk.

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            Whether the queue drained.
        """
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._pending and self._inflight is None, timeout
            )

    def wait(self, path: Path, timeout: float | None = None) -> bool:
        """Wait until no write of ``path`` is queued or in progress.

        Args:
            path: The file.
            timeout: Seconds to wait at most.

        Returns:
            Whether the file is current.
        """

        def settled() -> bool:
            busy = self._inflight is not None and self._inflight.path == path
            return path not in self._pending and not busy

        with self._cond:
            return self._cond.wait_for(settled, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, then stop the thread.

        Args:
            timeout: Seconds to wait for the queue at most.
        """
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return
                path = next(iter(self._pending))
                job = self._inflight = self._pending.pop(path)
            try:
                self._write(job)
            except Exception as e:  # a failed write loses one file, never the thread
                logger.warning("prompt cache: could not write %s: %s", job.path, e)
                temp_path(job.path).unlink(missing_ok=True)
            finally:
                with self._cond:
                    self._inflight = None
                    self._cond.notify_all()

    def _write(self, job: _Job) -> None:
        tmp = write_temp(job.path, job.tensors, job.metadata)
        with self._cond:  # see discard: the rename and a cancellation never interleave
            if job.cancelled:
                tmp.unlink(missing_ok=True)
                return
            os.replace(tmp, job.path)
            self.written += 1
