"""The Ray backend: the same bytes as inline for any actor count and batch size, and one shared
copy of the sampler (residual bank, index, model) read zero-copy by every actor.

One module-scoped local Ray (2 CPUs, no dashboard, bound to 127.0.0.1) serves every test; the
driver sees Ray is up and neither starts nor stops it.
"""

from __future__ import annotations

import os

# Ray reads this when it is imported: bind the local cluster to the loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

ray = pytest.importorskip("ray")

from engine import driver
from engine.config import EngineConfig
from tests.test_driver import (
    assert_same_bytes,
    crashed_run,
    fitted_sampler,
    make_run,
    run_config,
)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if ray.is_initialized():  # another module's Ray: use it as it is
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inline_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("inline") / "run.zarr"
    make_run(path, run_config())
    return path


@pytest.mark.parametrize("n_decoders, n_knn, batch", [(1, 1, 7), (2, 2, 256)])
def test_ray_backend_gives_the_inline_bytes(inline_store, tmp_path, n_decoders, n_knn, batch):
    cfg = run_config(**{"engine.backend": "ray", "engine.n_decoders": n_decoders,
                        "engine.n_knn": n_knn, "engine.batch_size": batch,
                        "engine.max_in_flight": 2})
    make_run(tmp_path / "ray.zarr", cfg)
    assert_same_bytes(inline_store, tmp_path / "ray.zarr")


def test_a_run_begun_inline_resumes_on_ray_with_the_same_fingerprint(inline_store, tmp_path):
    """The sampler's fingerprint (its probe draw, the decoders' device) is the same for
    either backend, thread count or batch size: such a resume goes on, to the same bytes."""
    path = tmp_path / "crash.zarr"
    crashed_run(path, run_config(**{"engine.threads": 2}), after=1)
    stored = driver.ScenarioStore.open(path).run_attr("sampler_fingerprint")
    assert stored.endswith("/cpu")
    make_run(path, run_config(**{"engine.backend": "ray", "engine.batch_size": 3}),
             resume=True)
    assert driver.ScenarioStore.open(path).run_attr("sampler_fingerprint") == stored
    assert_same_bytes(inline_store, path)


def test_a_sampler_from_its_file_resumes_on_ray_to_the_same_bytes(inline_store, tmp_path):
    """`backfill fit`'s file, loaded and shipped to the actors, is the sampler that began the
    run: the resume passes the fingerprint check and ends on the inline bytes."""
    from engine.sampler_file import load_sampler, save_sampler

    panel, fitted = fitted_sampler()
    save_sampler(fitted, tmp_path / "s.pt", config=run_config(),
                 history_fingerprint=panel.fingerprint, start_date=str(panel.dates[-1]),
                 fit_days=panel.n_days, grid=panel.grid_dict())
    loaded, _ = load_sampler(tmp_path / "s.pt")
    path = tmp_path / "crash.zarr"
    crashed_run(path, after=2)
    make_run(path, run_config(**{"engine.backend": "ray", "engine.n_knn": 2}), resume=True,
             sampler=loaded)
    assert_same_bytes(inline_store, path)


def test_actors_share_one_copy_of_the_sampler():
    _, sampler = fitted_sampler()
    pool = driver._RayPool(sampler, EngineConfig(n_decoders=1, n_knn=2))
    try:
        infos = ray.get([a.shared_info.remote() for a in pool.decoders + pool.knn])
        assert len({info["pid"] for info in infos}) == 3  # three actor processes
        # every actor got the very ObjectRef the driver put once...
        assert {info["ref"] for info in infos} == {pool.sampler_ref.hex()}
        # ...and reads the residual bank as a read-only view of shared memory (zero-copy)
        assert all(info["bank_writeable"] is False for info in infos)
        assert all(info["bank_owns_data"] is False for info in infos)
        assert infos[0]["device"] == infos[0]["device_label"] == "cpu"
    finally:
        pool.close()


