"""Nearest neighbours over context keys: FAISS, with a brute-force numpy twin.

FAISS proposes candidates; distances of the candidates are then recomputed row by row
in float64, and ties broken by index. FAISS switches between a SIMD and a BLAS kernel
with the batch size, whose roundings differ, so using its distances directly would
make a query's neighbours (and so its samples) depend on the batch it sits in.
"""

from __future__ import annotations

import warnings

import faiss
import numpy as np

EXTRA_CANDIDATES = 8


# Queries per block of the float64 re-ranking: a block's (queries, candidates, D) gather
# stays in cache (about twice as fast as one big gather); each distance is the same einsum
# over D whatever the block (numpy sums D in one buffer up to 8192 elements; embeddings are
# at most 1024), so the block size never changes a bit.
_RANK_ROWS = 16


def _distances(keys: np.ndarray, queries: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """float64 squared distances (B, c) of each query to its candidate keys (inf for id -1)."""
    d2 = np.empty(cand.shape)
    for i in range(0, len(cand), _RANK_ROWS):
        rows = slice(i, i + _RANK_ROWS)
        diff = keys[np.maximum(cand[rows], 0)] - queries[rows, None, :]  # (b, c, D)
        np.einsum("bcd,bcd->bc", diff, diff, out=d2[rows])
    d2[cand < 0] = np.inf
    return d2


def _exact_topk(keys: np.ndarray, queries: np.ndarray, cand: np.ndarray, k: int,
                exclude: np.ndarray | None, groups: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Rank candidate ids (B, c) by float64 squared distance, tie-break by id, keep k.

    With ``groups`` (one label per key), only the nearest candidate of each group counts
    (nearest: smallest (distance, id)); the others rank as if infinitely far.
    """
    d2 = _distances(keys, queries, cand)
    if exclude is not None:
        d2 = np.where(exclude, np.inf, d2)
    order = np.lexsort((cand, d2), axis=-1)  # every candidate, by (distance, id)
    if groups is None:
        order = order[:, :k]
        return np.take_along_axis(d2, order, 1), np.take_along_axis(cand, order, 1)
    # in that order a group's first candidate is its nearest: keep it, drop the rest
    g = groups[np.maximum(np.take_along_axis(cand, order, 1), 0)]
    if np.issubdtype(g.dtype, np.integer) and g.size and 0 <= g.min() and g.max() < 2**15:
        g = g.astype(np.int16)  # numpy's stable sort of 16-bit keys is a radix sort
    by_group = np.argsort(g, axis=1, kind="stable")  # stable: nearest first within a group
    g = np.take_along_axis(g, by_group, 1)
    first = np.ones_like(g, dtype=bool)
    first[:, 1:] = g[:, 1:] != g[:, :-1]
    keep = np.zeros_like(first)  # (B, c) in ``order``'s positions: each group's nearest
    np.put_along_axis(keep, by_group, first, 1)
    near = keep & np.isfinite(np.take_along_axis(d2, order, 1))
    # the first k kept finite candidates, still by (distance, id)
    pick = np.argsort(~near, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(order, pick, 1)
    short = near.sum(axis=1) < min(k, cand.shape[1])
    if short.any():  # too few: the others rank at infinity by id (a group's NaN stays, last)
        kept = np.zeros_like(keep)
        np.put_along_axis(kept, order, keep, 1)  # back to the candidates' own positions
        d2f = np.where(kept[short], d2[short], np.inf)
        out[short] = np.lexsort((cand[short], d2f), axis=-1)[:, :k]
        d2_out = np.take_along_axis(np.where(kept, d2, np.inf), out, 1)
    else:
        d2_out = np.take_along_axis(d2, out, 1)
    return d2_out, np.take_along_axis(cand, out, 1)


def brute_knn(keys: np.ndarray, queries: np.ndarray, k: int, exclude_fn=None,
              groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference: squared distances and ids of the k nearest keys (B, k), float64 numpy."""
    keys = np.asarray(keys, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    cand = np.broadcast_to(np.arange(len(keys)), (len(queries), len(keys)))
    exclude = exclude_fn(cand) if exclude_fn is not None else None
    return _exact_topk(keys, queries, cand, k, exclude, groups)


class KnnIndex:
    """Exact L2 search over standardised keys (N, D) with FAISS ``IndexFlatL2``."""

    def __init__(self, keys: np.ndarray):
        self.keys = np.ascontiguousarray(keys, dtype=np.float64)
        self.index = faiss.IndexFlatL2(self.keys.shape[1])
        self.index.add(self.keys.astype(np.float32))

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, queries: np.ndarray, k: int, exclude_fn=None,
               n_candidates: int | None = None, groups: np.ndarray | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and ids of the k nearest keys, (B, k) each, nearest first.

        ``exclude_fn(ids (B, c)) -> bool (B, c)`` marks candidates that may not be used
        (e.g. windows overlapping the query in time); ``groups`` keeps at most one key of
        each group; ask for enough candidates to cover both (``n_candidates``).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float64)
        k = min(k, len(self))
        c = min(len(self), (n_candidates or k) + EXTRA_CANDIDATES)
        _, cand = self.index.search(queries.astype(np.float32), c)
        exclude = exclude_fn(cand) if exclude_fn is not None else None
        return _exact_topk(self.keys, queries, cand.astype(np.int64), k, exclude, groups)

    # Pickle as bytes: FAISS indexes are SWIG objects that pickle cannot carry across Ray.
    def __getstate__(self) -> dict:
        return {"keys": self.keys, "index": faiss.serialize_index(self.index)}

    def __setstate__(self, state: dict) -> None:
        self.keys = state["keys"]
        self.index = faiss.deserialize_index(state["index"])


def kernel_weights(d2: np.ndarray, kernel: str) -> np.ndarray:
    """Normalised weights (B, k) from squared distances (B, k), nearest first.

    Gaussian with an adaptive bandwidth: the median neighbour distance of the row, so the
    weights adapt to how dense the bank is around each query.
    """
    finite = np.isfinite(d2)
    if kernel == "uniform":
        w = finite.astype(np.float64)
    else:
        d = np.sqrt(np.where(finite, d2, 0.0))
        # the median over the row's real neighbours (ids FAISS or an exclusion left out are
        # at infinity); a row without any keeps the fallback bandwidth below
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy: "All-NaN slice"
            h = np.nanmedian(np.where(finite, d, np.nan), axis=1, keepdims=True)
        h = np.where(np.isfinite(h) & (h > 0), h, 1.0)
        w = np.where(finite, np.exp(-0.5 * (d / h) ** 2), 0.0)
    total = w.sum(axis=1, keepdims=True)
    return w / np.where(total > 0, total, 1.0)
