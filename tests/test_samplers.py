"""The model-based samplers (cvae-prior, cvae-scaled, knn, knn-conformal) and the kNN search."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from engine.data.panel import make_splits
from engine.errors import DataError
from engine.knn import KnnIndex, brute_knn, kernel_weights
from engine.rng import CALIBRATION, node_rng
from engine.samplers import make_sampler
from engine.samplers.bank import (
    bank_anchors,
    block_train_mask,
    build_bank,
    context_features,
    fold_plan,
    point_forecast,
    training_windows,
)
from engine.samplers.cvae_scaled import N_CAL_DRAWS
from engine.samplers.knn import check_history, min_history
from engine.samplers.knn_conformal import weighted_quantiles
from engine.train import train_model
from tests.conftest import tiny_config, toy_panel
from tests.contract import SamplerContract

_MODELS: dict = {}


def trained_model(config, panel):
    """One tiny CVAE per (config, panel), trained on the train split."""
    key = (config.model_dump_json(), panel.fingerprint)
    if key not in _MODELS:
        splits = make_splits(panel, config.data)
        _MODELS[key] = train_model(panel, splits.anchors("train"), config).model
    return _MODELS[key]


class ModelSamplerContract(SamplerContract):
    def make_model(self, config, panel):
        return trained_model(config, panel)


class TestCvaePriorContract(ModelSamplerContract):
    name = "cvae-prior"


class TestCvaeScaledContract(ModelSamplerContract):
    name = "cvae-scaled"


class TestKnnContract(ModelSamplerContract):
    name = "knn"


class TestKnnConformalContract(ModelSamplerContract):
    name = "knn-conformal"


class TestKnnPcaFeaturesContract(SamplerContract):
    """The pca-ar point forecast with hand-made keys needs no CVAE at all."""

    name = "knn-conformal"

    def make_config(self):
        return tiny_config(**{"sampler.point": "pca-ar", "sampler.embedding": "features"})


def test_faiss_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    keys, queries = rng.standard_normal((500, 6)), rng.standard_normal((40, 6))
    index = KnnIndex(keys)
    d_f, i_f = index.search(queries, 10)
    d_b, i_b = brute_knn(keys, queries, 10)
    np.testing.assert_array_equal(i_f, i_b)
    np.testing.assert_allclose(d_f, d_b)
    # With episodes (groups) and an exclusion rule, too.
    groups = np.arange(500) // 7

    def exclude(ids):
        return ids % 5 == 0

    d_f, i_f = index.search(queries, 10, exclude_fn=exclude, groups=groups, n_candidates=200)
    d_b, i_b = brute_knn(keys, queries, 10, exclude_fn=exclude, groups=groups)
    np.testing.assert_array_equal(i_f, i_b)
    assert (i_f % 5 != 0).all()
    assert all(len(set(groups[row])) == 10 for row in i_f)


def _topk_by_definition(keys, queries, cand, k, exclude, groups=None):
    """``_exact_topk`` as first written: one gather, a three-key sort for the groups."""
    diff = keys[np.maximum(cand, 0)] - queries[:, None, :]
    d2 = np.einsum("bcd,bcd->bc", diff, diff)
    d2 = np.where(cand < 0, np.inf, d2)
    if exclude is not None:
        d2 = np.where(exclude, np.inf, d2)
    if groups is not None:
        g = groups[np.maximum(cand, 0)]
        by_group = np.lexsort((cand, d2, g), axis=-1)  # within a group: nearest first
        g_sorted = np.take_along_axis(g, by_group, 1)
        first = np.ones_like(g_sorted, dtype=bool)
        first[:, 1:] = g_sorted[:, 1:] != g_sorted[:, :-1]
        keep = np.zeros_like(first)
        np.put_along_axis(keep, by_group, first, 1)
        d2 = np.where(keep, d2, np.inf)
    order = np.lexsort((cand, d2), axis=-1)[:, :k]
    return np.take_along_axis(d2, order, 1), np.take_along_axis(cand, order, 1)


@pytest.mark.parametrize("seed", range(6))
def test_exact_topk_equals_its_definition_with_ties_gaps_and_groups(seed):
    from engine.knn import _exact_topk

    rng = np.random.default_rng(seed)
    n, b, c = 300, 37, 120
    keys = rng.integers(-2, 3, (n, 4)).astype(np.float64)  # integer keys: many exact ties
    queries = rng.integers(-2, 3, (b, 4)).astype(np.float64)
    cand = np.stack([rng.permutation(n)[:c] for _ in range(b)]).astype(np.int64)
    cand[rng.random(cand.shape) < 0.05] = -1  # FAISS's "no more candidates"
    exclude = rng.random(cand.shape) < (0.97 if seed % 2 else 0.2)  # odd seeds: rows run short
    # groups of 7 (int16 inside), or colliding labels that int16 cannot hold
    groups = (np.arange(n) // 7) if seed < 3 else rng.integers(0, 40, n) + 40_000
    if seed == 5:
        keys[rng.integers(0, n, 20)] = np.nan  # NaN distances rank last, as before
    for k in (1, 10, 50, c + 5):
        for ex in (None, exclude):
            for gr in (None, groups):
                want = _topk_by_definition(keys, queries, cand, k, ex, gr)
                got = _exact_topk(keys, queries, cand, k, ex, gr)
                np.testing.assert_array_equal(got[1], want[1])
                np.testing.assert_array_equal(got[0], want[0])


def test_search_is_batch_independent():
    rng = np.random.default_rng(1)
    keys, queries = rng.standard_normal((3000, 8)), rng.standard_normal((300, 8))
    index = KnnIndex(keys)
    d_all, i_all = index.search(queries, 15)
    for b in (0, 7, 299):
        d_one, i_one = index.search(queries[b : b + 1], 15)
        np.testing.assert_array_equal(i_one[0], i_all[b])
        np.testing.assert_array_equal(d_one[0], d_all[b])


def test_index_pickles():
    import pickle

    keys = np.random.default_rng(2).standard_normal((50, 3))
    index = KnnIndex(keys)
    clone = pickle.loads(pickle.dumps(index))
    q = keys[:5] + 0.01
    np.testing.assert_array_equal(index.search(q, 4)[1], clone.search(q, 4)[1])


def test_kernel_weights_normalised_and_decreasing():
    d2 = np.array([[0.1, 0.4, 0.9, 2.5], [1.0, 1.0, np.inf, np.inf]])
    w = kernel_weights(d2, "gaussian")
    np.testing.assert_allclose(w.sum(1), 1)
    assert (np.diff(w[0]) < 0).all()
    assert w[1, 2] == 0 and w[1, 0] == w[1, 1]
    np.testing.assert_allclose(kernel_weights(d2, "uniform")[0], 0.25)


def test_kernel_bandwidth_is_the_median_of_the_real_neighbours_only():
    # Neighbours an exclusion (or FAISS) left out sit at infinity: they get no weight and
    # do not move the bandwidth, so the others weigh as in a row without them. (A NaN
    # median once fell back to bandwidth 1: on a short history with wide embeddings the
    # leave-one-out rows put all weight on one or two neighbours, the conformal scale
    # reached 1e8 and the samples overflowed.)
    rng = np.random.default_rng(0)
    d2 = np.sort(rng.uniform(5.0, 150.0, size=(3, 9)), axis=1)
    full = kernel_weights(d2, "gaussian")
    padded = kernel_weights(np.concatenate([d2, np.full((3, 4), np.inf)], axis=1), "gaussian")
    np.testing.assert_array_equal(padded[:, 9:], 0.0)
    np.testing.assert_allclose(padded[:, :9], full, rtol=1e-12)
    assert full.max() < 0.5  # spread over the row, not on its nearest key
    none = kernel_weights(np.full((1, 4), np.inf), "gaussian")
    np.testing.assert_array_equal(none, 0.0)


def test_weighted_quantiles_match_a_loop():
    rng = np.random.default_rng(3)
    values = rng.standard_normal((4, 9, 3))
    weights = rng.random((4, 9))
    weights /= weights.sum(1, keepdims=True)
    got = weighted_quantiles(values, weights, [0.1, 0.5, 0.9])
    for b in range(4):
        for g in range(3):
            order = np.argsort(values[b, :, g], kind="stable")
            cw = np.cumsum(weights[b, order])
            for qi, q in enumerate([0.1, 0.5, 0.9]):
                assert got[qi, b, g] == values[b, order[np.argmax(cw >= q - 1e-12)], g]


def test_bank_residuals_are_out_of_sample():
    """Each block's point model never saw a window whose targets touch the block (+ embargo)."""
    config = tiny_config(**{"sampler.point": "pca-ar"})
    panel = toy_panel()
    H, E = config.data.horizon, config.data.embargo_days
    bank = build_bank(panel, config, "pca-ar")
    for b in np.unique(bank.fold):
        block = bank.anchors[bank.fold == b]
        mask = block_train_mask(bank.anchors, block, H, E)
        train_targets = (bank.anchors[mask][:, None] + np.arange(1, H + 1)).ravel()
        assert not np.any((train_targets >= block[0] + 1 - E) & (train_targets <= block[-1] + H + E))
    # Residuals are realised minus the point forecast: they vanish nowhere and stay finite.
    assert np.isfinite(bank.residuals).all() and np.abs(bank.residuals).max() > 0


