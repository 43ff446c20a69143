"""The CVAE: shapes, non-crossing quantiles, checkpoints, and training (loss, seed, early stopping)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import engine.train
from engine.config import Config, parse_config
from engine.data.panel import make_splits
from engine.errors import CheckpointError, ConfigError, DataError
from engine.model import CVAE, MICRO, load_checkpoint, save_checkpoint
from engine.train import holdout_tail, train_model, validation_pinball
from tests.conftest import tiny_config, toy_panel

C, H = 12, 6


def fresh_model(cfg: Config | None = None, grid=(2, 3), seed: int = 0) -> CVAE:
    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    return CVAE(cfg.model, grid, cfg.data.context, cfg.data.horizon)


@pytest.fixture(scope="module")
def trained():
    """One short training run on the toy panel, shared by the tests that only read it."""
    panel = toy_panel()
    cfg = tiny_config(**{"train.epochs": 4})
    anchors = make_splits(panel, cfg.data).anchors("train")
    return panel, cfg, train_model(panel, anchors, cfg)


def contexts(panel, n: int = 7) -> np.ndarray:
    return panel.contexts_at(np.arange(C - 1, C - 1 + n), C)


# --- shapes and non-crossing ------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(1, 1), (1, 4), (2, 3), (7, 6)])
def test_shapes(grid):
    cfg = tiny_config(**{"model.quantiles": [0.05, 0.25, 0.5, 0.75, 0.95]})
    model = fresh_model(cfg, grid)
    log_ctx = np.log(0.2) + 0.05 * np.random.default_rng(0).standard_normal((5, C, *grid))
    q = model.forecast(log_ctx)
    assert q.shape == (5, 5, H, *grid) and q.dtype == np.float64
    assert model.embed(log_ctx).shape == (5, cfg.model.embed_dim)
    assert model.median(log_ctx).shape == (5, H, *grid)
    np.testing.assert_array_equal(model.median(log_ctx), q[:, 2])
    # the tensor path (bench's resident rate times it) in one full micro-batch: the same bits
    padded = np.concatenate([log_ctx, np.repeat(log_ctx[:1], MICRO - 5, axis=0)])
    with torch.no_grad():
        direct = model.eval().p50(torch.as_tensor(padded, dtype=torch.float32))[:5]
    np.testing.assert_array_equal(model.median(log_ctx), direct.numpy().astype(np.float64))
    eps = np.random.default_rng(1).standard_normal((5, 3, cfg.model.latent_dim))
    paths = model.decode_prior(log_ctx, eps)
    assert paths.shape == (5, 3, H, *grid)
    assert np.isfinite(paths).all() and np.isfinite(q).all()


def test_decode_prior_zero_noise_is_the_median():
    model = fresh_model()
    log_ctx = contexts(toy_panel(), 4)
    paths = model.decode_prior(log_ctx, np.zeros((4, 2, 2)))
    np.testing.assert_allclose(paths[:, 0], model.median(log_ctx), atol=1e-5)
    np.testing.assert_allclose(paths[:, 1], paths[:, 0])
    # A context's draws do not depend on the other contexts in the batch (bit for bit).
    eps = np.random.default_rng(3).standard_normal((4, 5, 2))
    np.testing.assert_array_equal(model.decode_prior(log_ctx[1:3], eps[1:3]),
                                  model.decode_prior(log_ctx, eps)[1:3])


def assert_non_crossing(q: np.ndarray) -> None:
    assert np.isfinite(q).all()
    assert (np.diff(q, axis=1) >= 0).all()


@pytest.mark.parametrize("seed", range(5))
def test_quantiles_never_cross_random_weights(seed):
    cfg = tiny_config(**{"model.quantiles": [0.01, 0.1, 0.3, 0.5, 0.6, 0.9, 0.99]})
    model = fresh_model(cfg, (3, 2), seed=seed)
    with torch.no_grad():  # large random weights, so the raw outputs are far from zero
        for p in model.parameters():
            p.normal_(0.0, 2.0)
    rng = np.random.default_rng(seed)
    log_ctx = rng.normal(np.log(0.2), 1.0, (16, C, 3, 2))
    assert_non_crossing(model.forecast(log_ctx))


@pytest.mark.parametrize("level", [np.log(1e-3), np.log(5.0), 25.0, -25.0])
def test_quantiles_never_cross_extreme_inputs(level):
    model = fresh_model()
    rng = np.random.default_rng(0)
    log_ctx = level + 3.0 * rng.standard_normal((8, C, 2, 3))
    assert_non_crossing(model.forecast(log_ctx))


def test_quantiles_never_cross_after_training(trained):
    panel, _, result = trained
    assert_non_crossing(result.model.forecast(contexts(panel, 50)))


# --- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path, trained):
    panel, cfg, result = trained
    model = result.model
    path = save_checkpoint(model, tmp_path / "sub" / "m.pt", cfg, panel.fingerprint,
                           panel.grid_dict(), result.history)
    blob = torch.load(path, weights_only=True)  # no arbitrary unpickling needed
    assert set(blob) >= {"state_dict", "meta"}
    loaded, meta = load_checkpoint(path, str(model.loc.device))  # cuda where it trained there
    log_ctx = contexts(panel, 9)
    np.testing.assert_array_equal(loaded.forecast(log_ctx), model.forecast(log_ctx))
    np.testing.assert_array_equal(loaded.embed(log_ctx), model.embed(log_ctx))
    eps = np.random.default_rng(0).standard_normal((9, 4, cfg.model.latent_dim))
    np.testing.assert_array_equal(loaded.decode_prior(log_ctx, eps),
                                  model.decode_prior(log_ctx, eps))
    assert meta["fingerprint"] == panel.fingerprint
    assert meta["grid"] == panel.grid_dict()
    assert (meta["context"], meta["horizon"]) == (C, H)
    assert Config.model_validate(meta["config"]) == cfg
    assert meta["history"] == result.history
    torch.testing.assert_close(loaded.loc, model.loc)
    torch.testing.assert_close(loaded.scale, model.scale)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a backfill checkpoint") as info:
        load_checkpoint(garbage)
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a backfill checkpoint"):
        load_checkpoint(other)


def test_foreign_files_raise_without_warnings(tmp_path):
    """A plain pickle (never unpickled) or a bare tensor is refused by the error alone:
    torch's warnings about them would reach the user's stderr beside it."""
    import pickle
    import warnings

    pickle.dump({"a": 1}, (tmp_path / "plain.pt").open("wb"), protocol=4)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for name in ("plain.pt", "tensor.pt"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(CheckpointError, match="not a backfill checkpoint"):
                load_checkpoint(tmp_path / name)
        assert not caught, (name, [str(w.message) for w in caught])


def test_damaged_checkpoint(tmp_path):
    model, cfg, panel = fresh_model(), tiny_config(), toy_panel(n_days=30)
    path = save_checkpoint(model, tmp_path / "m.pt", cfg, panel.fingerprint, panel.grid_dict())
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["meta"])
    cases = {
        "old.pt": ({**meta, "version": 0}, blob["state_dict"], "version 0"),
        "no-config.pt": ({k: v for k, v in meta.items() if k != "config"}, blob["state_dict"],
                         "damaged"),
        "other-grid.pt": ({**meta, "grid_shape": [3, 3]}, blob["state_dict"], "damaged"),
        "no-weights.pt": (meta, {}, "damaged"),
        "list-meta.pt": ([1, 2], blob["state_dict"], "version None"),
        "bad-end.pt": ({**meta, "train_end": "garbage"}, blob["state_dict"], "train_end"),
        "nat-end.pt": ({**meta, "train_end": "NaT"}, blob["state_dict"], "train_end"),
    }
    for name, (bad_meta, state, words) in cases.items():
        torch.save({"state_dict": state, "meta": json.dumps(bad_meta)}, tmp_path / name)
        with pytest.raises(CheckpointError, match=words) as info:
            load_checkpoint(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)


# --- training -----------------------------------------------------------------------------------
def test_training_loss_falls(trained):
    _, _, result = trained
    train = [h["train_pinball"] for h in result.history]
    assert len(train) == 4 and all(np.isfinite(train))
    assert train[-1] < train[0]
    assert result.val_pinball is not None and np.isfinite(result.val_pinball)


def test_training_beats_an_untrained_model(trained):
    panel, cfg, result = trained
    anchors = make_splits(panel, cfg.data).anchors("calibration")
    ctx = torch.as_tensor(panel.contexts_at(anchors, C), dtype=torch.float32)
    tgt = torch.as_tensor(panel.targets_at(anchors, H), dtype=torch.float32)
    untrained = fresh_model(cfg)
    untrained.loc.copy_(result.model.loc)
    untrained.scale.copy_(result.model.scale)
    assert validation_pinball(result.model, ctx, tgt) < validation_pinball(untrained, ctx, tgt)


def test_training_is_deterministic():
    panel = toy_panel(n_days=200)
    cfg = tiny_config(**{"train.epochs": 2})
    anchors = make_splits(panel, cfg.data).anchors("train")
    a = train_model(panel, anchors, cfg, seed=11).model.state_dict()
    b = train_model(panel, anchors, cfg, seed=11).model.state_dict()
    c = train_model(panel, anchors, cfg, seed=12).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_early_stopping_restores_best_epoch(monkeypatch):
    """Validation losses are scripted; the returned weights are those of the best epoch."""
    scripted = iter([0.50, 0.20, 0.35, 0.20, 0.40])
    snapshots = []
    real = engine.train.validation_pinball

    def fake(model, ctx, tgt):
        real(model, ctx, tgt)  # still exercises the real path
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(engine.train, "validation_pinball", fake)
    panel = toy_panel(n_days=200)
    cfg = tiny_config(**{"train.epochs": 5})
    anchors = make_splits(panel, cfg.data).anchors("train")
    result = train_model(panel, anchors, cfg)
    assert len(snapshots) == 5
    assert result.best_epoch == 2 and result.val_pinball == 0.20
    final = result.model.state_dict()
    for k, v in final.items():
        torch.testing.assert_close(v, snapshots[1][k], rtol=0, atol=0)
    assert any(not torch.equal(final[k], snapshots[-1][k]) for k in final
               if final[k].is_floating_point())
    assert not result.model.training


def test_early_stopping_with_real_validation():
    panel = toy_panel(n_days=300)
    cfg = tiny_config(**{"train.epochs": 4, "train.lr": 3e-2})
    anchors = make_splits(panel, cfg.data).anchors("train")
    train_anchors, val_anchors = holdout_tail(anchors, 0.2, H)
    assert val_anchors[0] - train_anchors[-1] >= H  # no training target inside validation's
    result = train_model(panel, train_anchors, cfg, val_anchors=val_anchors)
    vals = [h["val_pinball"] for h in result.history]
    assert result.best_epoch == 1 + int(np.argmin(vals))
    ctx = torch.as_tensor(panel.contexts_at(val_anchors, C), dtype=torch.float32)
    tgt = torch.as_tensor(panel.targets_at(val_anchors, H), dtype=torch.float32)
    assert validation_pinball(result.model, ctx, tgt) == pytest.approx(min(vals), rel=1e-6)


def test_no_validation_keeps_last_epoch():
    panel = toy_panel(n_days=200)
    cfg = tiny_config(**{"train.epochs": 2, "train.val_fraction": 0.0})
    anchors = make_splits(panel, cfg.data).anchors("train")
    result = train_model(panel, anchors, cfg)
    assert result.best_epoch is None and result.val_pinball is None
    assert all(h["val_pinball"] is None for h in result.history)


# --- the decoder on a GPU (skipped where torch has no CUDA device) ----------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoder_is_batch_independent_and_close_to_the_cpu():
    model = fresh_model(tiny_config(), (7, 6))
    rng = np.random.default_rng(0)
    log_ctx = np.log(0.2) + 0.05 * rng.standard_normal((MICRO + 300, C, 7, 6))
    cpu = model.median(log_ctx[:300])
    model.to("cuda")
    whole = model.median(log_ctx)  # two fixed-shape calls, the second padded
    for lo, hi in ((0, 1), (0, 300), (MICRO - 5, MICRO + 7)):
        np.testing.assert_array_equal(model.median(log_ctx[lo:hi]), whole[lo:hi])
    np.testing.assert_allclose(whole[:300], cpu, rtol=0, atol=1e-4)
    assert model.embed(log_ctx[:3]).shape == (3, tiny_config().model.embed_dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_shipped_on_the_cpu_go_back_to_their_gpu():
    """The Ray driver puts a sampler in the object store with its weights on the CPU; the
    caller's models stay on their GPU afterwards (a later inline run decodes there)."""
    import types

    from engine.model import models_on

    model = fresh_model(tiny_config(), (7, 6)).to("cuda")
    holder = types.SimpleNamespace(models=[model], keys=types.SimpleNamespace(model=model))
    with models_on(holder, "cpu") as n:
        assert n == 1 and model.loc.device.type == "cpu"
    assert model.loc.device.type == "cuda"


