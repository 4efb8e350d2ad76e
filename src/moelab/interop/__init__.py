"""Interoperability with Hugging Face transformers: export, import, sparse upcycling."""
