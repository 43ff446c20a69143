"""A fitted sampler in a file (``backfill fit --out sampler.pt``; ``run`` / ``mc --sampler``).

Fitting the calibrated sampler (five cross-fitted CVAEs, their residual bank) takes minutes;
a saved one lets ``run``, ``mc`` and ``--resume`` start from the same fit in seconds, and
gives the same bytes as a fresh fit on the same kind of machine (the fit is deterministic,
and the file keeps every array bit for bit).

The file is a ``torch.save`` of plain data only (dicts, lists, strings, numbers, tensors),
read back with ``weights_only=True``: loading never unpickles an object. Each object of the
sampler becomes a tagged dict: an array its tensor, a CVAE its config, sizes and weights, a
FAISS index its keys (rebuilt on load), a config its fields, and any other object the name
of its class and its attributes. On load a class is found only in ``ALLOWED`` (the samplers
and the parts they hold) and ``CONFIGS``; any other name is refused, as are attribute names
that would shadow a method, and a file whose top object is not a sampler. The meta holds a
SHA-256 digest of the meta and of every value and tensor byte of the state, checked before
anything is built (torch's reader does not check the archive's CRCs).

Not kept (none of today's samplers relies on them): a list or dict held in two places comes
back as two equal copies, and a read-only array comes back writable.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

import engine
from engine import config as config_module
from engine.config import Config
from engine.errors import CheckpointError, ConfigError, first_line
from engine.model import check_torch, safe_load
from engine.samplers import REGISTRY

FORMAT = "backfill-sampler"
VERSION = 1

# "module:qualname" of every class a fitted sampler may hold besides arrays, CVAEs, FAISS
# indexes and configs (tests/contract.py saves every sampler, so a new attribute of another
# class fails there first).
_METHODS = {f"{module}:{cls}": name for name, (module, cls) in REGISTRY.items()}
SAMPLERS = frozenset(_METHODS)
ALLOWED = SAMPLERS | {
    "engine.samplers.bank:ResidualBank",
    "engine.samplers.bank:KeySpace",
    "engine.data.synthetic:SyntheticMarket",  # the oracle's: the market's hidden state
    "engine.data.synthetic:MarketParams",
}
CONFIGS = frozenset({"Config", "DataConfig", "SyntheticConfig", "ModelConfig", "TrainConfig",
                     "SamplerConfig", "TreeConfig", "EngineConfig", "StoreConfig",
                     "EvalConfig"})
# a CVAE's attributes besides its modules, config and weights
_CVAE_ATTRS = ("grid_shape", "context", "horizon", "train_end")
_SCALAR_KINDS = "biuf"  # numpy scalars kept as Python numbers (itemsize <= 8)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def method_of(sampler) -> str | None:
    """The registry name of a sampler's class (None: not a sampler)."""
    return _METHODS.get(_class_name(type(sampler)))


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
            return _scalar(x, where)
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
            if cls.__module__ != config_module.__name__ or cls.__qualname__ not in CONFIGS:
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
            extra = {k for k in vars(x) if not k.startswith("_")} - {"training", "cfg",
                                                                      *_CVAE_ATTRS}
            if extra:
                raise TypeError(f"{where}: the CVAE's attributes {sorted(extra)} are not kept "
                                "(engine.sampler_file._CVAE_ATTRS)")
            return {"kind": "cvae", "cfg": json.dumps(x.cfg.model_dump(mode="json")),
                    "attrs": json.dumps({k: getattr(x, k) for k in _CVAE_ATTRS}),
                    "training": x.training,
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


def _scalar(x: np.generic, where: str) -> dict:
    if x.dtype.kind in "mM":  # datetime64 / timedelta64: int64 ticks and the unit
        return {"kind": "time", "dtype": x.dtype.str, "ticks": int(np.array(x).view(np.int64))}
    if x.dtype.kind in _SCALAR_KINDS and x.dtype.itemsize <= 8:
        return {"kind": "scalar", "dtype": x.dtype.str, "value": x.item()}
    raise TypeError(f"{where}: a {x.dtype} scalar cannot be saved")


def _array(x: np.ndarray, where: str) -> dict:
    dtype = x.dtype
    if dtype.kind in "fiubc" and dtype.isnative:
        return {"kind": "ndarray", "data": torch.from_numpy(np.array(x, copy=True))}
    if dtype.kind in "mM":  # datetime64 / timedelta64: their int64 ticks and the unit
        return {"kind": "datetime", "dtype": dtype.str,
                "data": torch.from_numpy(np.array(x, copy=True).view(np.int64))}
    if dtype.kind == "U":
        return {"kind": "strings", "dtype": dtype.str, "shape": list(x.shape),
                "items": x.ravel().tolist()}
    raise TypeError(f"{where}: an array of {dtype} cannot be saved")


def _dtype(text: str, kinds: str) -> np.dtype:
    dtype = np.dtype(text)
    if dtype.kind not in kinds or dtype.itemsize > 8 and dtype.kind != "U":
        raise ValueError(f"dtype {text!r} is not one a sampler file holds")
    return dtype


def _from_array(x: dict) -> np.ndarray:
    kind = x["kind"]
    if kind == "ndarray":
        if not isinstance(x["data"], torch.Tensor):
            raise TypeError("an array without its tensor")
        return x["data"].numpy()
    if kind == "datetime":
        return x["data"].numpy().view(_dtype(x["dtype"], "mM"))
    if kind == "strings":
        return np.array(x["items"], dtype=_dtype(x["dtype"], "U")).reshape(x["shape"])
    raise ValueError(f"{kind!r} is not an array")


def _attribute_name(cls: type, name) -> str:
    """An attribute a file may set on an instance of ``cls``: a plain identifier that is
    neither private to Python nor a method or property of the class."""
    if not (isinstance(name, str) and name.isidentifier()) or name.startswith("__") or \
            callable(inspect.getattr_static(cls, name, None)) or \
            isinstance(inspect.getattr_static(cls, name, None), property):
        raise ValueError(f"{cls.__qualname__} has no attribute a file may set named {name!r}")
    return name


class _Decoder:
    def __init__(self, device: str) -> None:
        self.device = device
        self.made: dict[int, object] = {}

    def __call__(self, x):
        if x is None or type(x) in (bool, int, float, str):
            return x
        if type(x) is not dict:
            raise TypeError(f"unexpected {type(x).__name__}")
        kind = x["kind"]
        if kind == "scalar":
            return _dtype(x["dtype"], _SCALAR_KINDS).type(x["value"])
        if kind == "time":
            return np.array(int(x["ticks"])).view(_dtype(x["dtype"], "mM"))[()]
        if kind in ("list", "tuple", "set", "frozenset"):
            items = [self(v) for v in x["items"]]
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](items)
        if kind == "dict":
            return {self(k): self(v) for k, v in x["items"]}
        if kind == "config":
            if x["class"] not in CONFIGS:
                raise ValueError(f"unknown config class {x['class']!r}")
            cls = getattr(config_module, x["class"])
            return cls.model_validate(json.loads(x["fields"]))
        if kind == "ref":
            return self.made[x["id"]]
        return self._object(x)

    def _object(self, x: dict):
        from engine.config import ModelConfig
        from engine.knn import KnnIndex
        from engine.model import CVAE, checked_train_end

        kind, n = x["kind"], x["id"]
        if kind in ("ndarray", "datetime", "strings"):
            out = _from_array(x)
        elif kind == "tensor":
            out = x["data"]
            if not isinstance(out, torch.Tensor):
                raise TypeError("a tensor that is not one")
        elif kind == "knn-index":
            out = KnnIndex(_from_array(x["keys"]))
        elif kind == "cvae":
            attrs = json.loads(x["attrs"])
            grid_shape = tuple(int(v) for v in attrs["grid_shape"])
            if len(grid_shape) != 2 or set(attrs) != set(_CVAE_ATTRS):
                raise ValueError(f"a CVAE's sizes {sorted(attrs)} are not {list(_CVAE_ATTRS)}")
            out = CVAE(ModelConfig.model_validate(json.loads(x["cfg"])), grid_shape,
                       int(attrs["context"]), int(attrs["horizon"]))
            out.load_state_dict(x["state"])  # strict: every weight, each of its shape
            out.train_end = checked_train_end(attrs["train_end"])
            out.train(bool(x["training"]))
            out.to(self.device)
        elif kind == "object":
            name = x["class"]
            if name not in ALLOWED:
                raise ValueError(f"class {name!r} is not one a sampler holds")
            module, qualname = name.split(":")
            cls = getattr(__import__(module, fromlist=[qualname]), qualname)
            out = cls.__new__(cls)
            self.made[n] = out  # before its attributes: they may refer back to it
            attrs = self(x["attrs"])
            if type(attrs) is not dict:
                raise TypeError(f"{qualname}'s attributes are not a dict")
            for key, value in attrs.items():
                out.__dict__[_attribute_name(cls, key)] = value
        else:
            raise ValueError(f"unknown kind {kind!r}")
        self.made[n] = out
        return out


