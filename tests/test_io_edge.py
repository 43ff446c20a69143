"""Edge cases of the data reader: odd dtypes, time zones, date formats, grid jitter, paths.

Each bad input gives one DataError line (what was found, what is required, the fix) and no
warning on stderr; each odd but meaningful input is read as written.
"""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pandas as pd
import pytest

from engine.data.io import panel_from_frame, read_panel
from engine.errors import DataError

START = np.datetime64("2020-01-01")
MONEYNESS = np.array([0.9, 1.0])
MATURITIES = np.array([30.0, 90.0])


def frame(n_days: int = 10) -> pd.DataFrame:
    """A valid tidy frame on a 2 x 2 grid: one row per (date, moneyness, maturity_days)."""
    rng = np.random.default_rng(0)
    n = len(MONEYNESS) * len(MATURITIES)
    return pd.DataFrame({
        "date": np.repeat((START + np.arange(n_days)).astype(str), n),
        "moneyness": np.tile(np.repeat(MONEYNESS, len(MATURITIES)), n_days),
        "maturity_days": np.tile(MATURITIES, n_days * len(MONEYNESS)),
        "iv": 0.2 + 0.01 * rng.random(n_days * n),
    })


def arrays(n_days: int = 10) -> dict[str, np.ndarray]:
    """A valid NPZ's arrays."""
    surface = frame(n_days)["iv"].to_numpy().reshape(n_days, len(MONEYNESS), len(MATURITIES))
    return {"surface": surface, "dates": (START + np.arange(n_days)).astype(str),
            "moneyness": MONEYNESS, "maturity_days": MATURITIES}


def load(path):
    """The panel, read with no warning (a warning would be a stray line on stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        panel = read_panel(path)
    assert not caught, [str(w.message) for w in caught]
    return panel


def error(path) -> str:
    """The one-line DataError message for ``path``, raised with no warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as info:
            read_panel(path)
    assert not caught, [str(w.message) for w in caught]
    message = str(info.value)
    assert message and "\n" not in message
    return message


# --- 1. booleans are not numbers --------------------------------------------------------------
@pytest.mark.parametrize("column", ["iv", "moneyness", "maturity_days"])
def test_boolean_column_is_refused_in_parquet(tmp_path, column):
    df = frame().assign(**{column: True})
    df.to_parquet(tmp_path / "b.parquet", index=False)
    message = error(tmp_path / "b.parquet")
    assert f"column '{column}'" in message and "bool" in message
    assert "real numbers" in message and f"write {column} as numbers" in message


def test_boolean_column_is_refused_in_csv(tmp_path):
    df = frame().assign(iv=np.where(np.arange(40) % 2, "True", "False"))
    df.to_csv(tmp_path / "b.csv", index=False)
    message = error(tmp_path / "b.csv")
    assert "column 'iv'" in message and "bool" in message


def test_boolean_npz_surface_is_refused(tmp_path):
    a = arrays()
    np.savez(tmp_path / "b.npz", **{**a, "surface": a["surface"] > 0})
    message = error(tmp_path / "b.npz")
    assert "'surface'" in message and "bool" in message and "float array" in message


# --- 2. complex and text arrays ---------------------------------------------------------------
@pytest.mark.parametrize("key, value, words", [
    ("surface", lambda s: s + 0.01j, ["complex"]),
    ("surface", lambda s: s.astype(str), ["text"]),
    ("moneyness", lambda m: m.astype(complex), ["complex"]),
])
def test_complex_or_text_npz_array_is_refused(tmp_path, key, value, words):
    a = arrays()
    np.savez(tmp_path / "c.npz", **{**a, key: value(a[key])})
    message = error(tmp_path / "c.npz")
    assert f"'{key}'" in message and "real numbers" in message and "float array" in message
    for word in words:
        assert word in message


def test_complex_or_boolean_values_in_a_frame_are_refused():
    with pytest.raises(DataError, match="column 'iv' holds complex"):
        panel_from_frame(frame().assign(iv=frame()["iv"] + 0j), "frame")
    df = frame().astype({"iv": object})
    df.loc[5, "iv"] = True  # one Python bool in an object column would pass as 1.0
    with pytest.raises(DataError, match="column 'iv' has non-numeric value True"):
        panel_from_frame(df, "frame")


