"""The routes: one module per API, and ``common.py`` for the generation plumbing they share."""
