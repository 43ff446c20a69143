"""`backfill evaluate` and `backfill diagnose` on a tiny synthetic market.

One CVAE is trained per module (saved as a checkpoint, so every run below loads it) and one
tiny evaluation is run; the other tests reuse both. The report's numbers are checked against
``engine.metrics`` recomputed from the samples of one method; the derived (uncalibrated)
kNN against a separately fitted one; and the fit against a poisoned test split (no leakage).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from engine import metrics
from engine.cli import app
from engine.config import to_toml
from engine.data.panel import Panel
from engine.diagnose import run_diagnose
from engine.errors import ConfigError, DataError
from engine.evaluate import (
    PooledMoments,
    check_fit_history,
    check_horizons,
    evaluation_windows,
    fit_methods,
    resolve_methods,
    run_evaluation,
    sample_windows,
)
from engine.model import save_checkpoint
from engine.pipeline import Prepared, get_model, prepare
from engine.rng import EVALUATION, node_rng
from engine.samplers import make_sampler
from engine.train import train_model
from tests.conftest import tiny_config, toy_panel

METHODS = ["oracle", "knn", "knn-conformal", "cvae-prior", "hist-bootstrap"]
HORIZON_KEYS = ("coverage90", "coverage50", "width90", "crps", "energy", "marginal_std_ratio",
                "within_var_share", "between_var_share")
SCALAR_KEYS = ("roughness_ratio", "pit_ks", "regime_coverage90", "calendar_violations",
               "var_backtest")


def eval_config(**overrides):
    return tiny_config(**{"seed": 5, "data.synthetic.n_days": 600, "train.epochs": 1,
                          "evaluate.methods": METHODS, **overrides})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny config, its prepared data, a trained model and its checkpoint."""
    cfg = eval_config()
    prep = prepare(cfg)
    model = get_model(prep, None)
    path = save_checkpoint(model, tmp_path_factory.mktemp("model") / "m.pt", cfg,
                           prep.panel.fingerprint, prep.panel.grid_dict())
    return cfg, prep, model, path


@pytest.fixture(scope="module")
def evaluated(setup, tmp_path_factory):
    cfg, _, _, path = setup
    out = tmp_path_factory.mktemp("eval")
    report = run_evaluation(cfg, out, model_path=path)
    return report, out


def _some_windows(prep: Prepared, n: int = 6):
    """n test contexts and a function that gives fresh per-row generators for them."""
    windows = evaluation_windows(prep)
    idx = np.linspace(0, windows.n - 1, n).astype(int)

    def rngs():
        return [node_rng(prep.config.seed, 0, int(a), EVALUATION) for a in windows.anchors[idx]]

    return windows.contexts[idx], rngs


# ----------------------------------------------------------------------------- the report