# --- 3. time zones: the calendar date as written, no warning ----------------------------------
def test_timezone_aware_parquet_dates_keep_their_calendar_date(tmp_path):
    df = frame()
    df["date"] = pd.to_datetime(df["date"]).dt.tz_localize("US/Eastern")
    df.to_parquet(tmp_path / "tz.parquet", index=False)
    panel = load(tmp_path / "tz.parquet")
    np.testing.assert_array_equal(panel.dates, START + np.arange(10))


@pytest.mark.parametrize("suffix", ["T00:00:00Z", "T23:30:00+05:00", " 22:00:00-0300"])
def test_timezone_suffix_in_csv_keeps_the_calendar_date(tmp_path, suffix):
    df = frame().assign(date=lambda d: d["date"] + suffix)
    df.to_csv(tmp_path / "tz.csv", index=False)
    panel = load(tmp_path / "tz.csv")
    np.testing.assert_array_equal(panel.dates, START + np.arange(10))


def test_mixed_utc_offsets_in_csv_keep_each_calendar_date(tmp_path):
    df = frame()
    offsets = np.where(np.arange(len(df)) % 2, "T23:00:00+05:00", "T01:00:00-03:00")
    df["date"] = df["date"] + offsets
    df.to_csv(tmp_path / "tz.csv", index=False)
    panel = load(tmp_path / "tz.csv")
    np.testing.assert_array_equal(panel.dates, START + np.arange(10))


# --- 4. NPZ dates must be dates ---------------------------------------------------------------
@pytest.mark.parametrize("dates", [np.arange(10), np.arange(10, dtype=float) + 18262])
def test_numeric_npz_dates_are_refused(tmp_path, dates):
    np.savez(tmp_path / "d.npz", **{**arrays(), "dates": dates})
    message = error(tmp_path / "d.npz")
    assert "'dates'" in message and "not dates" in message
    assert "ISO date strings" in message and "datetime64" in message


def test_a_nat_among_npz_dates_is_named_by_its_index(tmp_path):
    """Not as a row and column of the table the arrays are turned into."""
    dates = START + np.arange(10)
    dates[5] = np.datetime64("NaT")
    np.savez(tmp_path / "n.npz", **{**arrays(), "dates": dates})
    message = error(tmp_path / "n.npz")
    assert "array 'dates' has NaT" in message and "index 5" in message
    assert "row" not in message and "column" not in message


def test_npz_dates_as_datetime64_or_strings_still_read(tmp_path):
    a = arrays()
    np.savez(tmp_path / "s.npz", **a)
    np.savez(tmp_path / "m.npz", **{**a, "dates": START + np.arange(10)})
    np.savez(tmp_path / "z.npz", **{**a, "dates": np.char.add(a["dates"], "T00:00:00Z")})
    panels = [load(tmp_path / name) for name in ("s.npz", "m.npz", "z.npz")]
    for panel in panels:
        np.testing.assert_array_equal(panel.dates, START + np.arange(10))
        assert panel.fingerprint == panels[0].fingerprint


# --- 5. a mix of unambiguous date formats reads as one; a repeated header is named -----------
def test_mixed_year_first_date_formats_read_as_one(tmp_path):
    """pandas takes the first date's format for all; dates in another year-first format (or
    with a time on some rows only) are read one by one, to the same panel."""
    df = frame()
    df.to_csv(tmp_path / "one.csv", index=False)
    plain = load(tmp_path / "one.csv")
    mix = df.copy()
    mix.loc[:3, "date"] = mix.loc[:3, "date"].str.replace("-", "/")  # the first date, 4 rows
    mix.loc[8:, "date"] = mix.loc[8:, "date"] + " 16:15:00"  # a time on the later rows
    mix.to_csv(tmp_path / "mix.csv", index=False)
    panel = load(tmp_path / "mix.csv")
    np.testing.assert_array_equal(panel.dates, plain.dates)
    assert panel.fingerprint == plain.fingerprint
    # two exports joined: the second header line is named as such
    with open(tmp_path / "two.csv", "w") as f:
        f.write(df.iloc[:4].to_csv(index=False) + df.iloc[4:].to_csv(index=False))
    message = error(tmp_path / "two.csv")
    assert "repeats its header line at row 6 (two exports joined?); delete that line" in message


