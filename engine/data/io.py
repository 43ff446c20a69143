"""Reading surfaces from outside: tidy CSV / Parquet and NPZ, validated once, here.

Tidy format: one row per (date, grid point): ``date, moneyness, maturity_days, iv``.
NPZ format: ``surface`` (T, n_m, n_tau), ``dates``, ``moneyness``, ``maturity_days``.
Every problem becomes one ``DataError`` line naming the date / column and the fix.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from engine.data.panel import Panel
from engine.errors import DataError

COLUMNS = ("date", "moneyness", "maturity_days", "iv")
MAX_GRID = 10
IV_MAX = 5.0


def load_panel(data_cfg, evaluation: bool = False) -> Panel:
    """The panel named by ``data.source``: 'synthetic' or a file path.

    ``evaluation``: the synthetic market goes on for ``data.synthetic.test_days`` beyond
    its history (the test split of ``backfill evaluate``); a file is read as it is.
    """
    if data_cfg.source == "synthetic":
        from engine.data.synthetic import SyntheticMarket

        extra = data_cfg.synthetic.test_days if evaluation else 0
        return SyntheticMarket(data_cfg.synthetic, extra_days=extra).panel()
    return read_panel(data_cfg.source)


def read_panel(path: str | Path) -> Panel:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} not found; pass an existing CSV, Parquet or NPZ file, "
                        "or 'synthetic'")
    if p.is_dir() or not p.is_file():
        raise DataError(f"data path {p} is not a file; pass a CSV, Parquet or NPZ file")
    if p.stat().st_size == 0:
        raise DataError(f"data file {p} is empty; it needs a header "
                        f"({', '.join(COLUMNS)}) and one row per date and grid point")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _read_npz(p)
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p)
    except Exception as err:  # noqa: BLE001 - any reader failure is the user's file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read {p} as {'Parquet' if suffix in ('.parquet', '.pq') else 'CSV'}"
                        f" ({first}); check the file's format") from None
    return panel_from_frame(df, str(p))


def panel_from_frame(df: pd.DataFrame, source: str) -> Panel:
    """Validate a tidy frame and pivot it into a Panel."""
    if len(df) == 0:
        raise DataError(f"{source} has a header but no rows; add one row per date and grid point")
    df = df.rename(columns={c: str(c).strip().lower() for c in df.columns})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column '{missing[0]}'; the required columns are "
                        f"{', '.join(COLUMNS)} (found {', '.join(map(str, df.columns))})")
    raw_dates = df["date"]
    if pd.api.types.is_numeric_dtype(raw_dates):
        # pandas reads numbers as nanoseconds since 1970; a number here means YYYYMMDD.
        raw_dates = raw_dates.map(lambda v: f"{v:.0f}" if np.isfinite(v) else "")
    with warnings.catch_warnings():
        # pandas warns on stderr when it cannot infer a format; the check below is the one line.
        warnings.simplefilter("ignore", UserWarning)
        dates = pd.to_datetime(raw_dates, errors="coerce")
    bad = dates.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{source}: column 'date' has unreadable value {df['date'].iloc[row]!r} "
                        f"at row {row + 2}; write dates as YYYY-MM-DD")
    out = pd.DataFrame({"date": dates.dt.normalize()})
    for col in ("moneyness", "maturity_days", "iv"):
        vals = pd.to_numeric(df[col], errors="coerce")
        text_bad = vals.isna() & df[col].notna() & ~df[col].astype(str).str.strip().str.lower().isin(
            ["nan", "inf", "-inf", "infinity", "-infinity", ""])
        if text_bad.any():
            row = int(np.flatnonzero(text_bad.to_numpy())[0])
            raise DataError(f"{source}: column '{col}' has non-numeric value {df[col].iloc[row]!r} "
                            f"on {out['date'].iloc[row].date()} (row {row + 2}); write a number")
        out[col] = vals.astype(float)
    for col in ("moneyness", "maturity_days", "iv"):
        finite = np.isfinite(out[col].to_numpy())
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            r = out.iloc[row]
            raise DataError(f"{source}: {col} is {df[col].iloc[row]} (NaN or inf) on "
                            f"{r['date'].date()} at {_point(r)}; drop or fill that row")
    for col in ("moneyness", "maturity_days"):
        nonpos = out[col].to_numpy() <= 0
        if nonpos.any():
            r = out.iloc[int(np.flatnonzero(nonpos)[0])]
            raise DataError(f"{source}: {col} = {r[col]:g} on {r['date'].date()} must be > 0; "
                            "fix or drop that row")
    iv = out["iv"].to_numpy()
    bad_iv = (iv <= 0) | (iv > IV_MAX)
    if bad_iv.any():
        r = out.iloc[int(np.flatnonzero(bad_iv)[0])]
        raise DataError(f"{source}: iv = {r['iv']:g} on {r['date'].date()} at {_point(r)} is "
                        f"outside (0, {IV_MAX:g}]; iv is a decimal (0.16 = 16 vol points): "
                        "fix or drop that row")
    dup = out.duplicated(["date", "moneyness", "maturity_days"])
    if dup.any():
        r = out.iloc[int(np.flatnonzero(dup.to_numpy())[0])]
        raise DataError(f"{source}: duplicate rows for {r['date'].date()} at {_point(r)}; keep "
                        "one row per (date, moneyness, maturity_days)")
    moneyness = np.sort(out["moneyness"].unique())
    maturities = np.sort(out["maturity_days"].unique())
    if len(moneyness) > MAX_GRID or len(maturities) > MAX_GRID:
        raise DataError(f"{source}: grid is {len(moneyness)} x {len(maturities)} (moneyness x "
                        f"maturity) but at most {MAX_GRID} x {MAX_GRID} is supported; "
                        "interpolate onto a coarser grid")
    n_grid = len(moneyness) * len(maturities)
    counts = out.groupby("date").size()
    short = counts[counts < n_grid]
    if len(short):
        d = short.index[0]
        have = out.loc[out["date"] == d, ["moneyness", "maturity_days"]]
        have_set = set(map(tuple, have.to_numpy()))
        gap = next((m, t) for m in moneyness for t in maturities if (m, t) not in have_set)
        raise DataError(f"{source}: date {d.date()} has {short.iloc[0]} of {n_grid} grid points "
                        f"(missing moneyness {gap[0]:g}, maturity {gap[1]:g} days); every date "
                        "needs the full grid: drop that date or fill the point")
    out = out.sort_values(["date", "moneyness", "maturity_days"], kind="stable")
    T = out["date"].nunique()
    surface = out["iv"].to_numpy().reshape(T, len(moneyness), len(maturities))
    day_index = out["date"].drop_duplicates().to_numpy().astype("datetime64[D]")
    return Panel(np.ascontiguousarray(surface, dtype=np.float64), day_index, moneyness, maturities,
                 source=source)


def _read_npz(p: Path) -> Panel:
    if not zipfile.is_zipfile(p):  # np.load would blame pickles and hint at allow_pickle
        raise DataError(f"cannot read {p} as NPZ (not a zip archive); write it with numpy.savez")
    try:
        z = np.load(p, allow_pickle=False)
        keys = set(z.files)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read {p} as NPZ ({err}); check the file's format") from None
    need = ("surface", "dates", "moneyness", "maturity_days")
    missing = [k for k in need if k not in keys]
    if missing:
        raise DataError(f"{p}: missing array '{missing[0]}'; an NPZ needs {', '.join(need)}")
    try:
        surface = np.asarray(z["surface"], dtype=float)
        moneyness = np.asarray(z["moneyness"], dtype=float).reshape(-1)
        maturities = np.asarray(z["maturity_days"], dtype=float).reshape(-1)
    except Exception as err:  # noqa: BLE001 - object arrays, text, a corrupt member
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{p}: 'surface', 'moneyness' and 'maturity_days' must be numeric arrays "
                        f"({first}); store them as float arrays") from None
    try:
        dates = np.asarray(z["dates"]).astype("datetime64[D]").reshape(-1)
    except (ValueError, TypeError):
        raise DataError(f"{p}: array 'dates' is not dates; store ISO strings or datetime64") from None
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
    return panel_from_frame(frame, str(p))


def _point(r) -> str:
    return f"moneyness {r['moneyness']:g}, maturity {r['maturity_days']:g} days"
