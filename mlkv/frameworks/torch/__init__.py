"""PyTorch modules over mlkv stores: embedding tables larger than memory.

>>> from mlkv.frameworks.torch import KVEmbedding, KVEmbeddingBag
>>> emb = KVEmbedding(64, path="runs/emb", optimizer="adagrad", lr=0.05)   # doctest: +SKIP

See :mod:`mlkv.frameworks.torch.modules` for the modules and the decisions behind them, and
:mod:`mlkv.frameworks.torch.pipeline` for lookahead and bounded staleness.
"""

from .modules import KVEmbedding, KVEmbeddingBag
from .pipeline import Pipeline, PipelineError, PipelineTimeout

__all__ = ["KVEmbedding", "KVEmbeddingBag", "Pipeline", "PipelineError", "PipelineTimeout"]