def test_report_has_the_required_shape_and_valid_numbers(evaluated):
    report, out = evaluated
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert {"data", "split", "n_windows", "horizons", "methods"} <= set(report)
    assert {"source", "fingerprint", "grid"} <= set(report["data"])
    assert report["horizons"] == [1, 3, 6]
    assert report["n_windows"] > 50
    assert set(report["methods"]) == set(METHODS)
    hkeys = {"1", "3", "6"}
    for name, m in report["methods"].items():
        assert set(HORIZON_KEYS) | set(SCALAR_KEYS) | {"crps_vs_oracle"} <= set(m), name
        for key in HORIZON_KEYS + ("crps_vs_oracle",):
            assert set(m[key]) == hkeys, (name, key)
        for h in hkeys:
            assert 0 <= m["coverage90"][h] <= 1 and 0 <= m["coverage50"][h] <= 1
            assert m["coverage50"][h] <= m["coverage90"][h]
            assert m["crps"][h] > 0 and m["energy"][h] > 0 and m["width90"][h] > 0
            assert m["marginal_std_ratio"][h] > 0
            assert m["within_var_share"][h] >= 0 and m["between_var_share"][h] >= 0
        assert set(m["regime_coverage90"]) == {"q1", "q2", "q3", "q4"}
        assert all(0 <= v <= 1 for v in m["regime_coverage90"].values())
        assert 0 <= m["pit_ks"] <= 1 and m["roughness_ratio"] > 0
        assert 0 <= m["calendar_violations"] <= 1
        # Horizon 6 < 10: only the 1-day VaR is backtested.
        assert set(m["var_backtest"]) == {"1_0.95", "1_0.99"}
        for key, v in m["var_backtest"].items():
            assert isinstance(v["exceptions"], int) and 0 <= v["kupiec_p"] <= 1
            level = float(key.split("_")[1])
            assert v["expected"] == pytest.approx(report["n_windows"] * (1 - level))
        assert m["fit_seconds"] >= 0 and m["sample_seconds"] > 0
    assert report["methods"]["oracle"]["crps_vs_oracle"] == {h: 1.0 for h in hkeys}
    assert report["methods"]["knn"]["fit_shared_with"] == "knn-conformal"
    assert report["timings"]["total_seconds"] > 0
    # The raw CVAE is over-confident; the calibrated kNN covers near 90% at every horizon
    # (even at this tiny size: about 100 test windows), neither too narrow nor too wide.
    cov = {n: np.mean(list(m["coverage90"].values())) for n, m in report["methods"].items()}
    assert cov["cvae-prior"] < 0.5
    calibrated = report["methods"]["knn-conformal"]["coverage90"]
    assert all(0.8 <= calibrated[h] <= 0.97 for h in hkeys), calibrated
    for name in ("report.md", "coverage.png", "coverage_by_year.png", "pit.png", "fans.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "Coverage of the 90% band" in md and "knn-conformal" in md and "Timings" in md
    assert "Coverage of the 90% band by test year" in md


def test_the_markdown_writes_ranges_and_notes_as_they_are(evaluated):
    """Half-open day ranges as [start, stop); the overlap caveat only for a multi-day VaR."""
    import copy

    from engine.report import evaluation_markdown

    report, out = evaluated
    md = (out / "report.md").read_text()
    train = report["split"]["train"]
    assert f"train [{train[0]}, {train[1]})" in md
    keys = {k for m in report["methods"].values() for k in m["var_backtest"]}
    assert keys and all(k.startswith("1_") for k in keys)  # horizon 6: only the 1-day VaR
    assert "serially dependent" not in md
    longer = copy.deepcopy(report)
    for m in longer["methods"].values():
        m["var_backtest"]["5_0.95"] = {"exceptions": 1, "expected": 1.0, "kupiec_p": 0.5}
    assert "5-day VaR serially dependent, so its p-value" in evaluation_markdown(longer)
    for m in longer["methods"].values():
        m["var_backtest"]["10_0.95"] = m["var_backtest"]["5_0.95"]
    assert "5-day and 10-day VaR serially dependent, so their" in evaluation_markdown(longer)


def test_the_summary_restates_the_tables(evaluated):
    """The summary's counts, farthest coverage, lowest CRPS and CRPS ratio, recomputed from
    report.json; and the warning about overlapping windows on so short a test span."""
    report, out = evaluated
    md = (out / "report.md").read_text()
    summary = md[md.index("## Summary"):md.index("## Coverage of the 90% band\n")]
    horizons = report["horizons"]
    n, stride = report["n_windows"], report["split"]["window_stride"]
    h = max(horizons)
    spanned = ((n - 1) * stride + h) / h  # the outcomes' days in stretches of h
    assert f"at {h} days they hold about {spanned:.1f} non-overlapping" in summary
    assert ("too few for a coverage" in summary) == (spanned < 20)
    from engine.report import summary_markdown

    sparse = {**report, "n_windows": 10, "split": {**report["split"], "window_stride": 100}}
    text = "\n".join(summary_markdown(sparse))
    assert f"the 10 test windows do not overlap at {h} days, too few" in text
    for name, m in report["methods"].items():
        cov = {h: m["coverage90"][str(h)] for h in horizons}
        inside = sum(0.85 <= c <= 0.95 for c in cov.values())
        far = max(horizons, key=lambda h: abs(cov[h] - 0.9))
        assert f"| {name} | {inside} of {len(horizons)} | {cov[far]:.3f} at {far}d |" in summary
    best = [min((name for name in report["methods"] if name != "oracle"),
                key=lambda name: report["methods"][name]["crps"][str(h)]) for h in horizons]
    assert "| lowest CRPS (oracle aside) | " + " | ".join(best) + " |" in summary
    own = report["methods"]["knn-conformal"]["crps"]
    base = report["methods"]["hist-bootstrap"]["crps"]  # the one baseline evaluated here
    assert "| knn-conformal CRPS / best baseline's | " + " | ".join(
        f"{own[str(h)] / base[str(h)]:.3f}" for h in horizons) + " |" in summary


def test_scores_equal_metrics_recomputed_from_the_samples(setup, evaluated):
    """hist-bootstrap needs no model: refit it and recompute the scores from full samples."""
    cfg, prep, _, _ = setup
    report, _ = evaluated
    scored = report["methods"]["hist-bootstrap"]
    sampler = make_sampler("hist-bootstrap", cfg).fit(prep.fit_panel())
    w = evaluation_windows(prep)
    rngs = [node_rng(cfg.seed, 0, int(a), EVALUATION) for a in w.anchors]
    paths = sampler.sample(w.contexts, cfg.evaluate.n_samples, rngs)  # (W, M, H, n_m, n_tau)
    W, M, H = paths.shape[:3]
    flat = paths.reshape(W, M, H, -1)
    real = w.realised.reshape(W, H, -1)
    inside = []
    for h in report["horizons"]:
        s = flat[:, :, h - 1].astype(np.float32)  # the report keeps float32 samples
        y = real[:, h - 1]
        key = str(h)
        assert scored["coverage90"][key] == pytest.approx(metrics.coverage(s, y, 0.9), abs=1e-12)
        assert scored["coverage50"][key] == pytest.approx(metrics.coverage(s, y, 0.5), abs=1e-12)
        assert scored["width90"][key] == pytest.approx(metrics.width(s, 0.9), rel=1e-10)
        assert scored["crps"][key] == pytest.approx(metrics.crps_ensemble(s, y).mean(), rel=1e-10)
        assert scored["within_var_share"][key] == pytest.approx(
            metrics.variance_budget(s, y)["within_var_share"], rel=1e-10)
        inside.append(metrics.coverage_by_group(s, y, 0.9, w.regime, 4))
        # By the anchor's calendar year; the windows of the years make up all the windows.
        years = np.array([int(str(d)[:4]) for d in prep.panel.dates[w.anchors]])
        per_year = scored["coverage90_by_year"][key]
        assert sorted(per_year) == [str(y) for y in np.unique(years)]
        for year, v in per_year.items():
            sel = years == int(year)
            assert v == pytest.approx(metrics.coverage(s[sel], y[sel], 0.9)), year
        counts = np.array([(years == int(y)).sum() for y in per_year])
        assert np.dot(counts, list(per_year.values())) / counts.sum() == pytest.approx(
            scored["coverage90"][key])
    pooled = np.mean(inside, axis=0)
    assert [scored["regime_coverage90"][f"q{q + 1}"] for q in range(4)] == pytest.approx(pooled)
    # Roughness: daily changes in iv units (the definition), and beside it in log-IV.
    assert scored["roughness_ratio"] == pytest.approx(metrics.roughness_ratio(flat, real),
                                                      rel=1e-9)
    assert scored["roughness_ratio_log"] == pytest.approx(
        metrics.roughness_ratio(np.log(flat), np.log(real)), rel=1e-9)
    assert scored["roughness_ratio"] != pytest.approx(scored["roughness_ratio_log"], rel=1e-6)
    # The rest by plain loops, not by the metrics module: the pooled marginal spread, the
    # between-context share, the PIT's KS distance and the VaR backtest of the vega P&L.
    pits = []
    for h in report["horizons"]:
        s64, y = flat[:, :, h - 1].astype(np.float32).astype(np.float64), real[:, h - 1]
        ratios = [s64[:, :, g].std() / y[:, g].std() for g in range(y.shape[1])]
        assert scored["marginal_std_ratio"][str(h)] == pytest.approx(np.mean(ratios), rel=1e-9)
        between = [s64[:, :, g].mean(axis=1).var() / y[:, g].var() for g in range(y.shape[1])]
        assert scored["between_var_share"][str(h)] == pytest.approx(np.mean(between), rel=1e-9)
        pits.append((s64 <= y[:, None, :]).mean(axis=1))
    assert scored["pit_ks"] == pytest.approx(
        scipy.stats.kstest(np.concatenate([p.ravel() for p in pits]), "uniform").statistic)
    start = w.contexts[:, -1].reshape(W, -1)  # the last context day, the P&L's base
    sampled = (flat[:, :, 0] - start[:, None]).sum(-1)  # (W, M): 1-day P&L of each sample
    realised = (real[:, 0] - start).sum(-1)
    for level in (0.95, 0.99):
        var = np.array([np.quantile(-sampled[i], level) for i in range(W)])
        got = scored["var_backtest"][f"1_{level:g}"]
        assert got["exceptions"] == int((-realised > var).sum())
        assert got["expected"] == pytest.approx(W * (1 - level))


def test_pooled_steps_equal_the_moments_of_the_differences():
    rng = np.random.default_rng(5)
    paths = [rng.normal(-1.5, 0.3, size=(b, 7, 12, 3)).cumsum(axis=2) for b in (4, 1, 9)]
    fast, slow = PooledMoments(), PooledMoments()
    for p in paths:
        fast.add_steps(p, axis=2)
        slow.add(np.diff(p, axis=2))
    steps = np.concatenate([np.diff(p, axis=2).ravel() for p in paths])
    assert fast.n == slow.n == steps.size
    assert fast.mean == pytest.approx(steps.mean(), rel=1e-12)
    assert fast.std == pytest.approx(steps.std(), rel=1e-12)
    assert slow.std == pytest.approx(steps.std(), rel=1e-12)
    empty = PooledMoments()
    empty.add_steps(paths[0][:, :, :1], axis=2)  # one day: no step
    assert empty.n == 0


def test_sampling_is_batch_independent(setup, monkeypatch):
    cfg, prep, _, _ = setup
    sampler = make_sampler("hist-bootstrap", cfg).fit(prep.fit_panel())
    w = evaluation_windows(prep)
    big = sample_windows(sampler, w, [1, 6], 20, cfg.seed)
    monkeypatch.setattr("engine.evaluate.MAX_BATCH", 3)
    small = sample_windows(sampler, w, [1, 6], 20, cfg.seed)
    np.testing.assert_array_equal(big.kept, small.kept)
    np.testing.assert_array_equal(big.var_pnl[1], small.var_pnl[1])
    np.testing.assert_array_equal(big.fans, small.fans)
    assert big.roughness.std == pytest.approx(small.roughness.std, rel=1e-12)
    assert big.roughness_log.std == pytest.approx(small.roughness_log.std, rel=1e-12)


# ----------------------------------------------------------------------------- shared fits


def _fit_together(setup, methods: list[str]) -> dict:
    """fit_methods over ``methods``, as `evaluate` runs it (kNN members share one fit)."""
    cfg, prep, model, _ = setup
    specs, _ = resolve_methods(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"methods": methods})}), has_market=True)
    return fit_methods(prep, model, specs)


