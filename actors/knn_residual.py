"""The kNN-residual actor: FAISS search, residual draw and choice of the representative paths.

It holds the fitted sampler from the object store (the same ObjectRef as every other actor:
the residual bank and the keys are zero-copy read-only views of shared memory; the FAISS
index is rebuilt from its serialized bytes once per actor) and calls
``engine.driver.expand_batch``, the same function the inline backend calls. For a sampler
without a decoder half (a generic ``ConditionalSampler``) it is the only actor and calls the
sampler's own ``sample``.
"""

from __future__ import annotations

import ray

from actors.decoder import shared_info
from engine.driver import Batch, BatchResult, LevelPlan, expand_batch


@ray.remote(max_restarts=-1, max_task_retries=-1)
class KnnResidualActor:
    """``expand(batch, plan, point_keys)``: children and marginal partial sums of a batch."""

    def __init__(self, shared: dict):
        self._ref = shared["sampler"]  # passed nested, so this is the ObjectRef itself
        self.sampler = ray.get(self._ref)

    def expand(self, batch: Batch, plan: LevelPlan, point_keys, decoder=None) -> BatchResult:
        """``point_keys``: the decoder actor's output for this batch (Ray resolves the ref),
        or None for a generic sampler (then ``batch.contexts`` are sampled from).
        ``decoder``: a decoder actor that decodes the tree's lookahead candidates."""
        decode = None
        if decoder is not None:
            def decode(contexts):
                return ray.get(decoder.point_and_keys.remote(contexts))
        return expand_batch(self.sampler, batch, plan, point_keys, decode=decode)

    def shared_info(self) -> dict:
        return shared_info(self._ref, self.sampler)
