"""A fitted sampler in a file (``backfill fit --out sampler.pt``; ``run`` / ``mc --sampler``).

Fitting the calibrated sampler (five cross-fitted CVAEs, their residual bank) takes minutes;
a saved one lets ``run``, ``mc`` and ``--resume`` start from the same fit in seconds, and
gives the same bytes as a fresh fit (the fit is deterministic, and the file keeps every
array bit for bit).

The file is a ``torch.save`` of plain data only (dicts, lists, strings, numbers, tensors),
read back with ``weights_only=True``: loading never unpickles an object. Each object of the
sampler becomes a tagged dict: an array its tensor, a CVAE its config and weights, a FAISS
index its keys (rebuilt on load), a pydantic config its fields, and any other object the
name of its class and its attributes. On load a class is found only in ``ALLOWED`` (the
samplers and the parts they hold); any other name is refused.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from engine.config import Config
from engine.errors import CheckpointError, ConfigError, first_line
from engine.samplers import REGISTRY

FORMAT = "backfill-sampler"
VERSION = 1

# "module:qualname" of every class a fitted sampler may hold besides arrays, CVAEs, FAISS
# indexes and pydantic configs (tests/contract.py saves every sampler, so a new attribute of
# another class fails there first).
ALLOWED = frozenset({
    "engine.samplers.cvae_prior:CvaePriorSampler",
    "engine.samplers.cvae_scaled:CvaeScaledSampler",
    "engine.samplers.knn:KnnResidualSampler",
    "engine.samplers.knn_conformal:KnnConformalSampler",
    "engine.samplers.hist_bootstrap:HistBootstrapSampler",
    "engine.samplers.fhs:FilteredHistoricalSampler",
    "engine.samplers.pca_ar:PcaArSampler",
    "engine.samplers.oracle:OracleSampler",
    "engine.samplers.bank:ResidualBank",
    "engine.samplers.bank:KeySpace",
    "engine.data.synthetic:SyntheticMarket",  # the oracle's: the market's hidden state
    "engine.data.synthetic:MarketParams",
})
_CONFIG_MODULE = "engine.config"


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class _Encoder:
    """Objects to plain data; an object met twice (one CVAE held by the bank and the keys)
    is written once and referred to after (so it is one object again once loaded)."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self.keep: list = []  # the encoded objects stay alive, so their ids stay unique

    def __call__(self, x, where: str = "sampler"):
        if x is None or type(x) in (bool, int, float, str):  # not np.float64, a float too
            return x
        if isinstance(x, np.generic):
            return {"kind": "scalar", "dtype": x.dtype.str, "value": x.item()}
        if isinstance(x, (list, tuple, set, frozenset)):
            kind = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}.get(type(x))
            if kind is None:
                raise TypeError(f"{where}: a {type(x).__name__} cannot be saved")
            items = sorted(x, key=repr) if kind in ("set", "frozenset") else x
            return {"kind": kind, "items": [self(v, f"{where}[{i}]")
                                            for i, v in enumerate(items)]}
        if type(x) is dict:
            return {"kind": "dict", "items": [[self(k, f"{where} key"), self(v, f"{where}[{k!r}]")]
                                              for k, v in x.items()]}
        if isinstance(x, BaseModel):
            cls = type(x)
            if cls.__module__ != _CONFIG_MODULE:
                raise TypeError(f"{where}: config class {_class_name(cls)} cannot be saved")
            return {"kind": "config", "class": cls.__qualname__,
                    "fields": json.dumps(x.model_dump(mode="json"))}
        seen = self.ids.get(id(x))
        if seen is not None:
            return {"kind": "ref", "id": seen}
        self.ids[id(x)] = n = len(self.ids)
        self.keep.append(x)
        out = self._object(x, where)
        out["id"] = n
        return out

    def _object(self, x, where: str) -> dict:
        from engine.knn import KnnIndex
        from engine.model import CVAE

        if isinstance(x, np.ndarray):
            return _array(x, where)
        if isinstance(x, torch.Tensor):
            return {"kind": "tensor", "data": x.detach().cpu().clone()}
        if isinstance(x, CVAE):
            extra = {k: v for k, v in vars(x).items()
                     if not k.startswith("_") and k not in ("training", "cfg")}
            return {"kind": "cvae", "cfg": json.dumps(x.cfg.model_dump(mode="json")),
                    "attrs": self(extra, f"{where} (CVAE)"), "training": x.training,
                    "state": {k: v.detach().cpu().clone() for k, v in x.state_dict().items()}}
        if isinstance(x, KnnIndex):  # the FAISS index is rebuilt from its keys on load
            return {"kind": "knn-index", "keys": _array(x.keys, f"{where}.keys")}
        cls = type(x)
        name = _class_name(cls)
        if name not in ALLOWED:
            raise TypeError(f"{where}: a {name} cannot be saved (not in "
                            "engine.sampler_file.ALLOWED)")
        return {"kind": "object", "class": name,
                "attrs": self(dict(vars(x)), where)}


def _array(x: np.ndarray, where: str) -> dict:
    dtype = x.dtype
    if dtype.kind in "fiub" and dtype.itemsize <= 8 and dtype.byteorder in "=|" \
            or dtype.kind == "c":
        return {"kind": "ndarray", "data": torch.from_numpy(np.array(x, copy=True))}
    if dtype.kind in "mM":  # datetime64 / timedelta64: their int64 ticks and the unit
        return {"kind": "datetime", "dtype": dtype.str,
                "data": torch.from_numpy(np.ascontiguousarray(x).view(np.int64).copy())}
    if dtype.kind == "U":
        return {"kind": "strings", "dtype": dtype.str, "shape": list(x.shape),
                "items": x.ravel().tolist()}
    raise TypeError(f"{where}: an array of {dtype} cannot be saved")


