"""The OpenAI-compatible server: the scheduler (continuous batching on the one decoding loop), the request
protocol and the HTTP application. Started by ``python -m nemo_bard.serve``."""
