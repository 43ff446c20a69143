"""Reading surfaces from outside: tidy CSV / Parquet and NPZ, validated once, here.

Tidy format: one row per (date, grid point): ``date, moneyness, maturity_days, iv``.
NPZ format: ``surface`` (T, n_m, n_tau), ``dates``, ``moneyness``, ``maturity_days``.
Every problem becomes one ``DataError`` line naming the date / column and the fix.
"""

from __future__ import annotations

import csv
import re
import warnings
import zipfile
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from engine.data.panel import Panel
from engine.errors import DataError, first_line

COLUMNS = ("date", "moneyness", "maturity_days", "iv")
MAX_GRID = 10
IV_MAX = 5.0
# Moneyness is strike / spot; a grid whose every strike lies beyond this many spots (80..120)
# was written in percent.
MONEYNESS_FLOOR_MAX = 5.0
# Maturities are calendar days; a grid that holds a fraction of a day and whose every
# maturity lies below this many days (0.25, 0.5, 1), or whose shortest is under a day (0.25,
# 1, 10), was written in years (a 1-day VIX alone, or 30.4-day months, stay readable).
MATURITY_YEARS_MAX = 5.0
CSV_SUFFIXES = (".csv", ".txt", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zip", ".zst")  # pandas reads these CSVs


def load_panel(data_cfg, evaluation: bool = False) -> Panel:
    """The panel named by ``data.source``: 'synthetic' or a file path.

    ``evaluation``: the synthetic market goes on for ``data.synthetic.test_days`` beyond
    its history (the test split of ``backfill evaluate``); a file is read as it is.
    """
    if data_cfg.source == "synthetic":
        from engine.data.synthetic import SyntheticMarket

        extra = data_cfg.synthetic.test_days if evaluation else 0
        return SyntheticMarket(data_cfg.synthetic, extra_days=extra).panel()
    return read_panel(data_cfg.source, data_cfg.fill, data_cfg.fill_limit)


def read_panel(path: str | Path, fill: str = "none", fill_limit: int = 5,
               fill_hint: bool = True) -> Panel:
    """A data file as a Panel; ``fill`` / ``fill_limit``: ``data.fill`` / ``data.fill_limit``
    (missing grid points refused, or carried forward from the point's last quote);
    ``fill_hint``: see ``panel_from_frame``."""
    if isinstance(path, str) and not path.strip():  # Path("") would be ".", "not a file"
        raise DataError("data path is empty; pass a CSV, Parquet or NPZ file, or 'synthetic'")
    p = Path(path).expanduser()  # a quoted ~/f.csv, or one from a config file
    if not p.exists():
        raise DataError(f"data file {p} not found; pass an existing CSV, Parquet or NPZ file, "
                        "or 'synthetic'")
    if p.is_dir() or not p.is_file():
        raise DataError(f"data path {p} is not a file; pass a CSV, Parquet or NPZ file")
    kind = _format_of(p)
    if p.stat().st_size == 0:
        raise DataError(f"data file {p} is empty; it needs a header "
                        f"({', '.join(COLUMNS)}) and one row per date and grid point")
    if kind == "NPZ":
        return _read_npz(p, fill, fill_limit, fill_hint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reader warnings would be extra stderr lines
            sep, header = _separator(p) if kind == "CSV" else (",", None)
            df = pd.read_parquet(p) if kind == "Parquet" else pd.read_csv(p, sep=sep)
            if sep == r"\s+" and not isinstance(df.index, pd.RangeIndex):
                # pandas took a row's first fields for an index: more fields than names
                raise DataError(f"{p}: its rows hold more space-separated fields than its "
                                "header names (a date with a time, or a month name?); separate "
                                "the columns with commas or tabs")
            # the header as written: pandas renames a repeated name (iv.1)
            if header is not None and len(header) == len(df.columns):
                df.columns = header
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is the user's file
        raise DataError(f"cannot read {p} as {kind} ({first_line(err)}); check the file's "
                        "format") from None
    return panel_from_frame(df, str(p), fill, fill_limit, fill_hint)


SEPARATORS = (",", ";", "\t", "|")


def _separator(p: Path) -> tuple[str, list[str]]:
    """The field separator of a CSV file and its header's fields as written: the first of
    SEPARATORS (then runs of spaces) that parts its header line into fields holding every
    required column name; a comma where none does (the columns' refusal then names what was
    found)."""
    line = pd.read_csv(p, header=None, nrows=1, dtype=str, sep="\x00", quoting=3,
                       keep_default_na=False).iloc[0, 0].lstrip("\ufeff")
    for sep in SEPARATORS:
        fields = next(csv.reader([line], delimiter=sep))
        if set(COLUMNS) <= {f.strip().lower() for f in fields}:
            return sep, fields
    if set(COLUMNS) <= {f.lower() for f in line.split()}:
        return r"\s+", line.split()
    return ",", next(csv.reader([line]))


def _grid_values(vals: pd.Series) -> pd.Series:
    """Grid coordinates, with values that agree to 12 significant digits made one: a float64
    column may carry a last-bit difference (1.0000000000000002 beside 1.0) that would split
    one grid point in two. Each such group takes its most frequent value (the first met on
    a tie); values that collide with none keep every bit, so a file's fingerprint stays."""
    out = vals.astype(float)
    groups: dict[float, list[float]] = {}
    for v in pd.unique(out.dropna()):
        groups.setdefault(float(f"{v:.12g}"), []).append(v)
    clashes = [g for g in groups.values() if len(g) > 1]
    if not clashes:
        return out
    counts = out.value_counts()
    mapping = {}
    for g in clashes:
        keep = max(g, key=lambda v: (counts[v], -g.index(v)))
        mapping.update({v: keep for v in g if v != keep})
    return out.replace(mapping)


def _format_of(p: Path) -> str:
    """'CSV', 'Parquet' or 'NPZ' by the file's extension; any other extension is refused."""
    suffixes = [x.lower() for x in p.suffixes[-2:]]
    last = suffixes[-1] if suffixes else ""
    if last == ".npz":
        return "NPZ"
    if last in PARQUET_SUFFIXES:
        return "Parquet"
    if last in CSV_SUFFIXES or (last in COMPRESSED_SUFFIXES and len(suffixes) == 2
                                and suffixes[0] in CSV_SUFFIXES):
        return "CSV"
    found = f"extension '{p.suffix}'" if p.suffix else "no extension"
    hint = ("; save the arrays with numpy.savez as an .npz (surface, dates, moneyness, "
            "maturity_days)" if last == ".npy" else "; convert it, or rename it if it is one")
    raise DataError(f"data file {p} has {found}, but the supported formats are "
                    f"{' / '.join(CSV_SUFFIXES)} (a tidy table, also compressed: "
                    f"{' / '.join(COMPRESSED_SUFFIXES)} after it), "
                    f"{' / '.join(PARQUET_SUFFIXES)} (a tidy table) and .npz (arrays){hint}")


def panel_from_frame(df: pd.DataFrame, source: str, fill: str = "none",
                     fill_limit: int = 5, fill_hint: bool = True) -> Panel:
    """Validate a tidy frame and pivot it into a Panel. ``fill = 'previous'``: rows whose iv is
    NaN count as missing, and missing grid points take the point's last quote (see
    ``fill_previous``). ``fill_hint``: a refusal of a NaN may suggest data.fill (not where
    the reader cannot set it: a store's --realised data is read as the run read its own)."""
    names = [str(c).strip().lower() for c in df.columns]
    for name in COLUMNS:
        same = [str(c) for c, n in zip(df.columns, names, strict=True) if n == name]
        if len(same) > 1:
            what = (f"column {same[0]!r} appears {len(same)} times" if same[0] == same[1] else
                    f"columns {same[0]!r} and {same[1]!r} both read as '{name}'")
            raise DataError(f"{source}: {what}; keep one of them")
    df = df.set_axis(names, axis=1)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column '{missing[0]}'; the required columns are "
                        f"{', '.join(COLUMNS)} (found {', '.join(map(str, df.columns))})")
    if len(df) == 0:  # after the header's check: a header of other columns is said as such
        raise DataError(f"{source} has a header but no rows; add one row per date and grid point")
    raw_dates = df["date"]
    if pd.api.types.is_bool_dtype(raw_dates):
        raise DataError(f"{source}: column 'date' is boolean (True/False); write dates as "
                        "YYYY-MM-DD")
    if pd.api.types.is_numeric_dtype(raw_dates):
        # pandas reads numbers as nanoseconds since 1970; a number here means YYYYMMDD.
        # (float first: a nullable integer column's missing value, pd.NA, has no truth value)
        raw_dates = raw_dates.astype("float64").map(
            lambda v: f"{v:.0f}" if np.isfinite(v) else "")
    dates = _checked_dates(raw_dates, df["date"], f"{source}: column 'date'",
                           lambda i: f"row {i + 2}", "write dates as YYYY-MM-DD")
    out = pd.DataFrame({"date": dates.dt.normalize()})
    for col in ("moneyness", "maturity_days", "iv"):
        column = df[col]
        if isinstance(column.dtype, pd.CategoricalDtype):
            column = column.astype(object)
        kind = _non_numeric_kind(column.dtype)
        if kind:
            raise DataError(f"{source}: column '{col}' holds {kind} (dtype {column.dtype}) but "
                            f"must hold real numbers; write {col} as numbers")
        if column.dtype == object:  # Python objects: True would pass as 1.0, 1j as complex
            odd = column.map(lambda v: isinstance(v, (bool, np.bool_, complex, np.complexfloating)))
        else:
            odd = pd.Series(False, index=column.index)
        vals = pd.to_numeric(column.where(~odd), errors="coerce")
        text_bad = odd | (vals.isna() & column.notna()
                          & ~column.astype(str).str.strip().str.lower().isin(
                              ["nan", "inf", "-inf", "infinity", "-infinity", ""]))
        if text_bad.any():
            row = int(np.flatnonzero(text_bad.to_numpy())[0])
            value = _plain(column.iloc[row])
            text = str(value).strip()
            if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+", text):  # 1,095: thousands, or not?
                how = ("write numbers without a thousands separator and with a decimal point "
                       f"({text.replace(',', '')} or {text.replace(',', '.', 1)}, whichever "
                       "it means)" if text.count(",") == 1 else
                       f"write numbers without a thousands separator ({text.replace(',', '')})")
            elif re.fullmatch(r"[-+]?\d*,\d+", text):
                how = f"write numbers with a decimal point ({text.replace(',', '.')})"
            else:
                how = "write a number"
            raise DataError(f"{source}: column '{col}' has non-numeric value "
                            f"{value!r} on {out['date'].iloc[row].date()} "
                            f"(row {row + 2}); {how}")
        out[col] = _grid_values(vals) if col != "iv" else vals.astype(float)
    # data.fill = 'previous': a NaN quote is a missing one, kept (its date and grid point stay
    # in the panel) and filled below like an absent row
    nan_missing = fill == "previous"
    if nan_missing and np.isnan(out["iv"].to_numpy()).all():
        raise DataError(f"{source}: every iv is NaN; there is nothing to fill from")
    for col in ("moneyness", "maturity_days", "iv"):
        finite = np.isfinite(out[col].to_numpy())
        if col == "iv" and nan_missing:
            finite |= np.isnan(out[col].to_numpy())
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            r = out.iloc[row]
            hint = (" (or set data.fill = 'previous' to carry the point's last quote forward)"
                    if col == "iv" and np.isnan(out[col].iloc[row]) and fill_hint else "")
            raise DataError(f"{source}: {col} is {df[col].iloc[row]} (NaN or inf) on "
                            f"{r['date'].date()} at {_point(r)}; drop or fill that row{hint}")
    for col in ("moneyness", "maturity_days"):
        values = out[col].to_numpy()
        nonpos = values <= 0
        if nonpos.any():
            r = out.iloc[int(np.flatnonzero(nonpos)[0])]
            how = "fix or drop that row"
            if col == "moneyness" and np.abs(values).max() <= 3 and (
                    (values < 0).any() or (values == 0).all()):  # ATM alone: ln 1 = 0
                how = ("moneyness is strike / spot (1.0 at the money): if these are "
                       "log-moneyness ln(K/S) (0 at the money), write exp of them")
            raise DataError(f"{source}: {col} = {r[col]:g} on {r['date'].date()} must be > 0; "
                            f"{how}")
    m = out["moneyness"].to_numpy()
    if m.min() > MONEYNESS_FLOOR_MAX:
        raise DataError(f"{source}: moneyness runs from {m.min():g} to {m.max():g}, every strike "
                        f"over {MONEYNESS_FLOOR_MAX:g}x the spot; moneyness is strike / spot (1.0 "
                        "at the money): if these are percent, divide them by 100")
    t = out["maturity_days"].to_numpy()
    if np.any(t != np.round(t)) and (t.max() < MATURITY_YEARS_MAX or t.min() < 1):
        raise DataError(f"{source}: maturity_days runs from {t.min():g} to {t.max():g}, "
                        + (f"every maturity under {MATURITY_YEARS_MAX:g} days"
                           if t.max() < MATURITY_YEARS_MAX else "the shortest under a day")
                        + " and some a fraction of a day; maturity_days is in calendar days: "
                        "if these are years, multiply them by 365")
    iv = out["iv"].to_numpy()
    bad_iv = (iv <= 0) | (iv > IV_MAX)
    if bad_iv.any():
        r = out.iloc[int(np.flatnonzero(bad_iv)[0])]
        median = float(np.median(iv[np.isfinite(iv)]))
        how = (f"most ivs are above 1 (median {median:.4g}): if the file is in percent, divide "
               "iv by 100" if median > 1 else "fix or drop that row")
        raise DataError(f"{source}: iv = {r['iv']:g} on {r['date'].date()} at {_point(r)} is "
                        f"outside (0, {IV_MAX:g}]; iv is a decimal (0.16 = 16 vol points): "
                        f"{how}")
    dup = out.duplicated(["date", "moneyness", "maturity_days"])
    if dup.any():
        r = out.iloc[int(np.flatnonzero(dup.to_numpy())[0])]
        raise DataError(f"{source}: duplicate rows for {r['date'].date()} at {_point(r)}; keep "
                        "one row per (date, moneyness, maturity_days)")
    moneyness = np.sort(out["moneyness"].unique())
    maturities = np.sort(out["maturity_days"].unique())
    # one date's own grid too big (raw quotes, not a grid): say so before comparing dates
    widest = out.groupby("date")[["moneyness", "maturity_days"]].nunique().max()
    if widest["moneyness"] > MAX_GRID or widest["maturity_days"] > MAX_GRID:
        raise DataError(_too_big(source, int(widest["moneyness"]), int(widest["maturity_days"])))
    if fill == "previous":
        return _filled_panel(out, source, *_fill_grid(out, source), fill_limit)
    if (out.groupby("date").size() != len(moneyness) * len(maturities)).any():
        _grid_error(out, source, fill_hint)
    if len(moneyness) > MAX_GRID or len(maturities) > MAX_GRID:
        raise DataError(_too_big(source, len(moneyness), len(maturities)))
    out = out.sort_values(["date", "moneyness", "maturity_days"], kind="stable")
    T = out["date"].nunique()
    surface = out["iv"].to_numpy().reshape(T, len(moneyness), len(maturities))
    day_index = out["date"].drop_duplicates().to_numpy().astype("datetime64[D]")
    return Panel(np.ascontiguousarray(surface, dtype=np.float64), day_index, moneyness, maturities,
                 source=source)


def _filled_panel(out: pd.DataFrame, source: str, moneyness: np.ndarray,
                  maturities: np.ndarray, limit: int) -> Panel:
    """Every date of ``out`` on ``_fill_grid``'s grid (NaN quotes count as rows there, so a
    date or a point quoted NaN throughout is kept, to be filled or refused), its missing
    points carried forward (``fill_previous``)."""
    days = np.sort(out["date"].unique()).astype("datetime64[D]")
    surface = np.full((len(days), len(moneyness), len(maturities)), np.nan)
    surface[np.searchsorted(days, out["date"].to_numpy().astype("datetime64[D]")),
            np.searchsorted(moneyness, out["moneyness"].to_numpy()),
            np.searchsorted(maturities, out["maturity_days"].to_numpy())] = out["iv"].to_numpy()
    missing = np.isnan(surface)
    surface = fill_previous(surface, days, moneyness, maturities, limit, source)
    note = None
    if missing.any():
        n, n_days = int(missing.sum()), int(missing.any(axis=(1, 2)).sum())
        note = (f"{source}: {n} missing iv value{'s' * (n != 1)} on {n_days} of {len(days)} "
                "dates filled with each point's previous quote (data.fill = 'previous')")
    return Panel(surface, days, moneyness, maturities, source=source, fill_note=note)


def fill_previous(surface: np.ndarray, days: np.ndarray, moneyness: np.ndarray,
                  maturities: np.ndarray, limit: int, source: str) -> np.ndarray:
    """Each NaN of ``surface`` (T, n_m, n_tau) takes its grid point's last earlier value, at
    most ``limit`` dates in a row; a point missing on the first dates (nothing to carry) or
    for longer is refused, naming it."""
    T = len(surface)
    flat = surface.reshape(T, -1)
    valid = ~np.isnan(flat)
    rows = np.arange(T)[:, None]
    last = np.maximum.accumulate(np.where(valid, rows, -1), axis=0)  # (T, G) last quote's row
    bad = (last < 0) | (rows - last > limit)
    if bad.any():
        t, g = (int(i[0]) for i in np.nonzero(bad))  # the earliest date, then the first point
        point = _point((moneyness[g // len(maturities)], maturities[g % len(maturities)]))
        if not valid[:, g].any():
            raise DataError(f"{source}: iv at {point} is never quoted (no row, or NaN on every "
                            "date), so there is nothing to fill it from; drop that point's rows "
                            "or give its quotes")
        if last[t, g] < 0:
            raise DataError(f"{source}: iv at {point} is missing on {days[t]}, with no earlier "
                            "quote to carry forward (data.fill = 'previous' fills a point from "
                            "its own past); add that value or drop the dates before the point's "
                            "first quote")
        run_end = t
        while run_end + 1 < T and not valid[run_end + 1, g]:
            run_end += 1
        start = int(last[t, g]) + 1
        raise DataError(f"{source}: iv at {point} is missing on {run_end - start + 1} dates in a "
                        f"row from {days[start]} to {days[run_end]}, more than data.fill_limit = "
                        f"{limit}; fill that gap, drop those dates or raise data.fill_limit")
    return np.ascontiguousarray(np.take_along_axis(flat, last, axis=0).reshape(surface.shape))


def _read_npz(p: Path, fill: str = "none", fill_limit: int = 5, fill_hint: bool = True) -> Panel:
    if not zipfile.is_zipfile(p):  # np.load would blame pickles and hint at allow_pickle
        raise DataError(f"cannot read {p} as NPZ (not a zip archive); write it with numpy.savez")
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read {p} as NPZ ({first_line(err)}); check the file's "
                        "format") from None
    need = ("surface", "dates", "moneyness", "maturity_days")
    arrays = {}
    with z:  # closed on every path: an open archive would warn (ResourceWarning) on stderr
        missing = [k for k in need if k not in z.files]
        if missing:
            raise DataError(f"{p}: missing array '{missing[0]}'; an NPZ needs {', '.join(need)}")
        for k in need:
            try:
                arrays[k] = np.asarray(z[k])
            except Exception as err:  # noqa: BLE001 - object arrays, a corrupt member
                what = "ISO date strings or datetime64" if k == "dates" else "a float array"
                raise DataError(f"{p}: cannot load array '{k}' ({first_line(err)}); store it "
                                f"as {what}") from None
    for k in ("surface", "moneyness", "maturity_days"):
        dtype = arrays[k].dtype
        if dtype.kind not in "iuf":  # bool would read as 0/1, complex would lose its imaginary part
            raise DataError(f"{p}: array '{k}' holds {_npz_kind(dtype)} (dtype {dtype}) but must "
                            "hold real numbers; store it as a float array")
    surface = arrays["surface"].astype(np.float64)
    moneyness = arrays["moneyness"].astype(np.float64).reshape(-1)
    maturities = arrays["maturity_days"].astype(np.float64).reshape(-1)
    raw = arrays["dates"].reshape(-1)
    if raw.dtype.kind == "M":
        dates = raw.astype("datetime64[D]")
        if np.isnat(dates).any():
            i = int(np.flatnonzero(np.isnat(dates))[0])
            raise DataError(f"{p}: array 'dates' has NaT (no date) at index {i}; every surface "
                            "needs its day: store datetime64[D] dates without gaps")
    elif raw.dtype.kind in "US":
        strings = pd.Series(raw.astype(str))
        parsed = _checked_dates(strings, strings, f"{p}: array 'dates'", lambda i: f"index {i}",
                                "store ISO date strings (YYYY-MM-DD) or datetime64")
        dates = parsed.dt.normalize().to_numpy().astype("datetime64[D]")
    else:  # numbers would be days (or ns) since 1970: never what a user meant
        raise DataError(f"{p}: array 'dates' holds {_npz_kind(raw.dtype)} (dtype {raw.dtype}), "
                        "not dates; store ISO date strings (YYYY-MM-DD) or datetime64[D]")
    expect = (len(dates), len(moneyness), len(maturities))
    if surface.ndim != 3 or surface.shape != expect:
        raise DataError(f"{p}: 'surface' has shape {surface.shape} but dates x moneyness x "
                        f"maturity_days is {expect}; the grid must be rectangular")
    # Reuse the tidy validation so NPZ and tables give the same messages.
    T, n_m, n_tau = surface.shape
    frame = pd.DataFrame({
        "date": np.repeat(dates, n_m * n_tau),
        "moneyness": np.tile(np.repeat(moneyness, n_tau), T),
        "maturity_days": np.tile(maturities, T * n_m),
        "iv": surface.reshape(-1),
    })
    return panel_from_frame(frame, str(p), fill, fill_limit, fill_hint)


def _point(r) -> str:
    """A row's grid point (a frame row, or a (moneyness, maturity_days) pair)."""
    m, t = (r["moneyness"], r["maturity_days"]) if hasattr(r, "keys") else r
    return f"moneyness {_num(m)}, maturity {_num(t)} days"


def _num(x) -> str:
    """A grid value short when it is short, else every digit (1.0000001 is not 1)."""
    x = float(x)
    short = f"{x:.10g}"
    return short if float(short) == x or not np.isfinite(x) else repr(x)


def _plain(v):
    """A numpy scalar as the Python value, so a message shows 3, not np.int64(3)."""
    return v.item() if isinstance(v, np.generic) else v


def _too_big(source: str, n_m: int, n_tau: int) -> str:
    return (f"{source}: grid is {n_m} x {n_tau} (moneyness x maturity) but at most {MAX_GRID} x "
            f"{MAX_GRID} is supported; interpolate onto a coarser grid")


def _date_grids(out: pd.DataFrame) -> tuple[dict, frozenset]:
    """Each date's grid points, and the grid most dates share (on a tie, the larger one):
    the one the others should match."""
    per_date = {d.date(): frozenset(zip(g["moneyness"].to_numpy(), g["maturity_days"].to_numpy()))
                for d, g in out.groupby("date", sort=True)}
    tally = Counter(per_date.values())
    return per_date, max(tally, key=lambda pts: (tally[pts], len(pts)))


def _fill_grid(out: pd.DataFrame, source: str) -> tuple[np.ndarray, np.ndarray]:
    """data.fill's grid: the rectangle of the grid most dates share. Points missing from it
    on some dates are filled; a point outside it (a stray row) is refused as without fill."""
    per_date, common = _date_grids(out)
    m_c, t_c = sorted({m for m, _ in common}), sorted({t for _, t in common})
    if len(m_c) > MAX_GRID or len(t_c) > MAX_GRID:
        raise DataError(_too_big(source, len(m_c), len(t_c)))
    rect = {(m, t) for m in m_c for t in t_c}
    off = [d for d, pts in per_date.items() if not pts <= rect]
    if off:
        extra = sorted(per_date[off[0]] - rect)
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        also = f" ({len(off)} of {len(per_date)} dates have such points)" if len(off) > 1 else ""
        raise DataError(f"{source}: date {off[0]} has a grid point the other dates lack "
                        f"({_point(extra[0])}{more}){also}; data.fill fills the points most dates "
                        "have, not others: drop that row or add the point to every date")
    return np.array(m_c, dtype=np.float64), np.array(t_c, dtype=np.float64)


def _grid_error(out: pd.DataFrame, source: str, fill_hint: bool = True) -> NoReturn:
    """Name the dates whose grid points differ from the grid most dates share."""
    per_date, common = _date_grids(out)
    m_c = sorted({m for m, _ in common})
    t_c = sorted({t for _, t in common})
    if len(m_c) > MAX_GRID or len(t_c) > MAX_GRID:
        raise DataError(_too_big(source, len(m_c), len(t_c)))
    off = [d for d, pts in per_date.items() if pts != common]
    if not off:  # every date has the same points, but they are not a full rectangle
        gap = next((m, t) for m in m_c for t in t_c if (m, t) not in common)
        raise DataError(f"{source}: every date lacks {_point(gap)}, so the {len(m_c)} x {len(t_c)} "
                        "grid (moneyness x maturity) is not rectangular; every date needs the "
                        "full grid: fill that point on every date or drop its moneyness / maturity")
    d = off[0]
    extra, missing = sorted(per_date[d] - common), sorted(common - per_date[d])
    also = ""
    if len(off) > 1:
        shown = ", ".join(str(x) for x in off[:3]) + (", ..." if len(off) > 3 else "")
        also = f" ({len(off)} of {len(per_date)} dates differ from that grid: {shown})"

    def more(pts) -> str:
        return f" and {len(pts) - 1} more" if len(pts) > 1 else ""

    if extra and missing:
        raise DataError(f"{source}: date {d} has {_point(extra[0])}{more(extra)} where the other "
                        f"dates have {_point(missing[0])}{more(missing)}{also}; every date needs "
                        "the same grid: fix those values or drop that date")
    if extra:
        raise DataError(f"{source}: date {d} has a grid point the other dates lack "
                        f"({_point(extra[0])}{more(extra)}){also}; every date needs the same grid: "
                        "drop that row or add the point to every date")
    raise DataError(f"{source}: date {d} has {len(per_date[d])} of {len(common)} grid points "
                    f"(missing {_point(missing[0])}{more(missing)}){also}; every date needs the "
                    "full grid: drop that date or fill the point"
                    + (" (data.fill = 'previous' carries each point's last quote forward)"
                       if fill_hint else ""))


# A UTC offset after a time of day ('2011-01-04T00:00:00Z', '... 09:30-05:00').
_TZ_SUFFIX = re.compile(r"(\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)\s*"
                        r"(?:Z|UTC|GMT|[+-]\d{2}(?::?\d{2})?)$", re.IGNORECASE)


def _naive(v):
    """A date without its time zone, keeping its own calendar date (not converted to UTC)."""
    if isinstance(v, str):
        return _TZ_SUFFIX.sub(r"\1", v.strip())
    if isinstance(v, datetime) and v.tzinfo is not None:
        return v.replace(tzinfo=None)
    return v


def _parse_dates(raw: pd.Series, mixed: bool = False) -> pd.Series:
    """Timestamps without time zone (NaT where unreadable); no warning reaches stderr.
    ``mixed``: each value in its own format (else the first value's format for all)."""
    how = {"format": "mixed"} if mixed else {}
    with warnings.catch_warnings():
        # pandas / numpy warn on stderr (format inference, time zones); the caller's error is
        # the one line.
        warnings.simplefilter("ignore")
        try:
            dates = pd.to_datetime(raw, errors="coerce", **how)
        except (ValueError, TypeError, OverflowError):  # e.g. mixed UTC offsets
            dates = None
        if dates is None or not pd.api.types.is_datetime64_any_dtype(dates):
            try:
                dates = pd.to_datetime(raw.map(_naive), errors="coerce", **how)
            except (ValueError, TypeError, OverflowError):
                dates = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns]")
    if isinstance(dates.dtype, pd.DatetimeTZDtype):
        dates = dates.dt.tz_localize(None)  # the local calendar date, as written
    # pandas reads 'today' and 'now' as the clock's: a file would change from day to day
    relative = raw.map(lambda v: isinstance(v, str) and v.strip().lower() in ("today", "now"))
    return dates.where(~relative.to_numpy(dtype=bool)) if relative.any() else dates


def _parses_alone(v) -> bool:
    blank = isinstance(v, str) and not v.strip()
    if v is None or blank or (isinstance(v, float) and np.isnan(v)):
        return False
    return bool(_parse_dates(pd.Series([v], dtype=object)).notna().iloc[0])


# A date in digits must put the year first (YYYY-MM-DD, YYYY/MM/DD, YYYYMMDD; a time and
# zone may follow): '04/01/11' is 4 January or 1 April, and pandas, guessing value by value,
# files the same layout under both. Month names ('4 Jan 2011') are unambiguous.
_DAY_FIRST = re.compile(r"(?<![\d/.\-])\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}(?![\d/.\-])")
_YEAR_FIRST = re.compile(r"\s*\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?!\d)")
_DIGITS_ONLY = re.compile(r"\s*\d+\s*")
_YEAR_FIRST_DIGITS = re.compile(r"\s*\d{8}\s*")


def _year_first_start(value) -> bool:
    """Does ``value`` begin with a whole date, year first (2011-01-04, 2011/01/04, 20110104),
    whatever time or zone follows?"""
    return isinstance(value, str) and bool(_YEAR_FIRST.match(value)
                                           or re.match(r"\s*\d{8}(?!\d)", value))


def _digit_date_problem(value) -> str | None:
    """'ambiguous' for a date in digits whose day and month could be read either way
    (04/01/11 anywhere in the text, 040111), 'unreadable' for other bare numbers (7, 12345),
    else None (year first, or with a month name: pandas reads those)."""
    if not isinstance(value, str) or _YEAR_FIRST.match(value):
        return None  # year first (whatever time follows)
    if _DAY_FIRST.search(value):
        return "ambiguous"
    if _DIGITS_ONLY.fullmatch(value) and not _YEAR_FIRST_DIGITS.fullmatch(value):
        return "ambiguous" if len(value.strip()) == 6 else "unreadable"
    return None


def _checked_dates(raw: pd.Series, shown: pd.Series, what: str, where, fix: str) -> pd.Series:
    """Parsed dates, or one DataError naming the value (and row) that is really the problem."""
    problems = raw.map(_digit_date_problem)
    if problems.notna().any():
        i = int(np.flatnonzero(problems.notna().to_numpy())[0])
        value = _plain(shown.iloc[i])
        if problems.iloc[i] == "ambiguous":
            raise DataError(f"{what} has {value!r} at {where(i)}: a date in digits not written "
                            "year first, whose day and month could be read either way "
                            "(04/01/11: 4 January or 1 April?); write every date as YYYY-MM-DD "
                            "(or YYYYMMDD)")
        raise DataError(f"{what} has unreadable value {value!r} at {where(i)}; {fix}")
    dates = _parse_dates(raw)
    bad = dates.isna().to_numpy()
    if bad.any() and (~bad).any():
        # pandas takes the format of the first date, so a later date in another one (a time
        # on some rows, 2011/01/04 beside 2011-01-05) comes back NaT: read those one by one.
        # Safe: a date whose day and month could swap was refused above.
        # Only dates that begin with a full year-first date are taken: dateutil reads any
        # text (a day and month without a year, 'today', '03 01 2011' month first).
        again = _parse_dates(raw[bad], mixed=True).where(raw[bad].map(_year_first_start))
        dates = dates.copy()
        dates[bad] = again.to_numpy()
        bad = dates.isna().to_numpy()
    if not bad.any():
        return dates
    i = int(np.flatnonzero(bad)[0])
    value = _plain(shown.iloc[i])
    if str(value).strip().lower() == "date":
        raise DataError(f"{what} repeats its header line at {where(i)} (two exports joined?); "
                        "delete that line")
    ok = np.flatnonzero(~bad)
    if len(ok) and _parses_alone(raw.iloc[i]):
        # pandas takes the format of the first date; a later date in another format reads on
        # its own, so the problem is the mix of formats, not that one value.
        j = int(ok[0])
        raise DataError(f"{what} mixes date formats: {_plain(shown.iloc[j])!r} ({where(j)}) and "
                        f"{value!r} ({where(i)}); write every date in one format, YYYY-MM-DD")
    raise DataError(f"{what} has unreadable value {value!r} at {where(i)}; {fix}")


def _non_numeric_kind(dtype) -> str | None:
    """What a column holds when its dtype is not real numbers (None: numbers, or text to parse)."""
    if pd.api.types.is_bool_dtype(dtype):
        return "booleans (True/False)"
    if pd.api.types.is_complex_dtype(dtype):
        return "complex numbers"
    if pd.api.types.is_datetime64_any_dtype(dtype) or pd.api.types.is_timedelta64_dtype(dtype):
        return "dates or durations"
    return None


def _npz_kind(dtype: np.dtype) -> str:
    return _non_numeric_kind(dtype) or {"U": "text", "S": "text", "O": "Python objects",
                                        "i": "integers", "u": "integers",
                                        "f": "floats"}.get(dtype.kind, "non-numbers")
