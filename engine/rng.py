"""One entry point for randomness: every stream derives from (seed, level, node).

The same seed gives the same bytes whatever the batching, actor count or backend,
because a node's stream never depends on which batch or process draws it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SeedLike = int | np.random.Generator | None


# Purposes of streams, so a tree node, an evaluation window and a calibration draw that
# share (level, node) numbers never share randomness.
TREE, EVALUATION, CALIBRATION = 0, 1, 2
# The brute-force Monte Carlo's paths and the once-per-level frontier resampling.
MC, PRUNE = 3, 4
# The tree's lookahead: draws from the laws of a node's candidate children.
LOOKAHEAD = 5
# The fingerprint of a run's fitted sampler (a draw from the start context, never stored).
PROBE = 6


def node_rng(seed: int, level: int, node: int, stream: int = TREE,
             sub: int | None = None) -> np.random.Generator:
    """The stream of one tree node (level, node), or of window ``node`` for another purpose;
    ``sub``: one of several streams of that node (its lookahead candidates)."""
    key = [int(stream), int(seed), int(level), int(node)]
    return np.random.default_rng(np.random.SeedSequence(key if sub is None else
                                                        key + [int(sub)]))


def as_generator(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def row_rngs(rng: SeedLike | Sequence[np.random.Generator], n_rows: int) -> list[np.random.Generator]:
    """One generator per batch row: a given sequence as is, else spawned from one generator."""
    if isinstance(rng, Sequence) and not isinstance(rng, (str, bytes)):
        if len(rng) != n_rows:
            raise ValueError(f"got {len(rng)} generators for {n_rows} contexts; pass one per row")
        return list(rng)
    return list(as_generator(rng).spawn(n_rows))