def test_an_unreadable_date_is_still_called_unreadable(tmp_path):
    df = frame()
    df.loc[7, "date"] = "soon"
    df.to_csv(tmp_path / "bad.csv", index=False)
    message = error(tmp_path / "bad.csv")
    assert "unreadable value 'soon' at row 9" in message and "mixes" not in message


@pytest.mark.parametrize("layout, shown", [("%d/%m/%y", "'01/01/20'"),
                                           ("%m/%d/%Y", "'01/01/2020'"),
                                           ("%d.%m.%Y", "'01.01.2020'"),
                                           ("%d/%m/%Y %H:%M", "'01/01/2020 00:00'"),
                                           ("%a %d/%m/%Y", "'Wed 01/01/2020'"),
                                           ("%d/%m/%Y+01:00", "'01/01/2020+01:00'"),
                                           ("%y%m%d", "200101")])
def test_dates_not_written_year_first_are_refused(tmp_path, layout, shown):
    """pandas reads such dates value by value: 04/01/11 as 1 April, 13/01/11 as 13 January,
    so a day-first file would be scrambled in silence."""
    df = frame(20)
    df["date"] = pd.to_datetime(df["date"]).dt.strftime(layout)
    if layout == "%y%m%d":
        df["date"] = df["date"].astype(int)
    df.to_csv(tmp_path / "d.csv", index=False)
    message = error(tmp_path / "d.csv")
    assert f"has {shown} at row 2" in message and "year first" in message
    assert "YYYY-MM-DD" in message


@pytest.mark.parametrize("layout", ["%Y/%m/%d", "%Y%m%d", "%Y.%m.%d", "%Y-%m-%d %H:%M",
                                    "%d-%b-%Y", "%B %d, %Y", "%d %B %Y", "%a %d %b %Y"])
def test_year_first_or_month_name_dates_still_read(tmp_path, layout):
    df = frame()
    df["date"] = pd.to_datetime(df["date"]).dt.strftime(layout)
    df.to_csv(tmp_path / "d.csv", index=False)
    np.testing.assert_array_equal(load(tmp_path / "d.csv").dates, START + np.arange(10))


def test_nullable_integer_dates_with_a_gap_name_the_row(tmp_path):
    df = frame()
    df["date"] = pd.to_datetime(df["date"]).dt.strftime("%Y%m%d").astype("Int64")
    np.testing.assert_array_equal(panel_from_frame(df, "f").dates, START + np.arange(10))
    df.loc[5, "date"] = pd.NA
    df.to_parquet(tmp_path / "na.parquet", index=False)
    assert "unreadable value <NA> at row 7" in error(tmp_path / "na.parquet")


@pytest.mark.parametrize("twin", ["IV", " iv", "Date"])
def test_two_columns_that_read_as_one_are_refused(twin):
    df = frame()
    name = twin.strip().lower()
    df[twin] = df[name]
    with pytest.raises(DataError, match=f"columns '{name}' and '{twin}' both read as '{name}'"):
        panel_from_frame(df, "frame")


@pytest.mark.parametrize("name", ["iv", "date"])
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_a_column_written_twice_in_a_csv_header_is_refused(tmp_path, name, suffix):
    """pandas renames a repeated header name (iv, iv.1): the second column must not be
    dropped silently, even when it differs."""
    df = frame()
    text = df.to_csv(index=False).splitlines()
    copy = df[name].astype(str) if name == "date" else (2 * df[name]).astype(str)
    lines = [f"{text[0]},{name}"] + [f"{row},{c}" for row, c in zip(text[1:], copy, strict=True)]
    path = tmp_path / f"twice{suffix}"
    with (gzip.open(path, "wt") if suffix == ".csv.gz" else path.open("w")) as f:
        f.write("\n".join(lines) + "\n")
    assert f"column '{name}' appears 2 times; keep one of them" in error(path)


