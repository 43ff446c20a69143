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


_WORD = 2**32


def node_rng(seed: int, level: int, node: int, stream: int = TREE,
             sub: int | None = None) -> np.random.Generator:
    """The stream of one tree node (level, node), or of window ``node`` for another purpose;
    ``sub``: one of several streams of that node (its lookahead candidates)."""
    key = [int(stream), int(seed), int(level), int(node)] + ([] if sub is None else [int(sub)])
    if all(0 <= k < _WORD for k in key):
        return np.random.default_rng(np.random.SeedSequence(key))
    # SeedSequence splits an integer of 2**32 or more into as many 32-bit words as it needs,
    # which would shift the fields after it (seed 2**32 + 5's node (3, 7) read as seed 5's
    # lookahead stream). Such a key has every field as two words and a spawn key that no
    # key of one-word fields has; those keep their streams.
    words = [w for k in key for w in (k % _WORD, k // _WORD)]
    return np.random.default_rng(np.random.SeedSequence(words, spawn_key=(1,)))


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
