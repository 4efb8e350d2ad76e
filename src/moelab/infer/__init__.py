"""Inference: sampling, generation with a KV cache, the batching engine and the HTTP server."""
