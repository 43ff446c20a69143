"""The decoder actor: the sampler's point forecast and kNN keys (the CVAE half of a task).

It holds the fitted sampler, read once from the object store (the driver ``ray.put`` it once
and hands every actor the same ObjectRef), and calls ``engine.driver.decode_batch``, the same
function the inline backend calls. On a GPU node (``num_gpus`` set by the driver) the model
moves to the GPU; results then differ from a CPU run in the last bits (other kernels).
"""

from __future__ import annotations

import os

import ray

from engine.driver import decode_batch
from engine.model import device_label, move_models


def shared_info(ref, sampler) -> dict:
    """What an actor got from the object store: the ref's id and whether the residual bank
    is a read-only (zero-copy, shared-memory) view."""
    bank = getattr(getattr(sampler, "bank_", None), "residuals", None)
    return {"ref": ref.hex(), "pid": os.getpid(),
            "bank_writeable": None if bank is None else bool(bank.flags.writeable),
            "bank_owns_data": None if bank is None else bool(bank.flags.owndata)}


@ray.remote(max_restarts=-1, max_task_retries=-1)
class DecoderActor:
    """Batched p50 forecasts and embeddings: ``point_and_keys(contexts)``."""

    def __init__(self, shared: dict):
        self._ref = shared["sampler"]  # passed nested, so this is the ObjectRef itself
        self.sampler = ray.get(self._ref)
        import torch

        # A GPU granted by Ray is only usable when this torch build has CUDA (the driver
        # refuses to go on when it was granted one and cannot: see _RayPool.devices).
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            move_models(self.sampler, "cuda")

    def point_and_keys(self, contexts):
        """contexts (n, C, n_m, n_tau) iv -> point (n, F, H, n_m, n_tau) log-IV (one path per
        fold model), keys (n, D)."""
        return decode_batch(self.sampler, contexts)

    def shared_info(self) -> dict:
        import torch

        return {**shared_info(self._ref, self.sampler), "device": self.device,
                "device_label": device_label(self.device), "gpu_ids": list(ray.get_gpu_ids()),
                "torch": torch.__version__, "node": ray.util.get_node_ip_address()}