# --- 6. grid mismatches name the date that differs, with every digit --------------------------
def test_jittered_moneyness_names_its_date_and_digits(tmp_path):
    df = frame()
    row = df.index[(df["date"] == "2020-01-06") & (df["moneyness"] == 1.0)][0]
    df.loc[row, "moneyness"] = 1.0000001
    df.to_csv(tmp_path / "jit.csv", index=False)
    message = error(tmp_path / "jit.csv")
    assert "date 2020-01-06" in message and "2020-01-01" not in message
    assert "moneyness 1.0000001" in message and "moneyness 1," in message
    assert "same grid" in message


def test_last_bit_float_noise_reads_as_one_point_and_other_grids_keep_every_bit(tmp_path):
    """0.9 + 1e-15 (a last-bit difference from arithmetic) beside 0.9 is the grid point 0.9
    (its most frequent spelling): the panel of the clean file. Values that collide with no
    other keep every bit (a float32 column's 0.899999976, 365 / 12), so no file's
    fingerprint moves. A jitter a reader could mean (1e-7, test above) is still refused."""
    df = frame()
    df.to_csv(tmp_path / "clean.csv", index=False)
    clean = load(tmp_path / "clean.csv")
    row = df.index[(df["date"] == "2020-01-04") & (df["moneyness"] == 0.9)][0]
    noisy = df.copy()
    noisy.loc[row, "moneyness"] = 0.9 + 1e-15
    noisy.to_csv(tmp_path / "noise.csv", index=False)
    assert load(tmp_path / "noise.csv").fingerprint == clean.fingerprint
    f32 = df.astype({"moneyness": np.float32})
    f32.to_parquet(tmp_path / "f32.parquet")
    assert load(tmp_path / "f32.parquet").moneyness.tolist() == [float(np.float32(0.9)), 1.0]
    months = df.assign(maturity_days=df["maturity_days"].map({30.0: 365 / 12, 90.0: 365 / 4}))
    months.to_csv(tmp_path / "months.csv", index=False)
    assert load(tmp_path / "months.csv").maturity_days.tolist() == [365 / 12, 365 / 4]


def test_extra_point_names_its_date(tmp_path):
    df = frame()
    extra = pd.DataFrame({"date": ["2020-01-07"], "moneyness": [1.0], "maturity_days": [365.0],
                          "iv": [0.25]})
    pd.concat([df, extra], ignore_index=True).to_csv(tmp_path / "extra.csv", index=False)
    message = error(tmp_path / "extra.csv")
    assert "date 2020-01-07" in message and "2020-01-01" not in message
    assert "maturity 365 days" in message and "other dates lack" in message


def test_several_dates_off_the_grid_are_counted(tmp_path):
    df = frame()
    drop = df.index[df["date"].isin(["2020-01-03", "2020-01-08"]) & (df["maturity_days"] == 90)
                    & (df["moneyness"] == 0.9)]
    df.drop(index=drop).to_csv(tmp_path / "gaps.csv", index=False)
    message = error(tmp_path / "gaps.csv")
    assert "date 2020-01-03 has 3 of 4 grid points" in message
    assert "missing moneyness 0.9, maturity 90 days" in message
    assert "2 of 10 dates" in message and "2020-01-08" in message


def test_jitter_on_a_full_grid_is_not_called_too_big(tmp_path):
    n_days, grid = 5, np.round(np.linspace(0.8, 1.2, 10), 4)
    df = pd.DataFrame({"date": np.repeat((START + np.arange(n_days)).astype(str), 10),
                       "moneyness": np.tile(grid, n_days), "maturity_days": 30.0, "iv": 0.2})
    df.loc[23, "moneyness"] += 1e-6
    df.to_csv(tmp_path / "jit10.csv", index=False)
    message = error(tmp_path / "jit10.csv")
    assert "date 2020-01-03" in message and "at most" not in message


# --- 7. an empty path -------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["", "   "])
def test_empty_path_says_empty(path):
    message = error(path)
    assert "data path is empty" in message and "not a file" not in message


# --- 8. formats by extension ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["s.npy", "s.xlsx", "noextension"])
def test_unsupported_extension_lists_the_formats(tmp_path, name):
    if name.endswith(".npy"):
        np.save(tmp_path / name, arrays()["surface"])
    else:
        frame().to_csv(tmp_path / name, index=False)
    message = error(tmp_path / name)
    assert ".csv" in message and ".parquet" in message and ".npz" in message
    assert "cannot read" not in message and name in message
    if name.endswith(".npy"):
        assert "'.npy'" in message and "numpy.savez" in message