def save_sampler(sampler, path: str | Path, *, config: Config, history_fingerprint: str,
                 start_date: str, fit_days: int, grid: dict) -> Path:
    """Write a fitted sampler with what it was fitted on: the config, the fingerprint of
    the history it saw (the ``fit_days`` days up to ``start_date``), the grid, where its
    models computed and a digest of it all. Written to a temporary name (fsync'd) and
    renamed, so a failed save leaves no half file; the same fit gives the same bytes."""
    from engine.model import module_devices

    path = Path(path)
    method = method_of(sampler)
    if method is None:
        raise TypeError(f"a {_class_name(type(sampler))} is not a sampler")
    try:
        state = _Encoder()(sampler)
    except (TypeError, ValueError, RecursionError) as err:
        raise ConfigError(f"the {type(sampler).__name__} cannot be saved to a file "
                          f"({first_line(err)}); run without a sampler file") from None
    meta = {"format": FORMAT, "version": VERSION, "backfill": engine.__version__,
            "method": method, "config": config.to_dict(),
            "history_fingerprint": history_fingerprint, "start_date": start_date,
            "fit_days": int(fit_days), "grid": grid,
            "devices": sorted(module_devices(sampler))}
    meta["digest"] = digest(meta, state)
    buffer = io.BytesIO()  # in memory: the archive's inner names do not depend on the path
    torch.save({"meta": json.dumps(meta), "state": state}, buffer)
    target = Path(os.path.realpath(path))  # a link is written through
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as f:  # the umask's permissions, as any file the user writes
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
    return path


