"""The contract every sampler keeps. A sampler's test module subclasses ``SamplerContract``.

Subclasses set ``name`` and may override ``make_fitted`` (e.g. to pass a model or a
synthetic panel); everything else is inherited.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from engine.errors import NotFittedError
from engine.samplers import make_sampler
from tests.conftest import tiny_config, toy_panel


class SamplerContract:
    name: str = ""
    n_samples: int = 16

    def make_config(self):
        return tiny_config()

    def make_panel(self):
        return toy_panel()

    def make_model(self, config, panel):
        return None

    def make_fitted(self):
        config, panel = self.make_config(), self.make_panel()
        sampler = make_sampler(self.name, config)
        fitted = sampler.fit(panel, self.make_model(config, panel))
        return sampler, fitted, config, panel

    def contexts(self, config, panel, n=3):
        C = config.data.context
        anchors = np.linspace(C - 1, panel.n_days - config.data.horizon - 1, n).astype(int)
        return panel.contexts_at(anchors, C, log=False)

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls):
        return cls().make_fitted()

    def test_fit_returns_self(self, fitted):
        sampler, result, _, _ = fitted
        assert result is sampler

    def test_sample_before_fit_raises(self):
        config, panel = self.make_config(), self.make_panel()
        sampler = make_sampler(self.name, config)
        with pytest.raises(NotFittedError, match="is not fitted"):
            sampler.sample(self.contexts(config, panel), 4, 0)

    def test_shape_and_positivity(self, fitted):
        sampler, _, config, panel = fitted
        ctx = self.contexts(config, panel)
        out = sampler.sample(ctx, self.n_samples, 0)
        assert out.shape == (len(ctx), self.n_samples, config.data.horizon, *panel.grid_shape)
        assert np.isfinite(out).all() and (out > 0).all()

    def test_same_seed_same_samples(self, fitted):
        sampler, _, config, panel = fitted
        ctx = self.contexts(config, panel)
        a = sampler.sample(ctx, self.n_samples, 123)
        b = sampler.sample(ctx, self.n_samples, 123)
        c = sampler.sample(ctx, self.n_samples, 124)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)

    def test_rows_independent_of_batch(self, fitted):
        """A row drawn with its own generator is the same alone or inside a batch."""
        sampler, _, config, panel = fitted
        ctx = self.contexts(config, panel)
        seeds = [np.random.SeedSequence([5, i]) for i in range(len(ctx))]
        batch = sampler.sample(ctx, self.n_samples, [np.random.default_rng(s) for s in seeds])
        alone = sampler.sample(ctx[1:2], self.n_samples, [np.random.default_rng(seeds[1])])
        np.testing.assert_array_equal(batch[1:2], alone)

    def test_file_round_trip(self, fitted, tmp_path):
        """``backfill fit``'s file (plain data, read with weights_only) gives back a sampler
        that draws the same bytes."""
        from engine.sampler_file import load_sampler, save_sampler

        sampler, _, config, panel = fitted
        path = save_sampler(sampler, tmp_path / "s.pt", config=config,
                            history_fingerprint=panel.fingerprint,
                            start_date=str(panel.dates[-1]), fit_days=panel.n_days,
                            grid=panel.grid_dict())
        clone, meta = load_sampler(path)
        assert type(clone) is type(sampler) and meta["fit_days"] == panel.n_days
        ctx = self.contexts(config, panel)
        np.testing.assert_array_equal(sampler.sample(ctx, 8, 7), clone.sample(ctx, 8, 7))

    def test_pickle_round_trip(self, fitted):
        sampler, _, config, panel = fitted
        clone = pickle.loads(pickle.dumps(sampler))
        ctx = self.contexts(config, panel)
        np.testing.assert_array_equal(sampler.sample(ctx, 8, 7), clone.sample(ctx, 8, 7))
