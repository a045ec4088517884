"""moeserve's serving side: HTTP API, engine, tokenizer, settings.

Importing ``models`` first lets it pick the BLAS before anything here imports ``mlx.core``
(see ``models/backend/blas.py``).
"""

import moeserve.models  # noqa: F401