def test_the_fits_notes_reach_the_report(setup):
    """What a kNN fit warns of (a thin bank, neighbours hardly local) is kept with the
    report's notes, not only said on the console."""
    cfg, prep, model, _ = setup
    specs, _ = resolve_methods(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"methods": ["knn-conformal"]})}), has_market=True)
    specs = [replace(specs[0], config=specs[0].config.model_copy(update={
        "sampler": specs[0].config.sampler.model_copy(update={"k": 200})}))]  # most episodes
    notes: list[str] = []
    fitted = fit_methods(prep, model, specs, notes=notes)
    said = fitted["knn-conformal"].sampler.notes("knn-conformal")
    assert said and notes == said and "hardly local" in " ".join(notes)


def test_derived_knn_equals_a_separately_fitted_knn(setup):
    cfg, prep, model, _ = setup
    fitted = _fit_together(setup, ["knn", "knn-conformal"])
    derived, conformal = fitted["knn"].sampler, fitted["knn-conformal"].sampler
    assert fitted["knn"].shared_with == "knn-conformal"
    assert derived.bank_ is conformal.bank_  # shared, not refitted or copied
    assert not hasattr(derived, "scale_") and hasattr(conformal, "scale_")
    separate = make_sampler("knn", cfg).fit(prep.fit_panel(), model)
    ctx, rngs = _some_windows(prep)
    a = derived.sample(ctx, 40, rngs())
    np.testing.assert_array_equal(a, separate.sample(ctx, 40, rngs()))
    c = conformal.sample(ctx, 40, rngs())
    assert not np.array_equal(a, c)  # the conformal scale does change the draws


