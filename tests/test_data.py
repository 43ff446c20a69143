"""Data ingest (tidy CSV / Parquet, NPZ), validation messages, fingerprint, splits and windows."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from engine.data.io import read_panel
from engine.data.panel import SPLITS, Panel, make_splits
from engine.errors import DataError
from tests.conftest import shared_file, tiny_config, toy_panel

START = np.datetime64("2020-01-01")


def tidy_frame(n_days: int = 40, shape: tuple[int, int] = (2, 3), seed: int = 0) -> pd.DataFrame:
    """A valid tidy frame: one row per (date, moneyness, maturity_days), iv in (0.05, 0.6)."""
    rng = np.random.default_rng(seed)
    n_m, n_tau = shape
    moneyness = np.round(np.linspace(0.8, 1.2, n_m), 4) if n_m > 1 else np.array([1.0])
    maturities = 30.0 * np.arange(1, n_tau + 1)
    iv = 0.2 * np.exp(0.1 * rng.standard_normal((n_days, n_m, n_tau)))
    dates = (START + np.arange(n_days)).astype(str)
    return pd.DataFrame({
        "date": np.repeat(dates, n_m * n_tau),
        "moneyness": np.tile(np.repeat(moneyness, n_tau), n_days),
        "maturity_days": np.tile(maturities, n_days * n_m),
        "iv": iv.reshape(-1),
    })


def write_csv(df: pd.DataFrame, path) -> str:
    df.to_csv(path, index=False)
    return str(path)


def read_error(tmp_path, df: pd.DataFrame, name: str = "bad.csv") -> str:
    """The DataError message for a frame written as CSV; it must be one line."""
    with pytest.raises(DataError) as info:
        read_panel(write_csv(df, tmp_path / name))
    message = str(info.value)
    assert message and "\n" not in message
    return message


# --- ingest -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (2, 3), (7, 6), (10, 1), (10, 10)])
def test_csv_any_rectangular_grid(tmp_path, shape):
    df = tidy_frame(n_days=25, shape=shape)
    panel = read_panel(write_csv(df, tmp_path / "s.csv"))
    assert panel.surface.shape == (25, *shape)
    assert panel.grid_shape == shape
    assert panel.dates[0] == START and panel.dates.dtype == np.dtype("datetime64[D]")
    assert np.all(np.diff(panel.dates).astype(int) > 0)
    expected = df["iv"].to_numpy().reshape(25, *shape)
    np.testing.assert_allclose(panel.surface, expected, rtol=1e-12)
    np.testing.assert_allclose(panel.moneyness, np.sort(df["moneyness"].unique()))
    np.testing.assert_allclose(panel.maturity_days, np.sort(df["maturity_days"].unique()))


def test_grid_above_ten_is_refused(tmp_path):
    message = read_error(tmp_path, tidy_frame(n_days=5, shape=(11, 2)))
    assert "11 x 2" in message and "10 x 10" in message


def test_parquet_and_npz_match_csv(tmp_path):
    df = tidy_frame(n_days=30, shape=(3, 4))
    from_csv = read_panel(write_csv(df, tmp_path / "s.csv"))
    df.to_parquet(tmp_path / "s.parquet", index=False)
    from_parquet = read_panel(tmp_path / "s.parquet")
    np.savez(tmp_path / "s.npz", surface=from_csv.surface,
             dates=from_csv.dates.astype(str), moneyness=from_csv.moneyness,
             maturity_days=from_csv.maturity_days)
    from_npz = read_panel(tmp_path / "s.npz")
    for other in (from_parquet, from_npz):
        np.testing.assert_array_equal(other.surface, from_csv.surface)
        np.testing.assert_array_equal(other.dates, from_csv.dates)
        np.testing.assert_array_equal(other.moneyness, from_csv.moneyness)
        np.testing.assert_array_equal(other.maturity_days, from_csv.maturity_days)
        assert other.fingerprint == from_csv.fingerprint


def test_npz_with_datetime64_dates(tmp_path):
    panel = toy_panel(n_days=30, shape=(2, 3))
    np.savez(tmp_path / "p.npz", surface=panel.surface, dates=panel.dates,
             moneyness=panel.moneyness, maturity_days=panel.maturity_days)
    loaded = read_panel(tmp_path / "p.npz")
    np.testing.assert_array_equal(loaded.surface, panel.surface)
    assert loaded.fingerprint == panel.fingerprint


def test_npz_errors(tmp_path):
    panel = toy_panel(n_days=20, shape=(2, 3))
    np.savez(tmp_path / "missing.npz", surface=panel.surface, dates=panel.dates,
             moneyness=panel.moneyness)
    with pytest.raises(DataError, match="missing array 'maturity_days'"):
        read_panel(tmp_path / "missing.npz")
    np.savez(tmp_path / "ragged.npz", surface=panel.surface[:, :, :2], dates=panel.dates,
             moneyness=panel.moneyness, maturity_days=panel.maturity_days)
    with pytest.raises(DataError, match="rectangular"):
        read_panel(tmp_path / "ragged.npz")
    surface = panel.surface.copy()
    surface[4, 1, 2] = np.nan
    np.savez(tmp_path / "nan.npz", surface=surface, dates=panel.dates,
             moneyness=panel.moneyness, maturity_days=panel.maturity_days)
    with pytest.raises(DataError, match=str(panel.dates[4])):
        read_panel(tmp_path / "nan.npz")
    (tmp_path / "garbage.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="NPZ") as info:
        read_panel(tmp_path / "garbage.npz")
    assert "allow_pickle" not in str(info.value)


def test_real_vix_term_structure():
    panel = read_panel(shared_file("vix_term_2011_2023.csv"))
    assert panel.surface.shape == (3269, 1, 4)
    np.testing.assert_array_equal(panel.maturity_days, [9, 30, 91, 182])
    assert str(panel.dates[0]) == "2011-01-04" and str(panel.dates[-1]) == "2023-12-29"
    assert np.isfinite(panel.surface).all() and (panel.surface > 0).all()
    make_splits(panel, tiny_config().data)


def test_real_spx_surface():
    panel = read_panel(shared_file("spx_surface_2006_2009.csv"))
    assert panel.surface.shape == (847, 7, 6)
    np.testing.assert_allclose(panel.moneyness, [0.9, 0.95, 0.975, 1.0, 1.025, 1.05, 1.1])
    np.testing.assert_array_equal(panel.maturity_days, [61, 91, 182, 365, 548, 730])
    assert str(panel.dates[0]) == "2006-01-30" and str(panel.dates[-1]) == "2009-06-18"
    # At the default horizon (90), 15% calibration leaves no complete window: other shares
    # than the default ones are refused, and the error names shares that fit, which do.
    chosen = {"data.context": 60, "data.horizon": 90, "data.split_fractions": [0.7, 0.15, 0.15]}
    with pytest.raises(DataError, match="calibration split has no complete window") as info:
        make_splits(panel, tiny_config(**chosen).data)
    shares = re.search(r"data.split_fractions = \[([\d., ]+)\]", str(info.value))
    fractions = tuple(float(x) for x in shares.group(1).split(","))
    splits = make_splits(panel, tiny_config(**{**chosen, "data.split_fractions": fractions}).data)
    assert min(len(splits.anchors(name)) for name in SPLITS) >= 30 and splits.note is None
    # The default shares (20% calibration: no window either) give way to those, with a
    # note, whether left out or written out (a dumped config, a store's config)
    auto = make_splits(panel, tiny_config(**{"data.context": 60, "data.horizon": 90}).data)
    written = make_splits(panel, tiny_config(**{"data.context": 60, "data.horizon": 90,
                                                "data.split_fractions": [0.6, 0.2, 0.2]}).data)
    assert auto.ranges == written.ranges == splits.ranges and auto.note == written.note
    assert "default data.split_fractions [0.6, 0.2, 0.2]" in auto.note
    assert auto.to_dict()["note"] == auto.note
    # Where the default shares fit, they stay.
    assert make_splits(panel, tiny_config(**{"data.context": 60, "data.horizon": 30}).data
                       ).note is None


# --- validation: one line naming the date / column and the fix --------------------------------
def test_date_missing_a_grid_point(tmp_path):
    df = tidy_frame()
    gap = df.index[(df["date"] == "2020-01-05") & (df["moneyness"] == 1.2)
                   & (df["maturity_days"] == 60)]
    message = read_error(tmp_path, df.drop(index=gap))
    assert "2020-01-05" in message and "5 of 6 grid points" in message
    assert "moneyness 1.2" in message and "maturity 60" in message
    assert "drop that date or fill the point" in message


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf(tmp_path, value):
    df = tidy_frame()
    df.loc[13, "iv"] = value
    message = read_error(tmp_path, df)
    assert df.loc[13, "date"] in message and "iv" in message
    assert "NaN or inf" in message and "drop or fill" in message
    assert "np.float64" not in message


def test_empty_cell_is_nan(tmp_path):
    df = tidy_frame()
    df["moneyness"] = df["moneyness"].astype(object)
    df.loc[8, "moneyness"] = ""
    message = read_error(tmp_path, df)
    assert "moneyness" in message and df.loc[8, "date"] in message


@pytest.mark.parametrize("value", [0.0, -0.2, 5.01, 16.0])
def test_iv_out_of_range(tmp_path, value):
    df = tidy_frame()
    df.loc[20, "iv"] = value
    message = read_error(tmp_path, df)
    assert df.loc[20, "date"] in message and f"iv = {value:g}" in message
    assert "(0, 5]" in message and "decimal" in message


def test_iv_at_the_bounds_is_accepted(tmp_path):
    df = tidy_frame()
    df.loc[3, "iv"] = 5.0
    df.loc[4, "iv"] = 1e-4
    panel = read_panel(write_csv(df, tmp_path / "ok.csv"))
    assert panel.surface.max() == 5.0


def test_duplicate_rows(tmp_path):
    df = tidy_frame()
    df = pd.concat([df, df.iloc[[15]]], ignore_index=True)
    message = read_error(tmp_path, df)
    assert "duplicate" in message and df.loc[15, "date"] in message
    assert "one row per (date, moneyness, maturity_days)" in message


def test_duplicate_with_different_value_is_still_a_duplicate(tmp_path):
    df = tidy_frame()
    extra = df.iloc[[15]].assign(iv=0.33)
    message = read_error(tmp_path, pd.concat([df, extra], ignore_index=True))
    assert "duplicate" in message


@pytest.mark.parametrize("column", ["date", "moneyness", "maturity_days", "iv"])
def test_missing_column(tmp_path, column):
    message = read_error(tmp_path, tidy_frame().drop(columns=column))
    assert f"missing column '{column}'" in message and "required columns" in message


def test_numeric_yyyymmdd_dates(tmp_path):
    df = tidy_frame(n_days=20)
    as_numbers = df.assign(date=df["date"].str.replace("-", "").astype(int))
    a = read_panel(write_csv(df, tmp_path / "iso.csv"))
    b = read_panel(write_csv(as_numbers, tmp_path / "numbers.csv"))
    np.testing.assert_array_equal(a.dates, b.dates)  # not nanoseconds after 1970
    assert a.fingerprint == b.fingerprint


def test_column_names_are_case_and_space_insensitive(tmp_path):
    df = tidy_frame().rename(columns={"date": " Date", "iv": "IV "})
    assert read_panel(write_csv(df, tmp_path / "s.csv")).n_days == 40


def test_unreadable_date_and_number(tmp_path):
    df = tidy_frame()
    df.loc[0, "date"] = "not-a-date"
    message = read_error(tmp_path, df, "date.csv")
    assert "'date'" in message and "not-a-date" in message and "YYYY-MM-DD" in message
    df = tidy_frame()
    df["iv"] = df["iv"].astype(object)
    df.loc[9, "iv"] = "abc"
    message = read_error(tmp_path, df, "iv.csv")
    assert "'iv'" in message and "abc" in message and df.loc[9, "date"] in message


def test_unreadable_or_empty_files(tmp_path):
    cases = {
        "empty.csv": (b"", "empty"),
        "header.csv": (b"date,moneyness,maturity_days,iv\n", "no rows"),
        # a line of other text and nothing else: its header is the problem, not its rows
        "text.txt": (b"hello world\n", "missing column 'date'"),
        "blank.csv": (b"\n\n  \n", "cannot read"),
        "binary.csv": (bytes(range(256)) * 8, "cannot read"),
        "bad.parquet": (b"not parquet", "cannot read"),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as info:
            read_panel(tmp_path / name)
        message = str(info.value)
        assert words in message and name in message and "\n" not in message, message
    with pytest.raises(DataError, match="not found"):
        read_panel(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="not a file"):
        read_panel(tmp_path)


def test_fewer_days_than_context_plus_horizon(tmp_path):
    panel = read_panel(write_csv(tidy_frame(n_days=15), tmp_path / "s.csv"))
    cfg = tiny_config(**{"data.context": 12, "data.horizon": 6})
    with pytest.raises(DataError) as info:
        make_splits(panel, cfg.data)
    message = str(info.value)
    assert "15 days" in message and "12 + 6 = 18" in message and "\n" not in message


@pytest.mark.parametrize("fractions, split", [((0.9, 0.05, 0.05), "calibration"),
                                              ((0.05, 0.5, 0.45), "train"),
                                              ((0.6, 0.38, 0.02), "test")])
def test_split_without_a_window(fractions, split):
    panel = toy_panel(n_days=200)
    cfg = tiny_config(**{"data.split_fractions": fractions})
    with pytest.raises(DataError) as info:
        make_splits(panel, cfg.data)
    message = str(info.value)
    assert message.startswith(f"{split} split has no complete window") and "\n" not in message
    C, H = cfg.data.context, cfg.data.horizon
    cal, tst = round(fractions[0] * 200), round((fractions[0] + fractions[1]) * 200)
    held = {"train": cal, "calibration": tst - cal - H, "test": 200 - tst - H}[split]
    need = C + H if split == "train" else H
    assert f"holds {max(held, 0)} days" in message and f"needs at least {need}" in message


# --- sorting and the fingerprint ----------------------------------------------------------------
def test_unsorted_rows_are_sorted(tmp_path):
    df = tidy_frame(n_days=30, shape=(3, 2))
    shuffled = df.sample(frac=1.0, random_state=1)
    a = read_panel(write_csv(df, tmp_path / "sorted.csv"))
    b = read_panel(write_csv(shuffled, tmp_path / "shuffled.csv"))
    np.testing.assert_array_equal(a.surface, b.surface)
    np.testing.assert_array_equal(a.dates, b.dates)
    np.testing.assert_array_equal(a.moneyness, b.moneyness)
    np.testing.assert_array_equal(a.maturity_days, b.maturity_days)
    assert a.fingerprint == b.fingerprint


def test_fingerprint(tmp_path):
    df = tidy_frame(n_days=30)
    a = read_panel(write_csv(df, tmp_path / "a.csv"))
    again = read_panel(write_csv(df, tmp_path / "again.csv"))
    assert a.fingerprint == again.fingerprint
    assert isinstance(a.fingerprint, str) and len(a.fingerprint) >= 16
    changed = df.copy()
    changed.loc[17, "iv"] += 1e-4
    assert read_panel(write_csv(changed, tmp_path / "b.csv")).fingerprint != a.fingerprint
    shifted = df.assign(date=(pd.to_datetime(df["date"]) + pd.Timedelta(days=1)).dt.date)
    assert read_panel(write_csv(shifted, tmp_path / "c.csv")).fingerprint != a.fingerprint
    regrid = df.assign(maturity_days=df["maturity_days"] + 1)
    assert read_panel(write_csv(regrid, tmp_path / "d.csv")).fingerprint != a.fingerprint


# --- windows and splits ---------------------------------------------------------------------------
def test_windows_are_views():
    panel = toy_panel(n_days=100, shape=(2, 3))
    ctx, tgt = panel.windows(12, 6)
    assert ctx.shape == (100 - 18 + 1, 12, 2, 3) and tgt.shape == (100 - 18 + 1, 6, 2, 3)
    assert np.shares_memory(ctx, panel.log_surface) and np.shares_memory(tgt, panel.log_surface)
    assert not ctx.flags.writeable
    i = 37
    np.testing.assert_array_equal(ctx[i], panel.log_surface[i : i + 12])
    np.testing.assert_array_equal(tgt[i], panel.log_surface[i + 12 : i + 18])
    raw_ctx, _ = panel.windows(12, 6, log=False)
    assert np.shares_memory(raw_ctx, panel.surface)
    # Windows by anchor agree with the views: anchor t = i + C - 1.
    np.testing.assert_array_equal(panel.contexts_at(np.array([i + 11]), 12)[0], ctx[i])
    np.testing.assert_array_equal(panel.targets_at(np.array([i + 11]), 6)[0], tgt[i])


def check_splits(panel: Panel, splits, C: int, H: int, E: int) -> None:
    """Anchors are exactly the complete windows whose targets lie in the split's range, and
    no split's targets come within ``embargo`` days of the next split's."""
    T = panel.n_days
    targets = {}
    for name in SPLITS:
        start, stop = splits.ranges[name]
        anchors = splits.anchors(name)
        expected = [t for t in range(T) if t - C + 1 >= 0 and t + 1 >= start and t + H < stop]
        np.testing.assert_array_equal(anchors, expected)
        assert len(anchors) > 0
        targets[name] = anchors[:, None] + np.arange(1, H + 1)[None]
    for a, b in itertools.pairwise(SPLITS):
        assert targets[b].min() - targets[a].max() > E
        assert splits.ranges[b][0] - splits.ranges[a][1] == E
    assert splits.pre_test_stop() == splits.ranges["test"][0] - E


def test_splits_by_default_fractions():
    panel = toy_panel(n_days=400)
    cfg = tiny_config()
    assert cfg.data.split_fractions == (0.6, 0.2, 0.2) and cfg.data.embargo_days == 6
    splits = make_splits(panel, cfg.data)
    assert splits.ranges == {"train": (0, 240), "calibration": (246, 320), "test": (326, 400)}
    assert splits.embargo == cfg.data.horizon
    check_splits(panel, splits, 12, 6, 6)
    assert splits.anchors("train")[0] == 11  # the first complete context
    assert splits.anchors("train")[-1] == 240 - 1 - 6
    assert splits.anchors("calibration")[0] == 245
    assert splits.anchors("test")[-1] == 400 - 1 - 6
    assert splits.to_dict()["calibration"] == [246, 320]


def test_splits_by_fractions_and_explicit_embargo():
    panel = toy_panel(n_days=500)
    cfg = tiny_config(**{"data.split_fractions": (0.5, 0.3, 0.2), "data.embargo": 20,
                         "data.horizon": 10})
    splits = make_splits(panel, cfg.data)
    assert splits.ranges == {"train": (0, 250), "calibration": (270, 400), "test": (420, 500)}
    check_splits(panel, splits, 12, 10, 20)


def test_splits_by_dates():
    """A split's date is its first target day: its first window forecasts from that date
    (the context ends the day before), and the embargo ends the split ahead of it."""
    panel = toy_panel(n_days=400)  # daily dates from 2010-01-04
    cfg = tiny_config(**{"data.calibration_start": "2010-08-01",
                         "data.test_start": "2010-11-15"})
    splits = make_splits(panel, cfg.data)
    cal = int(np.searchsorted(panel.dates, np.datetime64("2010-08-01")))
    tst = int(np.searchsorted(panel.dates, np.datetime64("2010-11-15")))
    assert splits.ranges == {"train": (0, cal - 6), "calibration": (cal, tst - 6),
                             "test": (tst, 400)}
    check_splits(panel, splits, 12, 6, 6)
    for name, day in (("calibration", "2010-08-01"), ("test", "2010-11-15")):
        first = splits.anchors(name)[0]
        assert str(panel.dates[first + 1]) == day  # the first window's first target day
    assert splits.pre_test_stop() == tst - 6  # what the fits see: up to the embargo
    # a calibration split that the test split's embargo leaves without a window: said so
    short = tiny_config(**{"data.calibration_start": "2010-11-10",
                           "data.test_start": "2010-11-15"})
    day = [str(d) for d in panel.dates]
    with pytest.raises(DataError, match="calibration split has no complete window: it holds "
                                        "0 days, up to the 6-day embargo before "
                                        rf"data.test_start .*set data.calibration_start between "
                                        rf"{day[24]} and {day[tst - 12]}"):
        make_splits(panel, short.data)  # C + H + E = 24; the test start - E - H
    # the dates each suggestion names serve, at both ends
    for c in (24, tst - 12):
        ok = tiny_config(**{"data.calibration_start": day[c], "data.test_start": day[tst]})
        assert all(len(make_splits(panel, ok.data).anchors(n)) for n in SPLITS)
    early = tiny_config(**{"data.calibration_start": day[23], "data.test_start": day[tst]})
    with pytest.raises(DataError, match=rf"train split has no complete window.*between {day[24]}"):
        make_splits(panel, early.data)
    late = tiny_config(**{"data.calibration_start": day[200], "data.test_start": day[395]})
    with pytest.raises(DataError, match=rf"test split has no complete window.*set "
                                        rf"data.test_start on or before {day[394]}"):
        make_splits(panel, late.data)
    ok = tiny_config(**{"data.calibration_start": day[200], "data.test_start": day[394]})
    assert len(make_splits(panel, ok.data).anchors("test")) == 1
    close = tiny_config(**{"data.calibration_start": day[24], "data.test_start": day[30]})
    with pytest.raises(DataError, match=rf"set data.calibration_start = {day[24]} and "
                                        rf"data.test_start between {day[36]} and {day[394]}"):
        make_splits(panel, close.data)
    for t in (36, 394):
        ok = tiny_config(**{"data.calibration_start": day[24], "data.test_start": day[t]})
        assert all(len(make_splits(panel, ok.data).anchors(n)) for n in SPLITS)


def test_a_run_trains_on_the_whole_history_where_default_shares_give_way():
    """Where the default shares leave a split empty, evaluate takes smaller train shares that
    fit; a run holds nothing out, so its CVAE learns from every window instead (as it does
    where no shares fit at all), not from the smaller train share."""
    from engine.pipeline import run_splits

    cfg = tiny_config(**{"data.embargo": 60})  # the default shares need 330+ days here
    panel = toy_panel(n_days=300)
    evaluated = make_splits(panel, cfg.data)
    assert "using [" in evaluated.note and evaluated.ranges["train"][1] < 200
    run = run_splits(panel, cfg.data)
    assert run.ranges["train"] == (0, 300) and len(run.anchors("train")) == 300 - 12 - 6 + 1
    assert "the default data.split_fractions leave a split without a complete window" in run.note
    # a history the default shares fit: a run keeps the config's train split
    long = toy_panel(n_days=400)
    assert run_splits(long, cfg.data).ranges == make_splits(long, cfg.data).ranges


def test_split_date_errors():
    panel = toy_panel(n_days=400)
    with pytest.raises(DataError, match="both"):
        make_splits(panel, tiny_config(**{"data.test_start": "2010-11-15"}).data)
    with pytest.raises(DataError, match="must come before"):
        make_splits(panel, tiny_config(**{"data.calibration_start": "2010-11-15",
                                          "data.test_start": "2010-08-01"}).data)
    with pytest.raises(DataError, match="after the last date"):
        make_splits(panel, tiny_config(**{"data.calibration_start": "2010-08-01",
                                          "data.test_start": "2030-01-01"}).data)
    with pytest.raises(ValidationError, match="'August' is not a date"):  # refused on load
        tiny_config(**{"data.calibration_start": "August", "data.test_start": "2010-11-15"})


def test_a_gap_in_the_calendar_is_noted():
    """Windows treat consecutive rows as consecutive days: years cut out of a file would
    join in silence, so the commands print a note naming the widest gap."""
    days = np.concatenate([np.arange(np.datetime64("2011-01-03"), np.datetime64("2011-03-01")),
                           np.arange(np.datetime64("2015-06-01"), np.datetime64("2015-07-01"))])
    surface = np.full((len(days), 1, 2), 0.2)
    panel = Panel(surface, days, np.array([1.0]), np.array([30.0, 91.0]), "f.csv")
    note = panel.gap_note()
    assert "f.csv jumps from 2011-02-28 to 2015-06-01 (1554 calendar days)" in note
    assert panel.slice_days(0, 40).gap_note() is None  # weekends and holidays are no gap


def test_days_repeating_the_day_before_are_noted():
    """A calendar-day export filled forward repeats Friday's surface on Saturday and Sunday:
    each row counts as a trading day, so the note says how many days do not move (and
    how many fall on a weekend); a few repeats (holidays carried forward) pass quietly."""
    days = np.arange(np.datetime64("2021-01-04"), np.datetime64("2021-03-01"))  # Mon .. Sun
    rng = np.random.default_rng(0)
    trading = 0.2 * np.exp(0.02 * rng.standard_normal((len(days), 2, 2)))
    weekday = (days.astype(np.int64) + 3) % 7
    filled = trading.copy()
    for i in np.flatnonzero(weekday >= 5):
        filled[i] = filled[i - 1]  # Saturday and Sunday keep Friday's quotes
    panel = Panel(filled, days, np.array([0.9, 1.1]), np.array([30.0, 91.0]), "cal.csv")
    repeats = int(np.all(filled[1:] == filled[:-1], axis=(1, 2)).sum())
    assert repeats == 16  # 8 weekends
    note = panel.repeat_note()
    assert note.startswith(f"cal.csv: 16 of its {len(days)} days (29%) repeat the day before's "
                           "surface exactly at every grid point, 16 of them Saturdays or Sundays")
    assert note in panel.notes()
    assert Panel(trading, days, panel.moneyness, panel.maturity_days, "t.csv").repeat_note() is None
    few = trading.copy()
    few[10:14] = few[9]  # a 4-day holiday carried forward: 4 repeats, under the 5 noted
    assert Panel(few, days, panel.moneyness, panel.maturity_days, "h.csv").repeat_note() is None
    few[20] = few[19]
    assert "5 of its" in Panel(few, days, panel.moneyness, panel.maturity_days,
                               "h.csv").repeat_note()