def digest(meta: dict, state) -> str:
    """SHA-256 of a file's meta (but its digest) and of every value and tensor byte of its
    state, in order: a file damaged on disk or in transit reads back with another."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "digest"},
                                  sort_keys=True).encode())

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            a = x.detach().cpu().contiguous().numpy()
            h.update(f"T{a.dtype.str}{a.shape}".encode())
            h.update(a.reshape(-1).view(np.uint8))
        elif type(x) is dict:
            h.update(f"D{len(x)}".encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif type(x) in (list, tuple):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{type(x).__name__}:{x!r};".encode())

    walk(state)
    return h.hexdigest()


_META = {"backfill": str, "method": str, "config": dict, "history_fingerprint": str,
         "start_date": str, "fit_days": int, "grid": dict, "devices": list, "digest": str}


def read_meta(path: str | Path) -> tuple[dict, dict]:
    """(meta, encoded state) of a sampler file; CheckpointError if it is not one this
    version reads."""
    from engine.store import parse_start_date

    path = Path(path)
    fix = "fit one with `backfill fit --out sampler.pt`"
    if not path.is_file():
        found = "not found" if not path.exists() else "is not a regular file"
        raise CheckpointError(f"sampler file {path} {found}; {fix}")
    check_torch()
    blob = None
    try:
        blob = safe_load(path)
        if not isinstance(blob, dict):  # a bare tensor: indexing it by name warns
            raise TypeError(f"a {type(blob).__name__}")
        meta = json.loads(blob["meta"])
        state = blob["state"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError("no sampler format mark")
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure means "not our file"
        if _is_checkpoint(blob):
            raise CheckpointError(f"{path} is a model checkpoint, not a sampler file; pass it "
                                  f"to --model, or {fix}") from None
        raise CheckpointError(f"{path} is not a backfill sampler file "
                              f"({type(err).__name__}); {fix}") from None
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has sampler file version {meta.get('version')}, this "
                              f"backfill reads version {VERSION}; {fix}")
    bad = [k for k, t in _META.items() if type(meta.get(k)) is not t]
    if not bad and meta["method"] not in REGISTRY:
        bad = ["method"]
    if not bad:
        try:
            parse_start_date(meta["start_date"])
        except Exception:  # noqa: BLE001 - any failure: not a date this file could hold
            bad = ["start_date"]
    if bad:
        raise CheckpointError(f"{path} is a damaged sampler file (its {bad[0]} is missing or "
                              f"wrong); fit it again with `backfill fit`")
    try:
        same = digest(meta, state) == meta["digest"]
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - a value no file of ours holds
        same = False
    if not same:
        raise CheckpointError(f"{path} is damaged (its contents do not match the digest "
                              "written with them); copy it again, or fit it again with "
                              "`backfill fit`")
    if meta["backfill"] != engine.__version__:
        raise CheckpointError(f"{path} was fitted by backfill {meta['backfill']}, this is "
                              f"{engine.__version__}, whose fit may differ; fit it again with "
                              "`backfill fit`")
    return meta, state


def _is_checkpoint(blob) -> bool:
    return isinstance(blob, dict) and "state_dict" in blob and "meta" in blob


def check_replaceable(path: Path, flag: str = "--out", kind: str = "sampler") -> None:
    """Refuse to write a sampler file (``kind="sampler"``, fit) or a model checkpoint
    (``kind="checkpoint"``, train) over an existing file that is not one of its kind (data,
    a config, the other kind, anything else): only an earlier output is replaced."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    check_torch()
    try:
        blob = safe_load(path)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - unreadable by torch: neither kind
        blob = None
    if is_sampler_file(blob) if kind == "sampler" else _is_checkpoint(blob):
        return
    what = ("a model checkpoint" if _is_checkpoint(blob) else "a sampler file"
            if is_sampler_file(blob) else f"not a backfill {kind} file")
    command = "fit" if kind == "sampler" else "train"
    raise ConfigError(f"{flag} {path} exists and is {what}, which {command} would overwrite; "
                      "pass another path, or delete the file first")


def is_sampler_file(blob) -> bool:
    """Is a blob ``safe_load`` read a sampler file (a hint for ``--model``)?"""
    try:
        return isinstance(blob, dict) and json.loads(blob["meta"]).get("format") == FORMAT
    except Exception:  # noqa: BLE001
        return False


def decode(state: dict, path: str | Path, device: str = "cpu"):
    """The sampler of a file's state (``read_meta``), its CVAEs on ``device``."""
    try:
        out = _Decoder(device)(state)
        if method_of(out) is None:
            raise TypeError(f"it holds a {type(out).__name__}, not a sampler")
        if not out.is_fitted():
            raise ValueError("its sampler is not fitted")
        return out
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes fail
        raise CheckpointError(f"{path} is a damaged or outdated sampler file "
                              f"({type(err).__name__}: {first_line(err)}); fit it again with "
                              "`backfill fit`") from None


def load_sampler(path: str | Path, device: str = "cpu") -> tuple[object, dict]:
    """The fitted sampler of a file (its CVAEs on ``device``) and its meta."""
    meta, state = read_meta(path)
    return decode(state, path, device), meta
