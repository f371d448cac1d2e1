"""PyTorch modules over mlkv stores: embedding tables larger than memory.

>>> from mlkv.frameworks.torch import KVEmbedding, KVEmbeddingBag
>>> emb = KVEmbedding(64, path="runs/emb", optimizer="adagrad", lr=0.05)   # doctest: +SKIP

See :mod:`mlkv.frameworks.torch.modules` for the modules and the decisions behind them.
"""

from .modules import KVEmbedding, KVEmbeddingBag
from .pipeline import Pipeline  # noqa: F401  (re-exported)

__all__ = ["KVEmbedding", "KVEmbeddingBag"]
