"""The test session keeps moeserve's cache (demo model, BLAS shim) out of the user's home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moeserve.devtools.demo import demo_model_dir
from moeserve.models.backend import blas


def test_the_cache_directory_is_temporary() -> None:
    cache = Path(os.environ["MOESERVE_CACHE_DIR"]).resolve()
    assert cache.is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert not cache.is_relative_to((Path.home() / ".cache").resolve())
    # Both writers read it: the demo model and the compiled shim go there.
    assert blas._cache_dir().resolve() == cache
    assert demo_model_dir().resolve().parent == cache