def _from_array(x: dict) -> np.ndarray:
    kind = x["kind"]
    if kind == "ndarray":
        return x["data"].numpy()
    if kind == "datetime":
        return x["data"].numpy().view(np.dtype(x["dtype"]))
    if kind == "strings":
        return np.array(x["items"], dtype=np.dtype(x["dtype"])).reshape(x["shape"])
    raise ValueError(f"{kind!r} is not an array")


class _Decoder:
    def __init__(self, device: str) -> None:
        self.device = device
        self.made: dict[int, object] = {}

    def __call__(self, x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if not isinstance(x, dict):
            raise TypeError(f"unexpected {type(x).__name__}")
        kind = x["kind"]
        if kind == "scalar":
            return np.dtype(x["dtype"]).type(x["value"])
        if kind in ("list", "tuple", "set", "frozenset"):
            items = [self(v) for v in x["items"]]
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](items)
        if kind == "dict":
            return {self(k): self(v) for k, v in x["items"]}
        if kind == "config":
            cls = getattr(importlib.import_module(_CONFIG_MODULE), x["class"], None)
            if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
                raise ValueError(f"unknown config class {x['class']!r}")
            return cls.model_validate(json.loads(x["fields"]))
        if kind == "ref":
            return self.made[x["id"]]
        return self._object(x)

    def _object(self, x: dict):
        from engine.config import ModelConfig
        from engine.knn import KnnIndex
        from engine.model import CVAE

        kind, n = x["kind"], x["id"]
        if kind in ("ndarray", "datetime", "strings"):
            out = _from_array(x)
        elif kind == "tensor":
            out = x["data"]
        elif kind == "knn-index":
            out = KnnIndex(_from_array(x["keys"]))
        elif kind == "cvae":
            attrs = self(x["attrs"])
            out = CVAE(ModelConfig.model_validate(json.loads(x["cfg"])), attrs["grid_shape"],
                       attrs["context"], attrs["horizon"])
            out.load_state_dict(x["state"])
            for k, v in attrs.items():
                setattr(out, k, v)
            out.train(x["training"])
            out.to(self.device)
        elif kind == "object":
            name = x["class"]
            if name not in ALLOWED:
                raise ValueError(f"class {name!r} is not one a sampler holds")
            module, qualname = name.split(":")
            cls = getattr(importlib.import_module(module), qualname)
            out = cls.__new__(cls)
            self.made[n] = out  # before its attributes: they may refer back to it
            out.__dict__.update(self(x["attrs"]))
        else:
            raise ValueError(f"unknown kind {kind!r}")
        self.made[n] = out
        return out


def save_sampler(sampler, path: str | Path, *, config: Config, history_fingerprint: str,
                 start_date: str, fit_days: int, grid: dict) -> Path:
    """Write a fitted sampler with what it was fitted on: the config, the fingerprint of
    the history it saw (the ``fit_days`` days up to ``start_date``) and the grid.
    Written to a temporary name and renamed, so a failed save leaves no half file."""
    path = Path(path)
    try:
        state = _Encoder()(sampler)
    except TypeError as err:
        raise ConfigError(f"the {type(sampler).__name__} cannot be saved to a file ({err}); "
                          "run without a sampler file") from None
    method = next((k for k, (m, c) in REGISTRY.items()
                   if (m, c) == (type(sampler).__module__, type(sampler).__name__)), None)
    meta = {"format": FORMAT, "version": VERSION, "method": method,
            "config": config.to_dict(), "history_fingerprint": history_fingerprint,
            "start_date": start_date,
            "fit_days": int(fit_days), "grid": grid}
    part = path.with_name(f".{path.name}.part")
    try:
        torch.save({"meta": json.dumps(meta), "state": state}, part)
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)
    return path


def read_meta(path: str | Path) -> tuple[dict, dict]:
    """(meta, encoded state) of a sampler file; CheckpointError if it is not one this
    version reads."""
    path = Path(path)
    fix = "fit one with `backfill fit --out sampler.pt`"
    if not path.is_file():
        found = "not found" if not path.exists() else "is not a regular file"
        raise CheckpointError(f"sampler file {path} {found}; {fix}")
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign file: the error says it
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        state = blob["state"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError("no sampler format mark")
    except Exception as err:  # noqa: BLE001 - any failure means "not our file"
        hint = " (a model checkpoint? pass it to --model)" if _is_checkpoint(path) else ""
        raise CheckpointError(f"{path} is not a backfill sampler file{hint} "
                              f"({type(err).__name__}); {fix}") from None
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has sampler file version {meta.get('version')}, this "
                              f"backfill reads version {VERSION}; {fix}")
    return meta, state


def _is_checkpoint(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
        return isinstance(blob, dict) and "state_dict" in blob and "meta" in blob
    except Exception:  # noqa: BLE001
        return False


def decode(state: dict, path: str | Path, device: str = "cpu"):
    """The sampler of a file's state (``read_meta``), its CVAEs on ``device``."""
    try:
        return _Decoder(device)(state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError,
            ImportError) as err:
        raise CheckpointError(f"{path} is a damaged or outdated sampler file "
                              f"({first_line(err)}); fit it again with `backfill fit`") from None


def load_sampler(path: str | Path, device: str = "cpu") -> tuple[object, dict]:
    """The fitted sampler of a file (its CVAEs on ``device``) and its meta."""
    meta, state = read_meta(path)
    return decode(state, path, device), meta