@pytest.mark.parametrize("name", ["s.CSV", "s.txt", "s.csv.gz", "s.csv.bz2", "s.csv.xz",
                                  "s.csv.zip", "s.csv.zst", "s.pq", "s.PARQUET"])
def test_supported_extensions_still_read(tmp_path, name):
    df = frame()
    if "parquet" in name.lower() or name.endswith(".pq"):
        df.to_parquet(tmp_path / name, index=False)
    else:
        df.to_csv(tmp_path / name, index=False)
    panel = load(tmp_path / name)
    assert panel.surface.shape == (10, 2, 2)
    np.testing.assert_allclose(panel.surface.reshape(-1), df["iv"].to_numpy())


def test_maturities_in_years_are_refused(tmp_path):
    """maturity_days is calendar days; 0.25 / 0.5 / 1 was written in years, while a grid of
    whole short maturities (a 1-day VIX) still reads."""
    df = frame()
    df["maturity_days"] = df["maturity_days"].map({30.0: 0.25, 90.0: 1.0})
    df.to_csv(tmp_path / "years.csv", index=False)
    message = error(tmp_path / "years.csv")
    assert "maturity_days runs from 0.25 to 1" in message and "multiply them by 365" in message
    df["maturity_days"] = df["maturity_days"].map({0.25: 0.5, 1.0: 10.0})  # to 10 years
    df.to_csv(tmp_path / "long.csv", index=False)
    message = error(tmp_path / "long.csv")
    assert "from 0.5 to 10, the shortest under a day" in message and "by 365" in message
    df["maturity_days"] = df["maturity_days"].map({0.5: 1.0, 10.0: 2.0})
    df.to_csv(tmp_path / "short.csv", index=False)
    assert load(tmp_path / "short.csv").maturity_days.tolist() == [1.0, 2.0]
    df["maturity_days"] = df["maturity_days"].map({1.0: 30.4, 2.0: 91.25})  # months in days
    df.to_csv(tmp_path / "months.csv", index=False)
    assert load(tmp_path / "months.csv").maturity_days.tolist() == [30.4, 91.25]


def test_moneyness_in_percent_is_refused(tmp_path):
    """Moneyness is strike / spot; a grid of 90 and 100 was written in percent (its ATM point
    and plots would be wrong), while a wide grid in K/S still reads."""
    df = frame()
    df["moneyness"] *= 100
    df.to_csv(tmp_path / "pct.csv", index=False)
    message = error(tmp_path / "pct.csv")
    assert "moneyness runs from 90 to 100" in message and "divide them by 100" in message
    df["moneyness"] /= 40  # 2.25 and 2.5: far out of the money, but strike / spot
    df.to_csv(tmp_path / "wide.csv", index=False)
    assert load(tmp_path / "wide.csv").moneyness.tolist() == [2.25, 2.5]


# ----------------------------------------------------------------------------- data.fill


def _fill_loop(surface: np.ndarray, limit: int) -> np.ndarray | None:
    """data.fill = 'previous' by a plain loop: each NaN takes the last earlier value of its
    point; None where a point has no earlier value or misses more than ``limit`` in a row."""
    out = surface.copy()
    T, n_m, n_tau = surface.shape
    for i in range(n_m):
        for j in range(n_tau):
            run = 0
            for t in range(T):
                if np.isnan(surface[t, i, j]):
                    run += 1
                    if t == run - 1 or run > limit:  # missing since the first date, or too long
                        return None
                    out[t, i, j] = out[t - 1, i, j]
                else:
                    run = 0
    return out


def test_fill_previous_equals_a_plain_loop():
    from engine.data.io import fill_previous

    rng = np.random.default_rng(4)
    days = START + np.arange(40)
    for trial in range(200):
        surface = 0.2 + 0.1 * rng.random((40, 2, 2))
        surface[1:][rng.random((39, 2, 2)) < rng.choice([0.05, 0.2, 0.5])] = np.nan
        limit = int(rng.integers(1, 6))
        want = _fill_loop(surface, limit)
        if want is None:
            with pytest.raises(DataError, match="data.fill"):
                fill_previous(surface, days, MONEYNESS, MATURITIES, limit, "f")
        else:
            np.testing.assert_array_equal(
                fill_previous(surface, days, MONEYNESS, MATURITIES, limit, "f"), want)


