"""Building blocks shared by the tokenizers and the prior."""

from vqim.nn.transformer import MLP, Attention, Block, KVCache, Transformer

__all__ = ["MLP", "Attention", "Block", "KVCache", "Transformer"]
