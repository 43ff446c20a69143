"""backfill: calibrated scenarios of implied-volatility surfaces."""

__version__ = "0.1.0"
