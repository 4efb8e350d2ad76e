"""Data: corpus sources, tokenizers, cached token files and the batch loader."""