def test_no_test_information_reaches_the_fit(setup):
    """Poison every day from the test split's embargo on; the fitted samplers must not notice."""
    cfg, prep, model, _ = setup
    p = prep.panel
    stop = prep.splits.pre_test_stop()
    wild = p.surface.copy()
    rng = np.random.default_rng(0)
    wild[stop:] = p.surface[stop:] * 5 * rng.uniform(0.2, 2.0, p.surface[stop:].shape)
    # Without the market: the oracle (the only sampler that reads it) is not being tested.
    clean = Panel(p.surface, p.dates, p.moneyness, p.maturity_days, source="clean")
    poisoned = Panel(wild, p.dates, p.moneyness, p.maturity_days, source="poisoned")
    assert not np.array_equal(clean.surface, poisoned.surface)
    names = ["cvae-prior", "cvae-scaled", "knn", "knn-conformal", "knn-conformal-pca",
             "knn-conformal-features", "hist-bootstrap", "fhs", "pca-ar"]
    run_cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"methods": names})})
    specs, _ = resolve_methods(run_cfg, has_market=False)
    fit_a = fit_methods(Prepared(run_cfg, clean, prep.splits), model, specs)
    fit_b = fit_methods(Prepared(run_cfg, poisoned, prep.splits), model, specs)
    ctx, rngs = _some_windows(prep)  # clean test contexts for both
    for name in names:
        a = fit_a[name].sampler.sample(ctx, 30, rngs())
        b = fit_b[name].sampler.sample(ctx, 30, rngs())
        np.testing.assert_array_equal(a, b, err_msg=name)


# ----------------------------------------------------------------------------- methods, CLI


def test_oracle_is_skipped_with_a_note_on_real_data(tmp_path):
    panel = toy_panel(300)
    path = tmp_path / "toy.npz"
    np.savez(path, surface=panel.surface, dates=panel.dates.astype(str),
             moneyness=panel.moneyness, maturity_days=panel.maturity_days)
    cfg = tiny_config(**{"data.source": str(path), "evaluate.methods": ["oracle", "hist-bootstrap"],
                         "evaluate.n_samples": 20})
    report = run_evaluation(cfg, tmp_path / "out")
    assert list(report["methods"]) == ["hist-bootstrap"]
    assert any("oracle skipped" in n for n in report["notes"])
    assert "crps_vs_oracle" not in report["methods"]["hist-bootstrap"]
    assert "oracle skipped" in (tmp_path / "out" / "report.md").read_text()
    only_oracle = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"methods": ["oracle"]})})
    with pytest.raises(ConfigError, match=r"no method .*given: oracle \(oracle needs the "
                                          r"synthetic market\).*knn-conformal-online"):
        run_evaluation(only_oracle, tmp_path / "out2")


