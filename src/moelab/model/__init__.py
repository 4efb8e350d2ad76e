"""The model: a decoder-only transformer whose feed-forward is dense SwiGLU or a mixture of experts."""

from moelab.model.transformer import KVCache, ModelOutput, Transformer

__all__ = ["KVCache", "ModelOutput", "Transformer"]