def _worst_fold(anchors, blocks, H, E) -> int:
    return min(training_windows(anchors, blocks, H, E))


def test_the_fold_plan_leaves_every_fold_model_the_most_training_windows_it_can():
    """Each fold loses its block and H + E - 1 windows on each side: the plan takes the block
    count (2 .. n_folds) whose worst fold keeps the most windows, the larger on a tie, and
    refuses a history where every count leaves a fold with none."""
    config = tiny_config()  # C 12, H 6, E 6, 3 folds
    C, H, E = config.data.context, config.data.horizon, config.data.embargo_days
    need = 2 * (H + E) + C + H - 1
    with pytest.raises(DataError, match=rf"\({need - 1} days\).*give at least {need} days"):
        fold_plan(bank_anchors(need - 1, C, H), config)
    for n_days in range(need, 160):
        anchors = bank_anchors(n_days, C, H)
        cap = min(config.sampler.n_folds, max(2, len(anchors) // H))
        worst = {f: _worst_fold(anchors, np.array_split(anchors, f), H, E) for f in range(2, cap + 1)}
        best = max(worst.values())
        blocks = fold_plan(anchors, config)
        assert best >= 1 and _worst_fold(anchors, blocks, H, E) == best
        assert len(blocks) == max(f for f, w in worst.items() if w == best)
        assert np.array_equal(np.concatenate(blocks), anchors)
    # 45 days: three blocks would leave the middle fold nothing (7, 0, 8 windows); two keep 3.
    anchors = bank_anchors(45, C, H)
    assert _worst_fold(anchors, np.array_split(anchors, 3), H, E) == 0
    assert len(fold_plan(anchors, config)) == 2
    # A long history keeps sampler.n_folds blocks; pca-ar fold models fit on days (their own
    # fit refuses too few), so they keep the blocks the history allows.
    assert len(fold_plan(bank_anchors(400, C, H), config)) == config.sampler.n_folds
    assert len(fold_plan(anchors, config, "pca-ar")) == 3


def test_min_history_is_the_first_history_the_bank_and_its_episodes_accept():
    """check_history (fold plan and episodes) refuses every history shorter than
    min_history and accepts it; a history of one window is refused, not an IndexError."""
    for overrides, point in (({}, "cvae"), ({"data.embargo": 0}, "cvae"),
                             ({"data.embargo": 0}, "pca-ar")):
        config = tiny_config(**overrides)
        need = min_history(config, point)
        for n_days in range(config.data.context + config.data.horizon, need):
            with pytest.raises(DataError):
                check_history(n_days, config, point)
        check_history(need, config, point)
    config = tiny_config()
    assert min_history(config, "cvae") == 41  # 2 (H + E) + C + H - 1: the fold plan's bound
    # no embargo: 10 episodes of H // 3 = 2 days bound it (anchors 11 .. 28: episodes 5 .. 14)
    assert min_history(tiny_config(**{"data.embargo": 0}), "cvae") == 35
    with pytest.raises(DataError, match="cannot be cut into time blocks"):
        fold_plan(bank_anchors(18, 12, 6), config)


def test_a_history_too_short_to_cross_fit_is_refused_before_training_and_a_thin_one_noted():
    config = tiny_config(**{"sampler.embedding": "features"})  # CVAE fold models
    with pytest.raises(DataError, match="cannot be cut into time blocks"):
        make_sampler("knn", config).fit(toy_panel(n_days=37))  # used to be an IndexError
    s = make_sampler("knn", config).fit(toy_panel(n_days=45))
    assert len(s.point_models_) == 2
    note = s.fold_note()
    assert note is not None and "only 3 of the 14 windows outside its block" in note
    assert "\n" not in note
    # Two blocks on a long history: each fold keeps most of the other block, no note.
    two = tiny_config(**{"sampler.embedding": "features", "sampler.n_folds": 2})
    assert make_sampler("knn", two).fit(toy_panel(n_days=400)).fold_note() is None
    # pca-ar fold models fit on days: the same short history still fits, as it always did.
    pca = tiny_config(**{"sampler.embedding": "features", "sampler.point": "pca-ar"})
    s = make_sampler("knn", pca).fit(toy_panel(n_days=37))
    assert len(s.point_models_) == 3 and s.fold_note() is None


@pytest.mark.parametrize("point", ["cvae", "pca-ar"])
def test_a_fold_model_never_learns_its_own_blocks_outcomes(point):
    """Poison the target days of block b (every day a window of block b forecasts): block
    b's fold model must come out the same, forecast for forecast, while the other folds'
    models, which may learn from those days, change. (An embargo of a context length keeps
    the later training windows' contexts clear of the block as well.)"""
    config = tiny_config(**{"sampler.point": point, "sampler.n_folds": 3,
                            "data.embargo": 12})
    C, H = config.data.context, config.data.horizon
    panel = toy_panel()
    clean = build_bank(panel, config, point)
    b = 1
    block = clean.anchors[clean.fold == b]
    days = np.arange(block[0] + 1, block[-1] + H + 1)  # the block's target days
    surface = panel.surface.copy()
    surface[days] *= np.exp(np.random.default_rng(7).normal(0.5, 0.3, surface[days].shape))
    poisoned = build_bank(type(panel)(surface, panel.dates, panel.moneyness,
                                      panel.maturity_days, source="poisoned"), config, point)
    probe = panel.contexts_at(clean.anchors[:: 25], C)  # the clean panel's contexts
    for f, (m0, m1) in enumerate(zip(clean.models, poisoned.models, strict=True)):
        same = np.array_equal(point_forecast(m0, probe), point_forecast(m1, probe))
        assert same == (f == b), f"fold {f}: {'unchanged' if same else 'changed'}"
    # the poison did reach block b's residuals (realised outcomes minus that same model)
    assert not np.allclose(clean.residuals[clean.fold == b], poisoned.residuals[clean.fold == b])


@pytest.mark.parametrize("point", ["cvae", "pca-ar"])
def test_each_residual_rides_on_the_fold_model_that_made_it(point, monkeypatch):
    """CV+: a residual drawn for a context is added to the forecast of the model that made it,
    so a bank window's own context with its own residual gives back its realised path
    exactly; and every drawn sample is its fold model's forecast plus its residual."""
    embedding = "cvae" if point == "cvae" else "features"
    config = tiny_config(**{"sampler.point": point, "sampler.embedding": embedding,
                            "sampler.n_folds": 3})
    panel = toy_panel()
    model = trained_model(config, panel) if point == "cvae" else None
    sampler = make_sampler("knn", config).fit(panel, model)
    bank, C, H = sampler.bank_, config.data.context, config.data.horizon
    assert len(sampler.point_models_) == len(np.unique(bank.fold)) == 3
    rows = np.array([0, len(bank.anchors) // 2, len(bank.anchors) - 1])
    ctx = panel.contexts_at(bank.anchors[rows], C)
    fc = sampler.point_forecast(ctx)  # (3, F, H, n_m, n_tau)
    assert fc.shape == (3, 3, H, *panel.grid_shape)
    own = fc[np.arange(3), bank.fold[rows]] + bank.residuals[rows]
    np.testing.assert_allclose(own, panel.targets_at(bank.anchors[rows], H), atol=1e-5)
    assert np.abs(fc[:, 0] - fc[:, 1]).max() > 0  # the folds' models differ
    # A draw: sample = its fold's forecast + its residual (knn's adjust is the identity).
    keys = sampler.keys_(ctx)
    rngs = [np.random.default_rng(i) for i in range(3)]
    out = sampler.draw(fc, keys, 16, rngs)
    ids, w = sampler.neighbours(keys)
    picks, res = sampler.residual_draw(ids, w, 16, [np.random.default_rng(i) for i in range(3)])
    np.testing.assert_allclose(out, fc[np.arange(3)[:, None], bank.fold[picks]] + res)
    if point == "cvae":
        from engine.model import models_on, move_models

        assert move_models(sampler, "cpu") == 3 + 1  # the fold models and the keys' CVAE
        import torch

        moves = []
        with monkeypatch.context() as mp:  # every move, in order: to the CPU, then back
            real_to = torch.nn.Module.to

            def to(module, *args, **kwargs):
                moves.append((id(module), str(args[0])))
                return real_to(module, *args, **kwargs)

            mp.setattr(torch.nn.Module, "to", to)
            with models_on(sampler, "cpu") as n:
                assert n == 3 + 1 and len(moves) == 4
            assert len(moves) == 8
        ids = [i for i, _ in moves]
        assert ids[:4] == ids[4:] and len(set(ids)) == 4  # each model once, and back
        assert all(where == "cpu" for _, where in moves)  # to the CPU, back to where it was


def test_context_features_shape_and_constants():
    panel = toy_panel()
    ctx = panel.contexts_at(np.array([30, 60, 90]), 20)
    f = context_features(ctx)
    assert f.shape == (3, 5) and np.isfinite(f).all()


def test_context_features_read_level_slope_skew_vol_and_change():
    """A context built from known parts (log-IV = level path + a fixed smile and term
    structure) gives each feature back: the last day's level, the term slope (longest minus
    shortest maturity), the skew (lowest minus highest moneyness), log realised vol of the
    daily level changes over 20 days, and the 20-day change."""
    days = 30
    steps = np.tile([0.01, -0.03], days // 2)[: days - 1]  # alternating daily moves
    path = np.log(0.2) + np.r_[0.0, np.cumsum(steps)]
    smile = np.array([0.04, 0.0, -0.02])[:, None]  # by moneyness, low to high
    term = np.array([-0.01, 0.0, 0.01, 0.03])[None, :]  # by maturity, short to long
    shape = smile + term - (smile + term).mean()  # zero mean over the grid
    log_ctx = (path[:, None, None] + shape[None])[None]  # (1, C, 3, 4)
    level, slope, skew, log_rv, change = context_features(log_ctx)[0]
    assert level == pytest.approx(path[-1])
    assert slope == pytest.approx(0.03 - (-0.01))
    assert skew == pytest.approx(0.04 - (-0.02))
    assert log_rv == pytest.approx(np.log(np.diff(path[-21:]).std() + 1e-4))
    assert change == pytest.approx(path[-1] - path[-21])


def test_conformal_widens_an_overconfident_mixture():
    """On a panel where neighbours under-state the spread, calibration pushes c_h above 1."""
    config = tiny_config(**{"sampler.point": "pca-ar", "sampler.embedding": "features"})
    panel = toy_panel(n_days=500)
    s = make_sampler("knn-conformal", config).fit(panel)
    for scale in (s.scale_, s.split_scale_):
        assert scale.shape == (config.data.horizon,)
        assert np.isfinite(scale).all() and (scale > 0).all()
    # Leave-one-out coverage with the split factors is nominal on the bank itself, and
    # tight: the next score below each factor covers less than the conformal level
    # ceil((n + 1)(1 - alpha)) / n.
    sc = s.scores_.transpose(1, 0, 2).reshape(config.data.horizon, -1)
    cover = (sc <= s.split_scale_[:, None]).mean(axis=1)
    assert (cover >= config.sampler.coverage - 1e-9).all()
    n = sc.shape[1]
    k = int(np.ceil((n + 1) * config.sampler.coverage))  # the k-th smallest score of n
    np.testing.assert_array_equal(s.split_scale_, np.sort(sc, axis=1)[:, k - 1])
    level = k / n
    below = np.array([row[row < c].max() for row, c in zip(sc, s.split_scale_, strict=True)])
    assert ((sc <= below[:, None]).mean(axis=1) < level).all()
    # the neighbours' own bands cover less than nominal here: calibration widens them
    assert ((sc <= 1.0).mean(axis=1) < config.sampler.coverage).all()
    assert (s.split_scale_ > 1).all()


def test_a_short_history_whose_neighbours_are_most_of_the_bank_is_flagged():
    config = tiny_config(**{"sampler.point": "pca-ar", "sampler.embedding": "features"})
    s = make_sampler("knn", config).fit(toy_panel(n_days=500))
    assert 2 * s.k_ <= s.n_episodes and s.locality_note() is None and s.fold_note() is None
    assert f"{s.n_episodes} episodes" in s.bank_summary() and f"k = {s.k_}" in s.bank_summary()
    wide = tiny_config(**{"sampler.point": "pca-ar", "sampler.embedding": "features",
                          "sampler.k": s.n_episodes // 2 + 1})
    note = make_sampler("knn", wide).fit(toy_panel(n_days=500)).locality_note()
    assert note is not None and f"out of only {s.n_episodes} episodes" in note


def test_degenerate_neighbour_bands_are_refused_not_overflowed():
    """With one neighbour the band is a point: no finite widening covers anything, so the
    fit says so in one line instead of sampling overflowing paths."""
    config = tiny_config(**{"sampler.point": "pca-ar", "sampler.embedding": "features",
                            "sampler.k": 1})
    with pytest.raises(DataError, match=r"degenerate.*k = 1 of \d+ episodes; raise sampler.k"):
        make_sampler("knn-conformal", config).fit(toy_panel(n_days=500))


def test_too_few_episodes_are_refused():
    """Episodes as long as the history leave one residual path: no band to speak of."""
    config = tiny_config(**{"sampler.point": "pca-ar", "sampler.embedding": "features",
                            "sampler.episode_days": 100_000})
    with pytest.raises(DataError, match=r"holds 1 episodes of 100000 days.*sampler.episode_days"):
        make_sampler("knn", config).fit(toy_panel(n_days=500))


# --- the online conformal scale -----------------------------------------------------------------


def _online_fixture(n_days=500, **over):
    config = tiny_config(**{"sampler.point": "pca-ar", "sampler.embedding": "features",
                            "sampler.conformal": "online", **over})
    return config, toy_panel(n_days=n_days)


def test_online_scale_is_the_weighted_conformal_quantile_of_realised_scores():
    """Each day's scale against a direct computation: exact weights over every score realised
    by that day (recent ones exp(-age/tau), all of them a pooled mass of n0*h windows, the new
    window at +inf), within the histogram's bin width."""
    config, panel = _online_fixture(**{"sampler.online_memory_days": 30.0,
                                       "sampler.online_prior_episodes": 2.0})
    s = make_sampler("knn-conformal", config).fit(panel)
    scores = s.window_scores(panel)
    path = s._online_path(panel, scores)
    a0, H, G = int(s.bank_.anchors[0]), config.data.horizon, scores.shape[2]
    anchors = a0 + np.arange(len(scores))
    for t in (a0 + 40, 250, panel.n_days - 1):
        for h in (1, 3, H):
            real = anchors + h <= t
            age = (t - anchors[real] - h).astype(float)
            w = np.exp(-age / 30.0) + 2.0 * h / real.sum()
            vals = scores[real, h - 1].ravel()
            wts = np.repeat(w, G)
            order = np.argsort(vals)
            cum = np.cumsum(wts[order])
            assert cum[-1] >= 0.9 * (cum[-1] + G)  # the level is reached: a finite quantile
            ref = vals[order][np.argmax(cum >= 0.9 * (cum[-1] + G))]
            assert ref <= path[t, h - 1] <= ref * 1.012 + 1e-3, (t, h)
    assert np.array_equal(path[-1], s.scale_)
    # before one h-day episode has realised, the split scale stands in
    assert np.array_equal(path[a0], s.split_scale_)


def test_online_scale_never_looks_ahead():
    """The scale issued on day t is the same whatever the days after t hold."""
    config, panel = _online_fixture(n_days=520)
    s = make_sampler("knn-conformal", config).fit(panel.slice_days(0, 400))
    s.observe(panel)
    other = panel.surface.copy()
    other[460:] *= np.exp(0.3 * np.random.default_rng(1).standard_normal(other[460:].shape))
    from engine.data.panel import Panel

    changed = Panel(other, panel.dates, panel.moneyness, panel.maturity_days, source="toy")
    s2 = make_sampler("knn-conformal", config).fit(changed.slice_days(0, 400))
    s2.observe(changed)
    assert np.array_equal(s.scale_path_[:460], s2.scale_path_[:460])
    assert not np.array_equal(s.scale_path_[460:], s2.scale_path_[460:])
    # a panel that does not start with the fitted history is refused
    from engine.errors import DataError

    with pytest.raises(DataError, match="starts with the 400 days"):
        s.observe(changed.slice_days(1, 520))
    with pytest.raises(DataError, match="is the 400 days"):
        s.recalibrated(config, panel)  # the whole panel, not the fitted history


def test_online_scale_keeps_the_split_one_until_its_level_can_be_reached():
    """With little weighted mass (a short memory and no pooled prior) the 90% level lies past
    every realised score: the scale stays the split one, never a huge finite stand-in."""
    config, panel = _online_fixture(**{"sampler.online_memory_days": 10.0,
                                       "sampler.online_prior_episodes": 0.0})
    s = make_sampler("knn-conformal", config).fit(panel)
    path = s._online_path(panel)
    assert np.isfinite(path).all() and path.max() < 100
    starts = int(s.bank_.anchors[0]) + np.arange(1, config.data.horizon + 1)
    for h, t in enumerate(starts, start=1):
        np.testing.assert_array_equal(path[t, h - 1], s.split_scale_[h - 1])


def test_online_scale_follows_a_calmer_or_wilder_recent_past():
    """Scores that shrink (or grow) threefold over the last 200 windows: the online scale
    ends below (above) the pooled quantile of all of them, and nearer the recent one."""
    config, panel = _online_fixture(n_days=700, **{"sampler.online_memory_days": 40.0})
    s = make_sampler("knn-conformal", config).fit(panel)
    base = np.abs(np.random.default_rng(0).standard_normal(s.window_scores(panel).shape))
    for factor in (1 / 3, 3.0):
        scores = base.copy()
        scores[-200:] *= factor
        end = s._online_path(panel, scores.astype(np.float32))[-1]
        pooled = np.quantile(scores.transpose(1, 0, 2).reshape(len(end), -1), 0.9, axis=1)
        recent = np.quantile(scores[-200:].transpose(1, 0, 2).reshape(len(end), -1), 0.9,
                             axis=1)
        assert (np.abs(np.log(end / recent)) < np.abs(np.log(pooled / recent)) / 2).all()


def test_sampling_at_days_uses_each_days_scale():
    config, panel = _online_fixture()
    s = make_sampler("knn-conformal", config).fit(panel.slice_days(0, 420))
    s.observe(panel)
    days = np.array([430, 480])
    ctx = panel.contexts_at(days, config.data.context, log=False)
    rngs = lambda: [np.random.default_rng(i) for i in range(2)]
    got = s.sample(ctx, 64, rngs(), days=days)
    for row, day in enumerate(days):
        fixed = s.recalibrated(config, panel.slice_days(0, 420))
        fixed.scale_ = s.scale_path_[day]
        want = fixed.sample(ctx[row : row + 1], 64, [rngs()[row]])
        np.testing.assert_allclose(got[row], want[0], rtol=1e-12)
    split = s.recalibrated(config.model_copy(update={"sampler": config.sampler.model_copy(
        update={"conformal": "split"})}), panel.slice_days(0, 420))
    assert np.array_equal(split.scale_, s.split_scale_)
    split.observe(panel)
    np.testing.assert_array_equal(split.sample(ctx, 64, rngs(), days=days),
                                  split.sample(ctx, 64, rngs()))


def test_cvae_prior_is_overconfident_and_scaled_is_wider():
    config, panel = tiny_config(), toy_panel()
    model = trained_model(config, panel)
    ctx = panel.contexts_at(np.array([100, 200, 300]), config.data.context, log=False)
    prior = make_sampler("cvae-prior", config).fit(panel, model).sample(ctx, 200, 0)
    scaled_sampler = make_sampler("cvae-scaled", config).fit(panel, model)
    scaled = scaled_sampler.sample(ctx, 200, 0)
    assert np.log(scaled).std(axis=1).mean() > np.log(prior).std(axis=1).mean()
    assert (scaled_sampler.scale_ > 1).all()


def test_cvae_scaled_meets_its_variance_target_about_the_centre_it_scales_around():
    """Samples are p50 + s (decode(z) - p50), so the model's within variance is measured
    about p50: redrawn with the fit's own streams, the scaled draws' mean square about p50
    is the target within variance at every horizon (about the draws' own mean, as before,
    it fell short wherever their mean sits off p50)."""
    config, panel = tiny_config(), toy_panel()
    model = trained_model(config, panel)
    s = make_sampler("cvae-scaled", config).fit(panel, model)
    anchors = s.calibration_anchors_
    ctx = panel.contexts_at(anchors, config.data.context, log=False)
    rngs = [node_rng(config.seed, 0, int(a), CALIBRATION) for a in anchors]
    draws = np.log(s.sample(ctx, N_CAL_DRAWS, rngs))  # (B, N, H, n_m, n_tau)
    p50 = model.median(np.log(ctx))[:, None]
    got = ((draws - p50) ** 2).mean(axis=(0, 1, 3, 4))
    np.testing.assert_allclose(got, s.budget_["target"], rtol=1e-6)


def test_cvae_scaled_without_calibration_windows_names_every_fix():
    """A model whose training data end near the history's end leaves no window to calibrate
    on: the refusal names the embargo and the splits, not only another model."""
    config, panel = tiny_config(), toy_panel()
    model = copy.deepcopy(trained_model(config, panel))  # the cached one stays as it is
    model.train_end = str(panel.dates[-3])
    with pytest.raises(DataError, match=r"has 0; give more history after the train split.*"
                                        r"data.split_fractions.*data\.embargo\b"):
        make_sampler("cvae-scaled", config).fit(panel, model)


def test_model_sampler_without_model_is_refused():
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a trained model"):
        make_sampler("knn", tiny_config()).fit(toy_panel())
