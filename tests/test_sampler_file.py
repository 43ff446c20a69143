"""The fitted-sampler file (`backfill fit`): plain data in, and nothing but the samplers'
own classes out. (Every sampler's round trip is in tests/contract.py.)"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from engine import sampler_file
from engine.errors import CheckpointError, ConfigError
from engine.samplers import make_sampler
from tests.conftest import tiny_config, toy_panel

CANARY: list = []


class Canary:
    """A class a crafted file names: building it would leave a mark."""

    def __new__(cls, *args, **kwargs):
        CANARY.append("built")
        return super().__new__(cls)

    def __reduce__(self):
        return (CANARY.append, ("unpickled",))


def _file(path, state, **meta) -> None:
    """A file of ``state`` whose meta passes (or with ``meta``'s keys changed)."""
    import engine

    head = {"format": sampler_file.FORMAT, "version": sampler_file.VERSION,
            "backfill": engine.__version__, "method": "hist-bootstrap",
            "config": tiny_config().to_dict(), "history_fingerprint": "x",
            "start_date": "2001-01-02", "fit_days": 10, "grid": {}, "devices": ["cpu"], **meta}
    head = {k: v for k, v in head.items() if v is not None}
    head.setdefault("digest", sampler_file.digest(head, state))
    torch.save({"meta": json.dumps(head), "state": state}, path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    config, panel = tiny_config(), toy_panel()
    sampler = make_sampler("hist-bootstrap", config).fit(panel, None)
    path = tmp_path_factory.mktemp("file") / "s.pt"
    sampler_file.save_sampler(sampler, path, config=config,
                              history_fingerprint=panel.fingerprint,
                              start_date=str(panel.dates[-1]), fit_days=panel.n_days,
                              grid=panel.grid_dict())
    return sampler, path, config, panel


def test_meta_says_what_the_sampler_was_fitted_on(saved):
    _, path, config, panel = saved
    meta, _ = sampler_file.read_meta(path)
    assert meta["method"] == "hist-bootstrap" and meta["fit_days"] == panel.n_days
    assert meta["history_fingerprint"] == panel.fingerprint
    assert meta["config"] == config.to_dict() and meta["devices"] == ["cpu"]
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no .part left


def test_the_same_fit_gives_the_same_bytes_wherever_it_is_written(saved, tmp_path):
    """Through a link, into a folder it makes, with the umask's permissions."""
    import os

    sampler, path, config, panel = saved

    def save(to):
        return sampler_file.save_sampler(sampler, to, config=config,
                                         history_fingerprint=panel.fingerprint,
                                         start_date=str(panel.dates[-1]),
                                         fit_days=panel.n_days, grid=panel.grid_dict())

    old = os.umask(0o022)
    try:
        other = save(tmp_path / "new" / "folder" / "other.pt")
    finally:
        os.umask(old)
    assert other.read_bytes() == path.read_bytes()
    assert other.stat().st_mode & 0o777 == 0o644
    (tmp_path / "link.pt").symlink_to(other)
    save(tmp_path / "link.pt")
    assert (tmp_path / "link.pt").is_symlink() and other.read_bytes() == path.read_bytes()


def test_a_file_damaged_after_it_was_written_is_refused(saved, tmp_path):
    """One flipped byte in a tensor (which torch's reader does not check) changes the
    digest."""
    _, path, _, _ = saved
    meta, state = sampler_file.read_meta(path)
    flipped = tmp_path / "flipped.pt"
    ours = next(v for v in state["attrs"]["items"] if isinstance(v[1], dict)
                and v[1].get("kind") == "ndarray")[1]["data"]
    ours.view(torch.uint8).reshape(-1)[0] ^= 1
    torch.save({"meta": json.dumps(meta), "state": state}, flipped)
    with pytest.raises(CheckpointError, match="is damaged"):
        sampler_file.load_sampler(flipped)


def test_a_class_outside_the_allowed_list_is_never_built(tmp_path):
    planted = Canary(), Canary()  # written into the files below
    CANARY.clear()
    crafted = tmp_path / "crafted.pt"
    _file(crafted, {"kind": "object", "class": f"{__name__}:Canary", "attrs":
                    {"kind": "dict", "items": []}, "id": 0})
    with pytest.raises(CheckpointError, match="damaged or outdated sampler file"):
        sampler_file.load_sampler(crafted)
    _file(crafted, {"kind": "config", "class": "_Section", "fields": "{}"})
    with pytest.raises(CheckpointError, match="unknown config class '_Section'"):
        sampler_file.load_sampler(crafted)
    _file(crafted, {"kind": "object", "class": "os:system", "attrs": "echo hi", "id": 0})
    with pytest.raises(CheckpointError, match="not one a sampler holds"):
        sampler_file.load_sampler(crafted)
    # a pickled object inside the file: torch's weights_only reader refuses it unread
    torch.save({"meta": json.dumps({"format": sampler_file.FORMAT, "version": 1}),
                "state": planted[0]}, crafted)
    with pytest.raises(CheckpointError, match="is not a backfill sampler file"):
        sampler_file.load_sampler(crafted)
    # and so is a plain pickle
    crafted.write_bytes(pickle.dumps({"meta": planted[1]}))
    with pytest.raises(CheckpointError, match="is not a backfill sampler file"):
        sampler_file.load_sampler(crafted)
    assert CANARY == []


def test_a_file_cannot_shadow_methods_or_pass_off_another_object(saved, tmp_path):
    _, path, _, _ = saved
    _, state = sampler_file.read_meta(path)
    odd = tmp_path / "odd.pt"
    # an attribute named like a method of the sampler, or one private to Python
    for name in ("sample", "__class__", "not an identifier"):
        bad = {**state, "attrs": {"kind": "dict", "items": [*state["attrs"]["items"],
                                                             [name, 1]]}}
        _file(odd, bad)
        with pytest.raises(CheckpointError, match="no attribute a file may set"):
            sampler_file.load_sampler(odd)
    # a part of a sampler (or a plain dict) as the top object
    _file(odd, {"kind": "dict", "items": []})
    with pytest.raises(CheckpointError, match="holds a dict, not a sampler"):
        sampler_file.load_sampler(odd)
    # numbers out of their type's range, dtypes no sampler holds: a line, not a traceback
    for value in ({"kind": "scalar", "dtype": "|i1", "value": 1000},
                  {"kind": "scalar", "dtype": "|O", "value": 1},
                  {"kind": "strings", "dtype": "|O", "shape": [1], "items": [1], "id": 0}):
        _file(odd, value)
        with pytest.raises(CheckpointError, match="damaged or outdated sampler file"):
            sampler_file.load_sampler(odd)


def test_a_cvae_gets_back_its_sizes_and_weights_only(tmp_path):
    from engine.model import CVAE

    cfg = tiny_config()
    model = CVAE(cfg.model, (2, 3), 12, 6)
    model.train_end = "2001-05-31"
    enc = sampler_file._Encoder()(model)
    back = sampler_file._Decoder("cpu")(enc)
    assert back.train_end == "2001-05-31" and back.grid_shape == (2, 3)
    assert back.training == model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    attrs = json.loads(enc["attrs"])
    for bad in ({**attrs, "_forward_hooks": {}}, {**attrs, "train_end": "May 31"}):
        with pytest.raises(ValueError):
            sampler_file._Decoder("cpu")({**enc, "attrs": json.dumps(bad)})
    model.extra = 1  # an attribute the file would not keep: refused when saving
    with pytest.raises(TypeError, match="extra"):
        sampler_file._Encoder()(model)


def test_meta_must_be_whole_and_of_this_backfill(tmp_path):
    state = {"kind": "dict", "items": []}
    for change, words in (({"start_date": None}, "its start_date is missing"),
                          ({"start_date": "31/05/2001"}, "its start_date is missing or wrong"),
                          ({"fit_days": "10"}, "its fit_days"),
                          ({"method": "magic"}, "its method"),
                          ({"backfill": "0.0.1"}, "fitted by backfill 0.0.1")):
        _file(tmp_path / "m.pt", state, **change)
        with pytest.raises(CheckpointError, match=words):
            sampler_file.read_meta(tmp_path / "m.pt")


def test_torch_before_2_6_is_not_trusted_with_files(saved, monkeypatch):
    from engine.model import check_torch

    check_torch("2.13.0+cpu")
    with pytest.raises(CheckpointError, match="CVE-2025-32434"):
        check_torch("2.5.1")
    monkeypatch.setattr(torch, "__version__", "2.4.0")
    with pytest.raises(CheckpointError, match="install torch 2.6 or later"):
        sampler_file.load_sampler(saved[1])


def test_damaged_foreign_and_outdated_files_are_refused(saved, tmp_path):
    _, path, _, _ = saved
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is not a backfill sampler file"):
        sampler_file.load_sampler(cut)
    old = tmp_path / "old.pt"
    _, state = sampler_file.read_meta(path)
    _file(old, state, version=0)
    with pytest.raises(CheckpointError, match="version 0, this backfill reads version 1"):
        sampler_file.load_sampler(old)
    odd = tmp_path / "odd.pt"
    _file(odd, {"kind": "teleporter", "id": 0})
    with pytest.raises(CheckpointError, match="unknown kind 'teleporter'"):
        sampler_file.load_sampler(odd)
    with pytest.raises(CheckpointError, match="not found"):
        sampler_file.load_sampler(tmp_path / "none.pt")
    # a bare tensor: refused by the error alone, without torch's warnings beside it
    import warnings

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="not a backfill sampler file"):
            sampler_file.load_sampler(tmp_path / "tensor.pt")
    assert not caught, [str(w.message) for w in caught]


def test_what_it_cannot_write_it_refuses_without_leaving_a_file(saved, tmp_path):
    sampler, _, config, _ = saved
    odd = pickle.loads(pickle.dumps(sampler))
    odd.extra_ = object()  # no sampler holds one
    out = tmp_path / "odd.pt"
    with pytest.raises(ConfigError, match="cannot be saved"):
        sampler_file.save_sampler(odd, out, config=config, history_fingerprint="x",
                                  start_date="2001-01-01", fit_days=1, grid={})
    assert list(tmp_path.iterdir()) == []


def test_values_keep_their_types_and_shared_objects_stay_shared():
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)[:, ::2]  # not contiguous
    dates = np.array(["2001-01-02", "2001-01-03"], dtype="datetime64[D]")
    value = {"a": (1, 2.5, "x", None, True), 3: [arr, arr], "d": dates,
             "s": np.float32(0.1), "u": np.array(["ab", "c"]), "set": {2, 1},
             "view": np.broadcast_to(np.float64(2.0), (3, 2)),
             "t": np.datetime64("2001-01-02T03:04:05.123456789", "ns"),
             "dt": np.timedelta64(3, "D"), "t0": np.array(np.datetime64("2001-01-02", "s"))}
    enc = sampler_file._Encoder()({"v": value})
    back = sampler_file._Decoder("cpu")(enc)["v"]
    assert back["a"] == (1, 2.5, "x", None, True) and back["set"] == {1, 2}
    assert back[3][0] is back[3][1] and back[3][0].dtype == np.int32
    np.testing.assert_array_equal(back[3][0], arr)
    assert back["d"].dtype == dates.dtype and (back["d"] == dates).all()
    assert type(back["s"]) is np.float32 and back["s"] == np.float32(0.1)
    assert back["u"].tolist() == ["ab", "c"] and back["view"].shape == (3, 2)
    for key in ("t", "dt", "t0"):
        assert back[key].dtype == value[key].dtype and back[key] == value[key], key
    assert back["t0"].shape == ()


def test_only_the_keys_a_fit_reads_must_agree():
    from engine.driver import fit_differences

    base = tiny_config()
    assert fit_differences(base, tiny_config(**{"data.synthetic.test_days": 99,
                                                "data.synthetic.n_days": 500,
                                                "data.source": "other.csv",
                                                "tree.depth": 9, "engine.threads": 2})) == []
    assert fit_differences(base, tiny_config(**{"sampler.k": 7, "seed": 4})) == \
        [("seed", 0, 4), ("sampler.k", 0, 7)]