def test_missing_points_are_refused_or_filled_as_data_fill_says(tmp_path):
    """By default a missing row or a NaN iv is refused, and the message names data.fill;
    with data.fill = 'previous' both take the point's previous quote, up to data.fill_limit
    dates in a row, and a complete file reads the same either way."""
    df = frame(12)
    whole = panel_from_frame(df, "f")
    holes = df.drop(index=[10]).copy()  # day 2's (1.0, 30) row is absent
    holes.loc[13, "iv"] = np.nan  # day 3's (0.9, 90) quote is NaN
    holes.to_csv(tmp_path / "holes.csv", index=False)
    assert "data.fill = 'previous'" in error(tmp_path / "holes.csv")
    holes.drop(index=[13]).to_csv(tmp_path / "absent.csv", index=False)
    assert "data.fill = 'previous'" in error(tmp_path / "absent.csv")
    filled = read_panel(tmp_path / "holes.csv", "previous", 5)
    want = whole.surface.copy()
    want[2, 1, 0], want[3, 0, 1] = want[1, 1, 0], want[2, 0, 1]
    np.testing.assert_array_equal(filled.surface, want)
    assert filled.fill_note == (f"{tmp_path / 'holes.csv'}: 2 missing iv values on 2 of 12 "
                                "dates filled with each point's previous quote (data.fill = "
                                "'previous')")
    full = panel_from_frame(df, "f", "previous", 5)
    assert full.fill_note is None and full.fingerprint == whole.fingerprint
    # a date whose every quote is NaN keeps its row, filled from the day before
    blank = df.copy()
    blank.loc[blank["date"] == str(START + 4), "iv"] = np.nan
    got = panel_from_frame(blank, "f", "previous", 5)
    assert got.n_days == 12 and (got.surface[4] == whole.surface[3]).all()
    # too long a gap, or nothing before it: one line naming the point, the dates, the fix
    long = df[~((df["moneyness"] == 0.9) & (df["maturity_days"] == 30.0)
                & df["date"].isin([str(START + k) for k in range(3, 9)]))]
    with pytest.raises(DataError, match=r"moneyness 0.9, maturity 30 days is missing on 6 dates "
                                        r"in a row from 2020-01-04 to 2020-01-09, more than "
                                        r"data.fill_limit = 5"):
        panel_from_frame(long, "f", "previous", 5)
    assert panel_from_frame(long, "f", "previous", 6).fill_note.startswith("f: 6 missing")
    with pytest.raises(DataError, match=r"missing on 2020-01-01, with no earlier quote"):
        panel_from_frame(df.drop(index=[0]), "f", "previous", 5)
    # a point quoted NaN on every date is refused, not dropped from the grid; an inf is
    # named as it is; a NaN copy of a quoted row is a duplicate, as without data.fill
    column = df.copy()
    column.loc[column["maturity_days"] == 90.0, "iv"] = np.nan
    with pytest.raises(DataError, match=r"maturity 90 days is never quoted"):
        panel_from_frame(column, "f", "previous", 5)
    # a stray row off the grid most dates share is refused as without fill, not made a
    # point missing on every other date
    stray = pd.concat([df, pd.DataFrame({"date": [str(START + 6)], "moneyness": [1.001],
                                         "maturity_days": [30.0], "iv": [0.2]})])
    with pytest.raises(DataError, match=r"date 2020-01-07 has a grid point the other dates lack "
                                        r"\(moneyness 1.001, maturity 30 days\)"):
        panel_from_frame(stray, "f", "previous", 5)
    odd = df.copy()
    odd.loc[5, "iv"], odd.loc[20, "iv"] = np.nan, np.inf
    with pytest.raises(DataError, match=r"iv is inf \(NaN or inf\) on 2020-01-06"):
        panel_from_frame(odd, "f", "previous", 5)
    twice = pd.concat([df, df.iloc[[6]].assign(iv=np.nan)], ignore_index=True)
    with pytest.raises(DataError, match="duplicate rows for 2020-01-02"):
        panel_from_frame(twice, "f", "previous", 5)
    # an NPZ's NaN too
    a = arrays(12)
    a["surface"] = a["surface"].copy()
    a["surface"][5, 1, 1] = np.nan
    np.savez(tmp_path / "holes.npz", **a)
    assert "data.fill" in error(tmp_path / "holes.npz")
    assert read_panel(tmp_path / "holes.npz", "previous", 1).surface[5, 1, 1] == a["surface"][4, 1, 1]


