"""Developer tools that ship with moeserve but are not part of serving a request.

``demo.py`` builds the seeded demo checkpoint (what ``moeserve serve`` runs with no
``--model``), ``tokenizer_build.py`` trains its byte-level BPE tokenizer, and ``loadgen.py`` is
``moeserve bench``, a load generator for any OpenAI-compatible server (one measured request
in ``loadgen_request.py``, the report in ``loadgen_report.py``).
"""
