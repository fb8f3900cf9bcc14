"""Benchmarks: decoding (``python -m nemo_bard.bench.decode``) and training steps (``nemo_bard.bench.train``)."""