def test_the_commands_say_what_data_fill_filled(tmp_path):
    """`prepare` (every command's loader) prints the fill note beside its other notes."""
    import io

    from rich.console import Console

    from engine.pipeline import prepare
    from tests.conftest import tiny_config

    df = frame(200).drop(index=[41, 42])
    df.to_csv(tmp_path / "holes.csv", index=False)
    buf = io.StringIO()
    prep = prepare(tiny_config(**{"data.source": str(tmp_path / "holes.csv"),
                                  "data.fill": "previous"}), console=Console(file=buf, width=400))
    assert prep.panel.n_days == 200
    assert "note: " + str(tmp_path / "holes.csv") + ": 2 missing iv values on 1 of 200 dates" \
        in buf.getvalue()
    with pytest.raises(DataError, match="data.fill"):
        prepare(tiny_config(**{"data.source": str(tmp_path / "holes.csv")}))
    # and an evaluation's report keeps the note
    from engine.evaluate import run_evaluation

    report = run_evaluation(tiny_config(**{
        "data.source": str(tmp_path / "holes.csv"), "data.fill": "previous",
        "evaluate.methods": ["hist-bootstrap"], "evaluate.n_samples": 20}), tmp_path / "ev")
    assert any("2 missing iv values on 1 of 200 dates" in n for n in report["notes"])
    assert "2 missing iv values" in (tmp_path / "ev" / "report.md").read_text()


def test_only_dates_that_begin_year_first_are_read_in_their_own_format(tmp_path):
    """The one-by-one reading takes a date only where it begins with a whole year-first
    date: day-first with spaces, a month alone, a time alone or 'today' are refused, not
    read as some date (today's would change the fingerprint from day to day)."""
    for odd in ("13 01 2020", "Jan 2020", "January 5", "16:00", "today"):
        df = frame()
        df.loc[df["date"] == "2020-01-05", "date"] = odd
        df.to_csv(tmp_path / "odd.csv", index=False)
        message = error(tmp_path / "odd.csv")
        assert repr(odd) in message, (odd, message)


# --- 13. separators, decimal commas, percent and log-moneyness ---------------------------------
@pytest.mark.parametrize("name, sep", [("semi.csv", ";"), ("tab.txt", "\t"), ("tab.tsv", "\t"),
                                       ("pipe.csv", "|"), ("space.txt", " ")])
def test_other_field_separators_read_as_commas(tmp_path, name, sep):
    """A file separated by semicolons, tabs, bars or lined-up spaces reads as the CSV."""
    df = frame()
    df.to_csv(tmp_path / "comma.csv", index=False)
    df.to_csv(tmp_path / name, index=False, sep=sep)
    assert load(tmp_path / name).fingerprint == load(tmp_path / "comma.csv").fingerprint


def test_a_comma_inside_a_column_name_keeps_the_comma_separator(tmp_path):
    """A comma file whose extra column's name holds semicolons or bars is still a comma
    file: the separator is the one that parts the header into the required names."""
    df = frame().assign(**{"quote; bid; ask; mid": 1.0, "K|S|x|y|z": 2.0})
    df.to_csv(tmp_path / "named.csv", index=False)
    frame().to_csv(tmp_path / "comma.csv", index=False)
    assert load(tmp_path / "named.csv").fingerprint == load(tmp_path / "comma.csv").fingerprint


def test_spaces_inside_a_date_of_a_space_separated_file_are_refused(tmp_path):
    lines = ["date moneyness maturity_days iv"] + [
        f"{d} 16:00:00 {m} {t} 0.2" for d in ("2020-01-01", "2020-01-02")
        for m in (0.9, 1.0) for t in (30, 90)]
    (tmp_path / "timed.txt").write_text("\n".join(lines) + "\n")
    assert "more space-separated fields than its header names" in error(tmp_path / "timed.txt")


