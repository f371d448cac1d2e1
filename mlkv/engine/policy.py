"""Cache policies: whether a read of a row below ``read_only`` copies it to the tail.

Pages leave memory in log order; a row copied to the tail stays in memory (and mutable) for
another trip round the buffer pool. The policies are a table keyed by name:

=================  =========================================================================
``fifo``           never copy: memory holds what was written last (plain FIFO of writes).
``second_chance``  always copy: every row read stays in memory another round (MLKV's and
                   FASTER's read-copy-update behaviour). The default.
``frequency``      copy only rows read at least twice recently: reads are counted in a small
                   side array of saturating 8-bit counters indexed by a hash of the key, halved
                   every ``len(counters)`` reads so old popularity fades.
=================  =========================================================================

``lookahead`` always copies, whatever the policy: it is an explicit request.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _log_kernels as K

FREQUENCY_COUNTER_BITS = 16


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    code: int
    counter_bits: int
    description: str


POLICIES = {
    "fifo": PolicySpec(K.POLICY_FIFO, 0, "never copy reads to the tail"),
    "second_chance": PolicySpec(K.POLICY_SECOND_CHANCE, 0, "copy every read to the tail"),
    "frequency": PolicySpec(K.POLICY_FREQUENCY, FREQUENCY_COUNTER_BITS,
                            "copy rows read at least twice recently"),
}


class CachePolicy:
    """A policy by name, with the counters it needs.

    Parameters
    ----------
    name : str
        A key of :data:`POLICIES`.
    """

    def __init__(self, name: str):
        if name not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
        self.name = name
        self.spec = POLICIES[name]
        self.code = self.spec.code
        self.counters = np.zeros(1 << self.spec.counter_bits, dtype=np.uint8)
        self._reads = 0

    def after_reads(self, n: int) -> None:
        """Age the frequency counters: halve them all every ``len(counters)`` reads."""
        if self.code != K.POLICY_FREQUENCY:
            return
        self._reads += n
        if self._reads >= self.counters.shape[0]:
            self.counters >>= 1
            self._reads = 0
