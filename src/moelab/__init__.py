"""moelab: train, diagnose, compare and serve sparse mixture-of-experts language models."""

__version__ = "0.1.0"