def test_training_that_diverges_stops_with_one_clear_error():
    """A loss gone NaN would be saved as a checkpoint that every later command trips over
    (a 'nan-wide' calibration); the epochs before it are no better (their loss ran to
    1e30): with or without validation, training refuses, naming the settings to lower."""
    wild = {"train.lr": 1.0, "train.weight_decay": 10.0, "train.epochs": 4}
    for val_fraction in (0.0, 0.15):
        cfg = tiny_config(**wild, **{"train.val_fraction": val_fraction})
        with pytest.raises(ConfigError, match=r"training diverged: the loss is nan .*train\.lr"):
            train_model(toy_panel(), np.arange(cfg.data.context - 1, 300), cfg)


@pytest.mark.parametrize("key, value", [("train.lr", 10.0), ("train.weight_decay", 1e300),
                                        ("model.beta", 1e300)])
def test_training_settings_out_of_any_sane_range_are_refused(key, value):
    section, field = key.split(".")
    with pytest.raises(ConfigError, match=f"invalid value for '{key}'"):
        parse_config({section: {field: value}})


def test_training_without_a_window_or_on_a_missing_gpu_is_one_clear_error(monkeypatch):
    """Both used to be tracebacks: an IndexError from the validation split of no windows, and
    torch's 'not compiled with CUDA' from moving the model."""
    cfg = tiny_config()
    for val_fraction in (0.0, 0.15):
        with pytest.raises(DataError, match="no training window"):
            train_model(toy_panel(), np.array([], dtype=np.int64),
                        tiny_config(**{"train.val_fraction": val_fraction}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device is 'cuda' but .* sees no CUDA device"):
        train_model(toy_panel(), np.arange(cfg.data.context - 1, 300),
                    tiny_config(**{"train.device": "cuda"}))
