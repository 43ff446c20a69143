"""The parsed panel of daily surfaces and its chronological splits.

A ``Panel`` holds ``surface`` (T, n_m, n_tau) in iv units on a fixed grid. Windows
are views: window ``i`` has context days ``[i, i + C)`` and target days
``[i + C, i + C + H)``; its *anchor* is the last context day ``t = i + C - 1``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.errors import DataError, EmptySplitError

SPLITS = ("train", "calibration", "test")


# More calendar days than this between consecutive dates is no weekend or holiday.
MAX_GAP_DAYS = 14
REPEATS_NOTED = 5  # days repeating the day before, at least, for a note
# Whole-number maturities no longer than this (not all weeks) read as months or years.
MONTHS_MAX = 24
# A moneyness grid under the spot everywhere whose lowest strike is below this reads as deltas.
DELTA_FLOOR = 0.3


@dataclass(frozen=True, eq=False)
class Panel:
    surface: np.ndarray  # (T, n_m, n_tau) iv, float64, > 0
    dates: np.ndarray  # (T,) datetime64[D], strictly increasing
    moneyness: np.ndarray  # (n_m,)
    maturity_days: np.ndarray  # (n_tau,)
    source: str = "array"
    # The synthetic market keeps its hidden state here so the oracle can use it.
    market: Any = field(default=None, repr=False)
    # What data.fill = 'previous' filled, said once where the data is loaded.
    fill_note: str | None = field(default=None, repr=False)

    @property
    def n_days(self) -> int:
        return self.surface.shape[0]

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.surface.shape[1], self.surface.shape[2]

    @cached_property
    def log_surface(self) -> np.ndarray:  # (T, n_m, n_tau)
        return np.log(self.surface)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the parsed panel: values, dates and grid."""
        h = hashlib.sha256()
        for a in (self.surface.astype(np.float64), self.dates.astype("datetime64[D]").astype(np.int64),
                  self.moneyness.astype(np.float64), self.maturity_days.astype(np.float64)):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    @property
    def history_days(self) -> int:
        """Days before any evaluation-only extension of a synthetic market (all days of a file)."""
        return self.n_days if self.market is None else min(self.market.history_days, self.n_days)

    @property
    def history_fingerprint(self) -> str:
        """The fingerprint of the history alone: what a model trained on it recorded."""
        if self.history_days == self.n_days:
            return self.fingerprint
        return self.slice_days(0, self.history_days).fingerprint

    def gap_note(self, max_gap: int = MAX_GAP_DAYS, consequence: str = (
            "windows run across such a gap as if its ends were consecutive days: fill it, "
            "or keep one side of it")) -> str | None:
        """A note when consecutive dates lie more than ``max_gap`` calendar days apart (a
        data outage, years cut out), saying the ``consequence``: by default, that every
        window treats the days as consecutive."""
        if self.n_days < 2:
            return None
        gaps = np.diff(self.dates.astype("datetime64[D]").astype(np.int64))
        wide = np.flatnonzero(gaps > max_gap)
        if not len(wide):
            return None
        i = int(wide[np.argmax(gaps[wide])])
        more = f" and {len(wide) - 1} more gaps of over {max_gap} days" if len(wide) > 1 else ""
        return (f"{self.source} jumps from {self.dates[i]} to {self.dates[i + 1]} "
                f"({int(gaps[i])} calendar days){more}; {consequence}")

    def repeat_note(self) -> str | None:
        """A note when many days repeat the day before's surface exactly at every grid point
        (a calendar-day export filled forward): each such row is taken as a day without a
        move, so paths would run slower and calmer than the market's."""
        if self.n_days < 2:
            return None
        same = np.all(self.surface[1:] == self.surface[:-1], axis=(1, 2))
        k = int(same.sum())
        if k < max(REPEATS_NOTED, 0.01 * self.n_days):
            return None
        weekend = int((~np.is_busday(self.dates[1:][same].astype("datetime64[D]"))).sum())
        on = f", {weekend} of them Saturdays or Sundays" if weekend else ""
        return (f"{self.source}: {k} of its {self.n_days} days ({100 * k / self.n_days:.0f}%) "
                f"repeat the day before's surface exactly at every grid point{on}; each row is "
                "taken as one trading day, so these count as days without a move (a "
                "calendar-day export filled forward?): keep one row per trading day for paths "
                "at the market's pace")

    def percent_note(self) -> str | None:
        """A note when every vol of the history lies above 1 (100 vol points): a file in
        percent whose values stay under the reader's bound (a calm market's 2 to 5)."""
        lowest = float(np.min(self.surface[:self.history_days]))
        if lowest <= 1:
            return None
        return (f"{self.source}: every iv is above 1 (the lowest is {lowest:.4g}, "
                f"{100 * lowest:.0f} vol points); iv is a decimal (0.16 = 16 vol points): if "
                "the file is in percent, divide iv by 100")

    def grid_note(self) -> str | None:
        """A note when the grid's labels read like another unit: maturities of whole numbers
        up to 24 that are not weeks (months, years?), or moneyness under the spot everywhere
        with a strike below 0.3 spots (call deltas?). Only the labels would be off (which point is
        at the money for ``demo`` and ``plot``, where a ``--position`` lands), so a note."""
        m, t = self.moneyness, self.maturity_days
        said = []
        if len(t) > 1 and t.max() <= MONTHS_MAX and np.all(t == np.round(t)) and np.any(t % 7):
            said.append(f"maturity_days runs from {t.min():g} to {t.max():g}: if these are "
                        "months or years, multiply them by 30.4 or 365 (maturity_days is in "
                        "calendar days)")
        if len(m) > 1 and m.max() < 1 and m.min() < DELTA_FLOOR:
            said.append(f"moneyness runs from {m.min():g} to {m.max():g}, every strike under "
                        "the spot: if these are deltas, convert them to strike / spot "
                        "(moneyness is 1.0 at the money)")
        if not said:
            return None
        return (f"{self.source}: " + "; ".join(said) + ". The values only label the grid "
                "(the at-the-money point of plots, where a --position lands), so the command "
                "goes on")

    def notes(self) -> list[str]:
        """What loading found that a user should hear: points filled, calendar gaps, days
        repeated, vols that look like percent, grid labels in another unit."""
        return [n for n in (self.fill_note, self.gap_note(), self.repeat_note(),
                            self.percent_note(), self.grid_note()) if n]

    def grid_dict(self) -> dict:
        return {"moneyness": [float(m) for m in self.moneyness],
                "maturity_days": [float(t) for t in self.maturity_days]}

    def windows(self, context: int, horizon: int, log: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """All (context, target) windows as read-only views, (N, C, n_m, n_tau) and (N, H, n_m, n_tau)."""
        x = self.log_surface if log else self.surface
        if self.n_days < context + horizon:
            raise DataError(
                f"{self.source} has {self.n_days} days but one window needs context + horizon = "
                f"{context} + {horizon} = {context + horizon}; give more history or shorten "
                "data.context / data.horizon")
        view = np.moveaxis(sliding_window_view(x, context + horizon, axis=0), -1, 1)
        return view[:, :context], view[:, context:]

    def contexts_at(self, anchors: np.ndarray, context: int, log: bool = True) -> np.ndarray:
        """Contexts ending at the given anchor days, (B, C, n_m, n_tau) (a copy)."""
        x = self.log_surface if log else self.surface
        idx = np.asarray(anchors)[:, None] + np.arange(-context + 1, 1)[None, :]
        return x[idx]

    def targets_at(self, anchors: np.ndarray, horizon: int, log: bool = True) -> np.ndarray:
        """Realised paths after the given anchor days, (B, H, n_m, n_tau) (a copy)."""
        x = self.log_surface if log else self.surface
        idx = np.asarray(anchors)[:, None] + np.arange(1, horizon + 1)[None, :]
        return x[idx]

    def slice_days(self, start: int, stop: int) -> Panel:
        """The panel restricted to days [start, stop) (views; a synthetic market stays attached)."""
        return Panel(self.surface[start:stop], self.dates[start:stop], self.moneyness,
                     self.maturity_days, source=self.source, market=self.market)


@dataclass(frozen=True)
class Splits:
    """Chronological day ranges [start, stop) with an embargo between them.

    A window belongs to a split when all its *target* days lie inside the split's
    range; its context may reach back into earlier days (information known at
    forecast time). The embargo keeps one split's targets from touching the next's.
    """

    context: int
    horizon: int
    embargo: int
    ranges: dict[str, tuple[int, int]]
    note: str | None = None  # why the shares differ from the config's (see make_splits)

    def anchors(self, split: str, stride: int = 1) -> np.ndarray:
        """Anchor days (last context day) of the split's complete windows."""
        start, stop = self.ranges[split]
        first = max(start - 1, self.context - 1)
        last = stop - 1 - self.horizon
        return np.arange(first, last + 1, stride, dtype=np.int64)

    def pre_test_stop(self) -> int:
        """First day that test information may touch: nothing at or after it is used to fit."""
        return self.ranges["test"][0] - self.embargo

    def to_dict(self) -> dict:
        return {"context": self.context, "horizon": self.horizon, "embargo": self.embargo,
                **{k: list(v) for k, v in self.ranges.items()},
                **({"note": self.note} if self.note else {})}


def make_splits(panel: Panel, data_cfg) -> Splits:
    """Train / calibration / test day ranges by dates or fractions, each holding a window."""
    C, H, E = data_cfg.context, data_cfg.horizon, data_cfg.embargo_days
    T = panel.n_days
    if T < C + H:
        panel.windows(C, H)  # raises the "fewer days than context + horizon" error
    by_dates = data_cfg.calibration_start or data_cfg.test_start
    if by_dates:
        if not (data_cfg.calibration_start and data_cfg.test_start):
            raise DataError("set both data.calibration_start and data.test_start, or neither "
                            "(then data.split_fractions is used)")
        cal = _first_on_or_after(panel, data_cfg.calibration_start, "data.calibration_start")
        tst = _first_on_or_after(panel, data_cfg.test_start, "data.test_start")
        if tst >= panel.history_days:  # a date in a synthetic test extension: not history
            raise DataError(f"data.test_start = {data_cfg.test_start} is after the last date of "
                            f"the history ({panel.dates[panel.history_days - 1]}); pick a date "
                            "inside it")
        if not cal < tst:
            raise DataError(f"data.calibration_start ({data_cfg.calibration_start}) must come "
                            f"before data.test_start ({data_cfg.test_start})")
        # a split's date is its first target day: the split's first window forecasts from
        # it, and the embargo comes before it (the split ahead of it ends E days earlier)
        ranges = {"train": (0, max(cal - E, 0)), "calibration": (cal, max(tst - E, cal)),
                  "test": (tst, T)}
    else:  # the shares cut the history; a synthetic test extension joins the test split
        f_train, f_cal, _ = data_cfg.split_fractions
        cal, tst = _share_cuts(panel.history_days, f_train, f_cal)
        ranges = _ranges(cal, tst, T, E)
    splits = Splits(C, H, E, ranges)
    empty = not all(len(splits.anchors(name)) for name in SPLITS)
    fit = _fractions_that_fit(panel.history_days, C, H, E) if empty and not by_dates else None
    default = type(data_cfg).model_fields["split_fractions"].default
    if fit is not None and tuple(data_cfg.split_fractions) == tuple(default):
        # the default shares (left out, or written as they are: a dumped config) leave a
        # split empty on a short history: shares that fit serve instead (said in a note).
        # A function of the config and the data alone, so a stored config reproduces it;
        # other shares are never replaced.
        ranges = _ranges(*_share_cuts(panel.history_days, fit[0], fit[1]), T, E)
        shares = ", ".join(f"{f:g}" for f in default)
        note = (f"the default data.split_fractions [{shares}] leave a split of these "
                f"{panel.history_days} days without a complete window (context {C}, "
                f"horizon {H}, embargo {E}); using [{fit[0]:g}, {fit[1]:g}, {fit[2]:g}] "
                "instead; set other data.split_fractions (or the split dates) to choose")
        splits = Splits(C, H, E, ranges, note)
    for name in SPLITS:
        start, stop = ranges[name]
        if len(splits.anchors(name)) == 0:
            n_days = max(stop - start, 0)
            need = H if name != "train" else C + H
            span = (f" ({panel.dates[start]} .. {panel.dates[stop - 1]})" if n_days > 0 else "")
            if by_dates:  # the embargo ends a split, ahead of the next one's date
                following = {"train": "calibration", "calibration": "test"}.get(name)
                after = (f", up to the {E}-day embargo before data.{following}_start"
                         if following and E else "")
            else:
                after = f" after a {E}-day embargo" if name != "train" and E else ""
            dated = _date_fix(name, panel.dates, cal, tst, T, C, H, E) if by_dates else None
            if dated is not None:
                how = dated
            elif fit is not None:
                how = (f"set data.split_fractions = [{fit[0]:g}, {fit[1]:g}, {fit[2]:g}] (then "
                       f"calibration and test hold {MIN_WINDOWS}+ windows each), shorten "
                       "data.horizon, or give more history")
            else:
                how = ("shorten data.horizon, change data.split_fractions / the split dates, or "
                       "give more history")
            raise EmptySplitError(
                f"{name} split has no complete window: it holds {n_days} days{span}{after} and "
                f"needs at least {need} (context {C}, horizon {H}); {how}")
    return splits


MIN_WINDOWS = 30  # the windows per split that a suggested split_fractions leaves


def calibration_days(C: int, H: int, E: int, tst: int) -> tuple[int, int]:
    """The first and last day index a calibration date may take beside a test date ``tst``
    (split dates, ``make_splits``): train keeps a window before its embargo, calibration one
    before the test split's (C + H + E <= c <= tst - E - H)."""
    return C + H + E, tst - E - H


def _date_fix(name: str, dates: np.ndarray, cal: int, tst: int, T: int, C: int, H: int,
              E: int) -> str | None:
    """The split dates that would give split ``name`` a window, keeping the other date where
    that works (None: no date does on this history). Train keeps one while calibration
    starts at or after day C + H + E; calibration while it starts at or before the test
    start - E - H; test while it starts at or before day T - H."""
    (first_cal, last_cal), last_tst = calibration_days(C, H, E, tst), T - H
    if name == "test":
        return (f"set data.test_start on or before {dates[last_tst]}"
                if cal + E + H <= last_tst else None)
    if first_cal <= last_cal:  # a calibration date that keeps this test start serves
        return (f"set data.calibration_start between {dates[first_cal]} and "
                f"{dates[last_cal]}")
    if first_cal + E + H <= last_tst:  # else a later test start too
        return (f"set data.calibration_start = {dates[first_cal]} and data.test_start between "
                f"{dates[first_cal + E + H]} and {dates[last_tst]}")
    return None


def _share_cuts(history_days: int, f_train: float, f_cal: float) -> tuple[int, int]:
    """The first day of calibration and of test that train / calibration shares give."""
    return round(f_train * history_days), round((f_train + f_cal) * history_days)


def _ranges(cal: int, tst: int, n_days: int, embargo: int) -> dict[str, tuple[int, int]]:
    """The three splits' day ranges for those first days, an embargo before each."""
    return {"train": (0, cal), "calibration": (cal + embargo, tst),
            "test": (tst + embargo, n_days)}


def _fractions_that_fit(n_days: int, C: int, H: int, E: int) -> tuple[float, ...] | None:
    """Split shares, in steps of 0.05 (calibration = test), that leave calibration and test
    MIN_WINDOWS complete windows each after their embargo, and train as many; None if no
    such shares exist for this history."""
    for step in range(4, 10):  # calibration and test shares 0.2 .. 0.45
        f = step / 20
        shares = (round(1 - 2 * f, 2), f, f)
        # the very cuts make_splits takes from these shares
        splits = Splits(C, H, E, _ranges(*_share_cuts(n_days, *shares[:2]), n_days, E))
        if all(len(splits.anchors(name)) >= MIN_WINDOWS for name in SPLITS):
            return shares
    return None


def _first_on_or_after(panel: Panel, date: str, key: str) -> int:
    try:
        d = np.datetime64(date, "D")
    except ValueError:
        raise DataError(f"{key} = {date!r} is not a date; use YYYY-MM-DD") from None
    i = int(np.searchsorted(panel.dates, d))
    if i >= panel.n_days:
        raise DataError(f"{key} = {date} is after the last date of the data "
                        f"({panel.dates[-1]}); pick a date inside the data")
    return i