def test_synthetic_test_split_runs_on_through_the_extension(setup, tmp_path):
    """On the synthetic market ``evaluate`` scores ``data.synthetic.test_days`` more days: the
    fit history, the train split and the model's fingerprint check are those of the history;
    the test split reaches the end of the extension with the automatic window stride."""
    _, prep, _, model_path = setup
    long_cfg = eval_config(**{"data.synthetic.test_days": 900, "evaluate.max_windows": 40,
                              "evaluate.methods": ["oracle", "hist-bootstrap", "knn"],
                              "evaluate.n_samples": 20})
    long = prepare(long_cfg, evaluation=True)
    assert long.panel.n_days == prep.panel.n_days + 900
    assert long.fit_panel().fingerprint == prep.fit_panel().fingerprint
    for name in ("train", "calibration"):
        np.testing.assert_array_equal(long.splits.anchors(name), prep.splits.anchors(name))
    assert long.splits.ranges["test"] == (prep.splits.ranges["test"][0], prep.panel.n_days + 900)
    windows = evaluation_windows(long)
    n_all = len(long.splits.anchors("test"))
    assert 30 < windows.n <= 40 and windows.anchors[-1] > prep.panel.n_days
    assert np.diff(windows.anchors).tolist() == [-(-n_all // 40)] * (windows.n - 1)
    report = run_evaluation(long_cfg, tmp_path / "out", model_path=model_path)  # no refusal
    assert report["data"]["test_extension_days"] == 900
    assert report["data"]["fingerprint"] == prep.panel.fingerprint
    assert report["n_windows"] == windows.n and report["split"]["window_stride"] > 1
    assert "runs on for 900 days" in (tmp_path / "out" / "report.md").read_text()
    assert sum(report["test_year_windows"].values()) == windows.n
    # Split dates must lie in the history: the extension is for scoring only.
    beyond = eval_config(**{"data.synthetic.test_days": 900, "data.calibration_start": "2000-06-01",
                            "data.test_start": str(long.panel.dates[prep.panel.n_days + 10])})
    with pytest.raises(DataError, match="after the last date of the history"):
        prepare(beyond, evaluation=True)
    assert not (prepare(long_cfg).panel.n_days - prep.panel.n_days)  # other commands: history


def test_method_names_and_horizons_are_validated():
    cfg = eval_config(**{"evaluate.methods": ["knn", "knn-conformal-pca", "knn-pca"]})
    specs, notes = resolve_methods(cfg, has_market=True)
    assert [s.name for s in specs] == ["knn", "knn-conformal-pca", "knn-pca"]
    assert [s.config.sampler.point for s in specs] == ["cvae", "pca-ar", "pca-ar"]
    assert specs[1].knn_group == specs[2].knn_group != specs[0].knn_group
    with pytest.raises(ValidationError, match="unknown method.*'knn-magic'"):  # on load
        eval_config(**{"evaluate.methods": ["knn-magic"]})
    kept, notes = check_horizons(eval_config(**{"evaluate.horizons": [1, 6, 30]}))
    assert kept == [1, 6] and "30" in notes[0]
    with pytest.raises(ConfigError, match="beyond data.horizon"):
        check_horizons(eval_config(**{"evaluate.horizons": [30]}))


def test_cli_evaluate_runs_and_rejects_a_bad_method(setup, tmp_path):
    cfg, _, _, _ = setup
    toml = tmp_path / "tiny.toml"
    toml.write_text(to_toml(cfg))
    runner = CliRunner()
    ok = runner.invoke(app, ["evaluate", "--config", str(toml), "--out", str(tmp_path / "o"),
                             "--methods", "hist-bootstrap,cvae-prior,oracle", "--n-samples", "20"])
    assert ok.exit_code == 0, ok.stderr + ok.stdout
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert list(report["methods"]) == ["hist-bootstrap", "cvae-prior", "oracle"]
    assert report["n_samples"] == 20
    bad = runner.invoke(app, ["evaluate", "--config", str(toml), "--out", str(tmp_path / "b"),
                              "--methods", "knn,knn-magic"])
    assert bad.exit_code == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "knn-magic" in lines[0] and "Traceback" not in bad.stderr
    assert not (tmp_path / "b").exists()


def test_cli_evaluate_backtests_the_var_of_a_position_file(setup, tmp_path):
    """--position: the VaR backtest scores that book (here short 3 vega at one point, long 1
    at another), recomputed here from a refitted sampler's samples by a plain loop; a bad
    file is refused in one line before any work."""
    cfg, prep, _, _ = setup
    toml = tmp_path / "tiny.toml"
    toml.write_text(to_toml(cfg))
    grid = prep.panel.grid_dict()
    book = tmp_path / "book.csv"
    book.write_text(f"moneyness,maturity_days,vega\n{grid['moneyness'][0]!r},"
                    f"{grid['maturity_days'][1]!r},-3\n{grid['moneyness'][2]!r},"
                    f"{grid['maturity_days'][0]!r},1\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["evaluate", "--config", str(toml), "--out", str(tmp_path / "o"),
                             "--methods", "hist-bootstrap", "--n-samples", "200", "--position",
                             str(book)])
    assert ok.exit_code == 0, ok.stderr + ok.stdout
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["var_position"] == str(book)
    assert f"VaR backtest of a vega position: {book}" in (tmp_path / "o" / "report.md").read_text()
    sampler = make_sampler("hist-bootstrap", cfg).fit(prep.fit_panel())
    w = evaluation_windows(prep)
    rngs = [node_rng(cfg.seed, 0, int(a), EVALUATION) for a in w.anchors]
    paths = sampler.sample(w.contexts, 200, rngs)  # (W, M, H, n_m, n_tau)
    start = w.contexts[:, -1]
    got = report["methods"]["hist-bootstrap"]["var_backtest"]
    assert sorted(got) == ["1_0.95", "1_0.99"]  # the 10-day VaR lies past this horizon (6)
    for key, scored in got.items():
        h, level = int(key.split("_")[0]), float(key.split("_")[1])
        n = 0
        for i in range(w.n):
            end = paths[i, :, h - 1].astype(np.float32).astype(np.float64)  # (M, n_m, n_tau)
            pnl = -3 * (end[:, 0, 1] - start[i, 0, 1]) + (end[:, 2, 0] - start[i, 2, 0])
            real = (-3 * (w.realised[i, h - 1, 0, 1] - start[i, 0, 1])
                    + (w.realised[i, h - 1, 2, 0] - start[i, 2, 0]))
            n += int(-real > np.quantile(-pnl, level))
        assert scored["exceptions"] == n, key
    default = runner.invoke(app, ["evaluate", "--config", str(toml), "--out", str(tmp_path / "d"),
                                  "--methods", "hist-bootstrap", "--n-samples", "200"])
    assert default.exit_code == 0, default.stderr
    plain = json.loads((tmp_path / "d" / "report.json").read_text())
    assert plain["var_position"] == "long 1 vega per grid point"
    assert plain["methods"]["hist-bootstrap"]["crps"] == report["methods"]["hist-bootstrap"]["crps"]
    assert plain["methods"]["hist-bootstrap"]["var_backtest"] != got
    off = tmp_path / "off.csv"
    off.write_text("moneyness,maturity_days,vega\n0.123,30,1\n")
    bad = runner.invoke(app, ["evaluate", "--config", str(toml), "--out", str(tmp_path / "b"),
                              "--methods", "hist-bootstrap", "--position", str(off)])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "not on the data's grid" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "b" / "report.json").exists()