def test_a_thousands_separator_names_both_readings(tmp_path):
    df = frame().astype({"maturity_days": object})
    df.loc[0, "maturity_days"] = "1,095"
    df.to_csv(tmp_path / "k.csv", index=False, sep=";")
    assert "(1095 or 1.095, whichever it means)" in error(tmp_path / "k.csv")


def test_a_decimal_comma_is_named_with_its_fix(tmp_path):
    df = frame().astype({"iv": str})
    df["iv"] = df["iv"].str.replace(".", ",", regex=False)
    df.to_csv(tmp_path / "eu.csv", index=False, sep=";")
    first = frame()["iv"].iloc[0]
    message = error(tmp_path / "eu.csv")
    assert f"non-numeric value '{str(first).replace('.', ',')}'" in message
    assert f"write numbers with a decimal point ({first})" in message


def test_vols_in_percent_are_named(tmp_path):
    """Percent vols above the reader's bound are refused with the fix; a calm market's in
    percent (2 to 5, under the bound) are read, with a note that every vol is above 100%."""
    df = frame()
    df.assign(iv=df["iv"] * 100).to_csv(tmp_path / "pct.csv", index=False)
    assert "most ivs are above 1 (median 20." in error(tmp_path / "pct.csv")
    assert "if the file is in percent, divide iv by 100" in error(tmp_path / "pct.csv")
    df.assign(iv=df["iv"] * 15).to_csv(tmp_path / "calm.csv", index=False)  # 3.0 .. 3.15
    note = load(tmp_path / "calm.csv").percent_note()
    assert note.startswith(f"{tmp_path / 'calm.csv'}: every iv is above 1 (the lowest is 3")
    assert "divide iv by 100" in note
    df.to_csv(tmp_path / "plain.csv", index=False)
    assert load(tmp_path / "plain.csv").notes() == []


def test_grid_labels_in_another_unit_are_noted(tmp_path):
    """Maturities in months and moneyness as deltas are read (they only label the grid), with
    a note naming the range and the conversion; weeks, days and a put-wing strike grid are not."""
    def note(moneyness, maturities):
        df = frame()
        df = df.assign(moneyness=df["moneyness"].map(dict(zip(MONEYNESS, moneyness))),
                       maturity_days=df["maturity_days"].map(dict(zip(MATURITIES, maturities))))
        df.to_csv(tmp_path / "g.csv", index=False)
        return load(tmp_path / "g.csv").grid_note()

    months = note(MONEYNESS, [3.0, 12.0])
    assert months.startswith(f"{tmp_path / 'g.csv'}: maturity_days runs from 3 to 12: if these "
                             "are months or years, multiply them by 30.4 or 365")
    assert "deltas" not in months and months.endswith("so the command goes on")
    assert months in load(tmp_path / "g.csv").notes()
    deltas = note([0.25, 0.75], MATURITIES)
    assert "moneyness runs from 0.25 to 0.75, every strike under the spot: if these are deltas" \
        in deltas and "months" not in deltas
    both = note([0.1, 0.5], [1.0, 6.0])
    assert "months" in both and "deltas" in both
    for moneyness, maturities in [(MONEYNESS, [7.0, 21.0]), (MONEYNESS, [30.0, 90.0]),
                                  ([0.5, 0.8], MATURITIES), ([0.25, 1.25], MATURITIES),
                                  (MONEYNESS, [3.5, 12.0])]:
        assert note(moneyness, maturities) is None, (moneyness, maturities)


def test_log_moneyness_is_named(tmp_path):
    df = frame()
    df.assign(moneyness=np.log(df["moneyness"])).to_csv(tmp_path / "logm.csv", index=False)
    message = error(tmp_path / "logm.csv")
    assert "must be > 0" in message and "log-moneyness ln(K/S)" in message
    atm = df[df["moneyness"] == 1.0]  # one column at the money: ln 1 = 0 everywhere
    atm.assign(moneyness=0.0).to_csv(tmp_path / "atm.csv", index=False)
    assert "log-moneyness ln(K/S)" in error(tmp_path / "atm.csv")
