"""The seed's Solution A: the CVAE's prior noise scaled per horizon to close the variance budget.

On calibration windows (after the model's training data, so out of sample), per horizon h:
Var X_h = E[Var(X|C)]_h + Var(E[X|C])_h. The model's own within-context variance (spread
of prior decodes) is far too small, so each draw's deviation from the prior-mean path is
scaled by s_h = sqrt(target within variance / model within variance), with the target
``Var X_h - Var(p50)_h`` (floored at the p50's mean squared error's tenth, so the budget
cannot go negative on a short split). Scaling is done in output space: one decode per
draw, then ``p50 + s_h * (decode(z) - p50)``, which to first order equals scaling z; the
model's within variance is measured about p50 too.
"""

from __future__ import annotations

import numpy as np

from engine.errors import DataError
from engine.rng import CALIBRATION, node_rng
from engine.samplers.cvae_prior import CvaePriorSampler

N_CAL_DRAWS = 32
MAX_CAL_WINDOWS = 400


class CvaeScaledSampler(CvaePriorSampler):
    name = "cvae-scaled"

    def _fit(self, panel, model) -> None:
        super()._fit(panel, model)
        C, H, E = self.context, self.horizon, self.config.data.embargo_days
        anchors = np.arange(C - 1, panel.n_days - H)
        if model.train_end is not None:
            first = int(np.searchsorted(panel.dates, np.datetime64(model.train_end, "D"))) + 1 + E
            anchors = anchors[anchors + 1 >= first]
        if len(anchors) < 2 and model.train_end is None:
            raise DataError(f"cvae-scaled needs 2 calibration windows but the history has "
                            f"{len(anchors)}; give more days of history")
        if len(anchors) < 2:
            raise DataError(f"cvae-scaled needs 2 calibration windows whose targets start "
                            f"{E} days (data.embargo) after the model's training data (ends "
                            f"{model.train_end}), but the history has {len(anchors)}; give more "
                            "history after the train split (more days, or a larger calibration "
                            "share in data.split_fractions, then retrain), a smaller "
                            "data.embargo, or a model trained on less of it")
        anchors = anchors[:: max(1, len(anchors) // MAX_CAL_WINDOWS)]
        ctx = panel.contexts_at(anchors, C)
        real = panel.targets_at(anchors, H).reshape(len(anchors), H, -1)
        p50 = model.median(ctx).reshape(len(anchors), H, -1)
        rngs = [node_rng(self.config.seed, 0, int(a), CALIBRATION) for a in anchors]
        draws = self.prior_paths(ctx, N_CAL_DRAWS, rngs).reshape(len(anchors), N_CAL_DRAWS, H, -1)
        # About p50, the centre the samples are scaled around: the draws' mean sits a little
        # off it (the decoder is not linear in z), and the scaled samples' spread about p50
        # then meets the target exactly (no ddof to get right either).
        model_within = ((draws - p50[:, None]) ** 2).mean(axis=(0, 1, 3))  # (H,)
        var_x = real.var(axis=0).mean(axis=1)
        between = p50.var(axis=0).mean(axis=1)
        mse = ((real - p50) ** 2).mean(axis=(0, 2))
        target = np.maximum(var_x - between, 0.1 * mse)
        self.scale_ = np.sqrt(target / np.maximum(model_within, 1e-12))  # (H,)
        self.calibration_anchors_ = anchors
        self.budget_ = {"var_x": var_x, "between": between, "model_within": model_within,
                        "target": target}

    def _sample(self, log_contexts, n_samples, rngs):
        draws = self.prior_paths(log_contexts, n_samples, rngs)
        center = self.model_.median(log_contexts)[:, None]
        s = self.scale_.reshape(1, 1, -1, 1, 1)
        return center + s * (draws - center)