def test_a_failed_write_keeps_the_last_complete_report(setup, tmp_path, monkeypatch):
    """A full disk half-way through the files: the folder keeps the last whole report (not
    a truncated report.json beside a stale report.md), and no scratch files."""
    import errno

    import engine.report

    _, _, _, path = setup
    killed, writing = tmp_path / ".partial-killed", tmp_path / ".partial-writing"
    for stage in (killed, writing):  # one left by a killed run, one in use right now
        stage.mkdir()
        (stage / "pit.png").write_bytes(b"half")
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    cfg = eval_config(**{"evaluate.methods": ["hist-bootstrap"], "evaluate.n_samples": 20})
    run_evaluation(cfg, tmp_path, model_path=path)
    assert not killed.exists() and (writing / "pit.png").is_file()
    shutil.rmtree(writing)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert {"report.json", "report.md", "pit.png"} <= set(before)

    def full_at_pit(report, path):  # raised by the file's own write, named by its path
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(engine.report, "plot_pit", lambda pits, report, path:
                        full_at_pit(report, path))
    more = eval_config(**{"evaluate.methods": ["hist-bootstrap", "fhs"],
                          "evaluate.n_samples": 20})
    with pytest.raises(OSError, match="No space") as err:
        run_evaluation(more, tmp_path, model_path=path)
    assert err.value.filename == str(tmp_path / "pit.png")  # not the stage's, gone by then
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    # a folder where a report file goes: refused before any file moves
    monkeypatch.undo()
    (tmp_path / "report.json").rename(tmp_path / "kept.json")
    (tmp_path / "report.json").mkdir()
    with pytest.raises(ConfigError, match="report.json is a folder"):
        run_evaluation(more, tmp_path, model_path=path)
    assert (tmp_path / "report.md").read_bytes() == before["report.md"]
    assert not list(tmp_path.glob(".partial-*"))


# ----------------------------------------------------------------------------- diagnose


