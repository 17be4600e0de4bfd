"""The ``aligngate bench`` commands: ``store`` (group-commit writes), ``alpaca-eval``
(batch generation against vLLM offline and transformers) and ``align`` (one online
iteration against its training alone). Each reports ratios against a baseline measured in
the same run.

Does not know: HTTP (``loadtest/`` benchmarks servers over HTTP).
"""