def test_generic_sampler_runs_on_one_actor(tmp_path):
    cfg = run_config(**{"tree.depth": 2})
    make_run(tmp_path / "inline.zarr", cfg, method="hist-bootstrap")
    ray_cfg = run_config(**{"tree.depth": 2, "engine.backend": "ray", "engine.batch_size": 2,
                            "engine.n_knn": 3})
    make_run(tmp_path / "ray.zarr", ray_cfg, method="hist-bootstrap")
    assert_same_bytes(tmp_path / "inline.zarr", tmp_path / "ray.zarr")


def test_a_killed_actor_is_restarted_and_its_tasks_retried(inline_store, tmp_path, monkeypatch):
    pools = []
    make_executor = driver._executor

    def capture(sampler, engine):
        pools.append(make_executor(sampler, engine))
        return pools[-1]

    monkeypatch.setattr(driver, "_executor", capture)
    killed, restarted = [], []

    def pids():
        pool = pools[0]
        return [ray.get(a.shared_info.remote())["pid"] for a in (pool.knn[0], pool.decoders[0])]

    def kill_once(level, chunk):
        if level == 2 and not killed and pools[0].pending() > 0:  # tasks in flight
            killed.append(pids())
            ray.kill(pools[0].knn[0], no_restart=False)
            ray.kill(pools[0].decoders[0], no_restart=False)
        elif level == 3 and killed and not restarted:  # the same handles, new processes
            restarted.append(pids())

    cfg = run_config(**{"engine.backend": "ray", "engine.batch_size": 2,
                        "engine.max_in_flight": 3})
    make_run(tmp_path / "killed.zarr", cfg, after_chunk=kill_once)
    assert killed and restarted, "the kill must land while tasks are in flight"
    assert all(new != old for new, old in zip(restarted[0], killed[0], strict=True))
    assert_same_bytes(inline_store, tmp_path / "killed.zarr")


# ---------------------------------------------------------------- kill -9 of an actor process

DEEP = {"tree.depth": 6, "engine.batch_size": 25, "store.chunk_nodes": 125}


@pytest.fixture(scope="module")
def inline_depth_6(tmp_path_factory):
    path = tmp_path_factory.mktemp("inline6") / "run.zarr"
    make_run(path, run_config(**DEEP))
    return path


@pytest.mark.parametrize("victim", ["knn", "decoder"])
def test_kill_9_of_an_actor_process_mid_depth_6_run_gives_the_clean_store(
        inline_depth_6, tmp_path, monkeypatch, victim):
    """SIGKILL, from outside Ray, of one actor's worker process while level 4's tasks are in
    flight: Ray restarts the actor, its tasks are retried, the store is the clean one."""
    import signal

    import psutil

    pools, pids, killed = [], {}, []
    make_executor = driver._executor

    def capture(sampler, engine):
        pool = make_executor(sampler, engine)
        pools.append(pool)
        pids["knn"] = ray.get(pool.knn[0].shared_info.remote())["pid"]
        pids["decoder"] = ray.get(pool.decoders[0].shared_info.remote())["pid"]
        return pool

    monkeypatch.setattr(driver, "_executor", capture)

    def kill_in_level_4(level, chunk):
        if level == 4 and not killed and pools[0].pending() > 0:  # tasks in flight
            os.kill(pids[victim], signal.SIGKILL)
            killed.append((chunk, pids[victim]))
        elif killed and level == 5 and len(killed) == 1:
            # by the next level the killed process is gone (or a reaped-soon zombie)
            pid = killed[0][1]
            gone = not psutil.pid_exists(pid) or \
                psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            killed.append(gone)

    cfg = run_config(**DEEP, **{"engine.backend": "ray", "engine.n_decoders": 1,
                                "engine.n_knn": 1, "engine.max_in_flight": 3})
    make_run(tmp_path / "killed.zarr", cfg, after_chunk=kill_in_level_4)
    assert len(killed) == 2 and killed[1] is True, killed
    assert_same_bytes(inline_depth_6, tmp_path / "killed.zarr")