def test_diagnose_writes_its_report(setup, tmp_path):
    cfg, prep, model, path = setup
    result = run_diagnose(cfg, tmp_path, model_path=path)
    assert {"decoder_sensitivity", "context_vs_z", "posterior_vs_prior", "kl",
            "neighbour_variance", "regime_separation", "variance_budget"} <= set(result)
    std = list(result["decoder_sensitivity"]["std_by_noise_scale"].values())
    assert std[0] == pytest.approx(0, abs=1e-6) and std[-1] > std[1]  # noise 0 -> no spread
    assert set(result["variance_budget"]) == {"1", "3", "6"}
    assert set(result["neighbour_variance"]["share"]) == {"1", "3", "6"}
    assert -1 <= result["regime_separation"]["silhouette"] <= 1
    assert result["kl"] >= 0
    # The KL matches the model's own training loss term on the same windows.
    anchors = prep.splits.anchors("calibration")
    C, H = cfg.data.context, cfg.data.horizon
    model.eval()
    with torch.no_grad():
        kl = model.loss(torch.as_tensor(prep.panel.contexts_at(anchors, C), dtype=torch.float32),
                        torch.as_tensor(prep.panel.targets_at(anchors, H), dtype=torch.float32),
                        use_prior=False)["kl"]
    assert result["kl"] == pytest.approx(float(kl), rel=1e-4)
    # The residual share is the p50's realised squared error over Var X, per grid point,
    # averaged (recomputed here window by window)
    realised = np.exp(prep.panel.targets_at(anchors, H)).reshape(len(anchors), H, -1)
    p50 = np.stack([np.exp(model.median(prep.panel.contexts_at(anchors[i:i + 1], C)))
                    .reshape(H, -1) for i in range(len(anchors))])
    for h in ("1", "6"):
        x, m = realised[:, int(h) - 1], p50[:, int(h) - 1]
        want = np.mean(((x - m) ** 2).mean(axis=0) / x.var(axis=0))
        assert result["variance_budget"][h]["residual_share"] == pytest.approx(want, rel=1e-5)
    # PC 1 points to higher levels; small shares keep their digits in the Markdown
    assert result["regime_separation"]["pc1_level_corr"] >= 0
    md = (tmp_path / "diagnose.md").read_text()
    within = result["variance_budget"]["6"]["within_share"]
    assert format(within, ".3g") in md and "residual share" in md and "KL(q || p)" in md
    for name in ("diagnose.json", "diagnose.md", "diagnose.png", "embedding.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "diagnose.json").read_text()) == result


def test_diagnose_refuses_windows_without_distant_neighbours_before_training(tmp_path):
    """A calibration split of 7 windows, each within the 6-day horizon of the others: no
    window has a neighbour whose targets do not overlap its own. Refused before the CVAE
    trains (it trained for nothing before), with the fix."""
    import io

    from rich.console import Console

    cfg = eval_config(**{"data.split_fractions": [0.8, 0.03, 0.17]})
    said = io.StringIO()
    with pytest.raises(DataError, match="but 7 windows leave 0; use a longer split, more data "
                                        "or a shorter data.horizon"):
        run_diagnose(cfg, tmp_path, console=Console(file=said))
    assert "training" not in said.getvalue() and not any(tmp_path.iterdir())


def test_evaluate_refuses_a_fit_history_too_short_for_the_bank_before_training(tmp_path):
    """The kNN methods fit on the days before the test split's embargo; where those are
    fewer than the residual bank needs (41 here: C 12, H 6, E 6), evaluate stops before the
    CVAE trains, naming split dates that would serve or, on a file too short for any, the
    days it needs (the bank's + the embargo + one test window)."""
    import io

    from rich.console import Console

    def refused(match: str, **overrides):
        cfg = eval_config(**overrides)
        said = io.StringIO()
        with pytest.raises(DataError, match=match):
            run_evaluation(cfg, tmp_path / "out", console=Console(file=said))
        assert "training" not in said.getvalue() and not (tmp_path / "out").exists()
        return " ".join(said.getvalue().split())

    shares = {"data.split_fractions": [0.03, 0.02, 0.95]}
    dates = prepare(eval_config(**shares)).panel.dates
    # test from day 41 + 6 (the fits see 41); calibration between day 12 + 6 + 6 (train keeps
    # a window before its embargo) and 41 - 6 (it keeps one before the test's): (24 + 35) // 2
    said = refused(r"fits knn, knn-conformal on the 30 days before .*\(of the data's 600\), and "
                   r"their cross-fitted residual bank needs at least 41 .*set data.test_start on "
                   rf"or after {dates[47]} \(with data.calibration_start before it, e.g. "
                   rf"{dates[29]}; the test split then holds up to 548 windows\), or leave the "
                   r"kNN methods out", **shares)
    dated = eval_config(**{"data.calibration_start": str(dates[29]),
                           "data.test_start": str(dates[47])})
    splits = prepare(dated).splits  # the dates named serve: the bank gets its 41 days
    assert splits.pre_test_stop() == 41 and len(splits.anchors("test")) == 548
    assert len(splits.anchors("train")) and len(splits.anchors("calibration"))
    assert "non-overlapping" not in said  # 559 windows: 93 outcomes of 6 days
    # a 60-day embargo: the bank needs 2 (6 + 60) + 12 + 6 - 1 = 149 days, a file 149 + 66
    short = {"data.synthetic.n_days": 200, "data.embargo": 60,
             "data.split_fractions": [0.2, 0.35, 0.45]}
    said = refused(r"on the 110 days .*\(of the data's 200\).*needs at least 149 .*set "
                   r"data.synthetic.n_days to at least 215 and data.test_start on or after day "
                   r"210 of it", **short)
    longer = eval_config(**{**short, "data.synthetic.n_days": 215})
    dated = longer.model_copy(update={"data": longer.data.model_copy(update={
        "calibration_start": str(prepare(longer).panel.dates[105]),
        "test_start": str(prepare(longer).panel.dates[209])})})
    check_fit_history(prepare(dated, evaluation=True), resolve_methods(dated, True)[0])
    assert len(prepare(dated, evaluation=True).splits.anchors("test")) == 1  # as named
    # and the console says, as the report's summary would, how little 25 windows decide
    assert ("note: the 25 test windows overlap: at 6 days they hold about 5.0 non-overlapping "
            "outcomes, too few for a coverage, CRPS, std ratio or variance share") in said
    # without a kNN method there is no bank to refuse: the same short history is scored
    cfg = eval_config(**short, **{"evaluate.methods": ["hist-bootstrap"]})
    assert "hist-bootstrap" in run_evaluation(cfg, tmp_path / "hist")["methods"]


def test_diagnose_through_the_cli(setup, tmp_path):
    cfg, _, _, path = setup
    toml = tmp_path / "tiny.toml"
    toml.write_text(to_toml(cfg))
    res = CliRunner().invoke(app, ["diagnose", "--config", str(toml), "--model", str(path),
                                   "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.stderr
    assert Path(tmp_path / "d" / "diagnose.json").is_file()


def test_online_variant_shares_the_split_fit_and_equals_an_online_fit(setup):
    """`knn-conformal-online` reuses knn-conformal's bank; its end-of-history scale is that of
    a sampler fitted with sampler.conformal = 'online', and after observe() each test window
    gets its own day's scale."""
    cfg, prep, model, _ = setup
    fitted = _fit_together(setup, ["knn-conformal", "knn-conformal-online"])
    split, online = fitted["knn-conformal"].sampler, fitted["knn-conformal-online"].sampler
    assert fitted["knn-conformal-online"].shared_with == "knn-conformal"
    assert online.bank_ is split.bank_ and online.config.sampler.conformal == "online"
    assert split.config.sampler.conformal == "split"
    online_cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(
        update={"conformal": "online"})})
    separate = make_sampler("knn-conformal", online_cfg).fit(prep.fit_panel(), model)
    np.testing.assert_array_equal(online.scale_, separate.scale_)
    ctx, rngs = _some_windows(prep)
    np.testing.assert_array_equal(online.sample(ctx, 40, rngs()),
                                  separate.sample(ctx, 40, rngs()))
    for s in (online, split):
        s.observe(prep.panel)
        assert s.scale_path_.shape == (prep.panel.n_days, cfg.data.horizon)
    last = evaluation_windows(prep).anchors[-1]
    assert not np.array_equal(online.scale_path_[last], online.split_scale_)
    assert np.array_equal(split.scale_path_[last], split.split_scale_)


def test_features_variant_shares_the_bank_and_equals_a_features_fit(setup):
    """`knn-conformal-features` reuses knn-conformal's residual bank (no second
    cross-fitting) with its own keys and scores, and samples as a sampler fitted from
    scratch with sampler.embedding = 'features' would."""
    cfg, prep, model, _ = setup
    fitted = _fit_together(setup, ["knn-conformal", "knn-conformal-features"])
    cvae, feat = fitted["knn-conformal"].sampler, fitted["knn-conformal-features"].sampler
    assert fitted["knn-conformal-features"].shared_with == "knn-conformal"
    assert feat.bank_ is cvae.bank_ and feat.keys_.embedding == "features"
    assert cvae.keys_.embedding == "cvae" and cvae.config.sampler.embedding == "cvae"
    assert not np.array_equal(feat.scores_, cvae.scores_)
    feat_cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(
        update={"embedding": "features"})})
    separate = make_sampler("knn-conformal", feat_cfg).fit(prep.fit_panel(), None)
    np.testing.assert_array_equal(feat.split_scale_, separate.split_scale_)
    ctx, rngs = _some_windows(prep)
    a = feat.sample(ctx, 40, rngs())
    np.testing.assert_array_equal(a, separate.sample(ctx, 40, rngs()))
    assert not np.array_equal(a, cvae.sample(ctx, 40, rngs()))
    # anything that would change the bank is refused
    other_k = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"k": 3})})
    with pytest.raises(ConfigError, match="rekeyed"):
        cvae.rekeyed(other_k, prep.fit_panel(), model)
    with pytest.raises(DataError, match="the same data"):  # not the fitted history
        cvae.rekeyed(feat_cfg, prep.panel, model)


def test_a_model_that_learned_from_the_test_span_is_refused(setup, tmp_path):
    """A checkpoint trained with another split (here: on every window) would carry test
    outcomes into every score that uses the model: evaluate refuses it, naming the dates."""
    cfg, prep, _, _ = setup
    panel = prep.panel
    H, C = cfg.data.horizon, cfg.data.context
    leaky = train_model(panel, np.arange(C - 1, panel.n_days - H), cfg).model
    path = save_checkpoint(leaky, tmp_path / "leaky.pt", cfg, panel.fingerprint,
                           panel.grid_dict())
    with pytest.raises(ConfigError, match=r"learned from days up to .* test split's embargo"):
        run_evaluation(cfg, tmp_path / "out", model_path=path)
