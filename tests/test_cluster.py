"""The cluster recipes in cluster/: the AWS launcher config against Ray's own schema, the
KubeRay manifest's required fields, and a real head + 2 worker nodes from cluster/local.sh."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from engine.config import load_config
from engine.store import ScenarioStore
from tests.conftest import backfill_cmd, cli_project
from tests.test_driver import assert_same_bytes

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LOCAL_SH = CLUSTER / "local.sh"


# ---------------------------------------------------------------- AWS launcher config

def _aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def _ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before anything touches AWS: fill in the provider's
    defaults, merge the setup commands, then check it against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_config_passes_rays_schema():
    prepared = _ray_validate(_aws())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("breakage", ["unknown top-level key", "fractional GPU", "bad head type"])
def test_aws_config_validator_rejects_a_broken_copy(breakage):
    import jsonschema

    config = _aws()
    if breakage == "unknown top-level key":
        config["head_nodes_type"] = config["head_node_type"]  # a typo
        err = jsonschema.ValidationError
    elif breakage == "fractional GPU":
        config["available_node_types"]["worker.gpu"]["resources"]["GPU"] = 0.5
        err = jsonschema.ValidationError
    else:
        config["head_node_type"] = "no.such.type"
        err = ValueError
    with pytest.raises(err):
        _ray_validate(config)


def test_aws_config_has_gpu_workers_token_auth_and_a_private_dashboard():
    config = _aws()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for name, t in types.items() if name != config["head_node_type"]
           and t["resources"].get("GPU", 0) >= 1]
    assert gpu and gpu[0]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert any("backfill[gpu]" in c for c in config["worker_setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for cmd in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token" in cmd and "ray start" in cmd


# ---------------------------------------------------------------- KubeRay manifest

def check_raycluster(doc: dict) -> None:
    """The fields the KubeRay operator needs, and a GPU worker group. Raises AssertionError."""
    assert doc.get("apiVersion") == "ray.io/v1", "apiVersion must be ray.io/v1"
    assert doc.get("kind") == "RayCluster", "kind must be RayCluster"
    assert doc.get("metadata", {}).get("name"), "metadata.name is required"
    spec = doc["spec"]
    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams", {}), dict)
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and head_containers[0].get("image"), "the head needs an image"
    groups = spec.get("workerGroupSpecs")
    assert groups, "at least one worker group"
    names = [g.get("groupName") for g in groups]
    assert all(names) and len(set(names)) == len(names), "unique groupName per group"
    gpu_groups = 0
    for g in groups:
        lo, n, hi = g.get("minReplicas"), g.get("replicas"), g.get("maxReplicas")
        assert all(isinstance(v, int) for v in (lo, n, hi)), f"{g['groupName']}: replica counts"
        assert 0 <= lo <= n <= hi, f"{g['groupName']}: minReplicas <= replicas <= maxReplicas"
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c.get("image") for c in containers)
        limits = containers[0].get("resources", {}).get("limits", {})
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups += 1
    assert gpu_groups, "a worker group must request nvidia.com/gpu"


def _kuberay_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]


def test_kuberay_raycluster_has_required_fields_and_a_gpu_group():
    clusters = [d for d in _kuberay_docs() if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    check_raycluster(clusters[0])
    assert clusters[0]["spec"]["authOptions"]["mode"] == "token"


def test_kuberay_rayjob_runs_backfill_on_the_cluster(tmp_path):
    docs = _kuberay_docs()
    name = next(d for d in docs if d["kind"] == "RayCluster")["metadata"]["name"]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == name
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("backfill run") and "--address auto" in entry and "--store" in entry
    # its --config is the ConfigMap mounted on the head, a valid config whose decoders ask for
    # a GPU each (so the autoscaler brings the GPU group up from zero)
    config_file = Path(entry.split("--config ")[1].split()[0])
    head = next(d for d in docs if d["kind"] == "RayCluster")["spec"]["headGroupSpec"]
    mount = next(m for m in head["template"]["spec"]["containers"][0]["volumeMounts"]
                 if m["mountPath"] == str(config_file.parent))
    volume = next(v for v in head["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = next(d for d in docs if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == volume["configMap"]["name"])
    toml = tmp_path / config_file.name
    toml.write_text(config_map["data"][config_file.name])
    assert load_config(toml).engine.decoder_gpus == 1


@pytest.mark.parametrize("breakage", ["no gpu", "no image", "replicas out of range", "kind"])
def test_kuberay_checker_rejects_a_broken_copy(breakage):
    doc = copy.deepcopy(next(d for d in _kuberay_docs() if d["kind"] == "RayCluster"))
    group = doc["spec"]["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    if breakage == "no gpu":
        container["resources"]["limits"].pop("nvidia.com/gpu")
    elif breakage == "no image":
        doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image")
    elif breakage == "replicas out of range":
        group["replicas"] = group["maxReplicas"] + 1
    else:
        doc["kind"] = "RayService"
    with pytest.raises(AssertionError):
        check_raycluster(doc)


# ---------------------------------------------------------------- cluster/local.sh

def test_local_sh_is_executable_and_parses():
    assert os.access(LOCAL_SH, os.X_OK), "chmod +x cluster/local.sh"
    r = subprocess.run(["bash", "-n", str(LOCAL_SH)], check=False, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(LOCAL_SH)], check=False, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("args", [[], ["bogus"], ["up"], ["up", "two"], ["up", "-1"],
                                  ["up", "2", "3"]])
def test_local_sh_usage_errors(args):
    r = subprocess.run(["bash", str(LOCAL_SH), *args], check=False, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.ray
def test_local_sh_up_refuses_a_taken_port_of_a_worker_nodes_block(tmp_path):
    """Another program (or cluster) on a worker node's port: `up` names it and starts nothing."""
    if shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists():
        pytest.skip("the `ray` CLI is not installed (pip install 'ray[default]')")
    port = _free_base_port()
    root = tmp_path / "cluster"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "BACKFILL_RAY_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               BACKFILL_RAY_PORT=str(port), BACKFILL_RAY_ROOT=str(root))
    with socket.socket() as taken:
        taken.bind(("127.0.0.2", port + 203))  # worker node 1's dashboard-agent listen port
        taken.listen()
        r = subprocess.run(["bash", str(LOCAL_SH), "up", "2"], check=False, env=env,
                           capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert f"port {port + 203} (node 1's block" in r.stderr, r.stderr
    assert "at least 400 away" in r.stderr, r.stderr
    assert not list(root.glob("n[0-9]*")), "a node was started"
    assert _marked_pids(f"BACKFILL_RAY_CLUSTER={root}") == []


def _free_base_port() -> int:
    """A port p with p (GCS), p+1, p+2 and the node blocks p+100 .. p+399 unused."""
    for base in range(16380, 30000, 500):
        probes = [base, base + 1, base + 2, *range(base + 100, base + 400, 100)]
        if all(_port_free(p) for p in probes):
            return base
    pytest.skip("no free port range for a local Ray cluster")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _marked_pids(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in env:
                pids.append(int(proc.name))
    return pids


DRIVER = textwrap.dedent("""
    import json, ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address="auto", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()

    workers = [n["NodeID"] for n in nodes if n["Resources"].get("CPU", 0) > 0]
    ran_on = ray.get([
        where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(w, soft=False)).remote()
        for w in workers], timeout=60)
    print(json.dumps({
        "nodes": [{"id": n["NodeID"], "ip": n["NodeManagerAddress"],
                   "cpu": n["Resources"].get("CPU", 0),
                   "head": "node:__internal_head__" in n["Resources"]} for n in nodes],
        "workers": workers, "ran_on": ran_on,
        "gcs": ray.get_runtime_context().gcs_address}))
    ray.shutdown()
""")


@pytest.mark.ray
def test_local_sh_starts_a_real_three_node_cluster_and_tears_it_down():
    bindir = Path(sys.executable).parent
    if not (bindir / "ray").exists() and shutil.which("ray") is None:
        pytest.skip("the `ray` CLI is not installed (pip install 'ray[default]')")
    if shutil.which("setsid") is None:
        pytest.skip("`setsid` (util-linux) is needed by cluster/local.sh")
    port = _free_base_port()
    root = tempfile.mkdtemp(prefix="bfr", dir="/tmp")  # short: unix socket paths are < 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "BACKFILL_RAY_"))}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", BACKFILL_RAY_PORT=str(port),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # as .ci/run exports it
               BACKFILL_RAY_ROOT=root, BACKFILL_RAY_TIMEOUT="40",
               BACKFILL_RAY_OBJECT_STORE=str(100 * 1024 * 1024))

    def sh(*args, timeout):
        return subprocess.run(["bash", str(LOCAL_SH), *args], check=False, env=env,
                              capture_output=True, text=True, timeout=timeout)

    try:
        up = sh("up", "2", timeout=55)
        assert up.returncode == 0, up.stderr[-3000:]
        driver_env = dict(line.removeprefix("export ").split("=", 1)
                          for line in up.stdout.splitlines() if line.startswith("export "))
        assert driver_env["RAY_ADDRESS"] == f"127.0.0.2:{port}"
        assert driver_env["RAY_AUTH_MODE"] == "token"
        assert sh("env", timeout=10).stdout == up.stdout

        again = sh("up", "2", timeout=30)  # idempotent
        assert again.returncode == 0 and "already up" in again.stderr

        run = subprocess.run([sys.executable, "-c", DRIVER], check=False,
                             env={**env, **driver_env}, capture_output=True, text=True,
                             timeout=45)
        assert run.returncode == 0, run.stderr[-3000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
        nodes = got["nodes"]
        assert len(nodes) == 3, nodes
        assert {n["ip"] for n in nodes} == {"127.0.0.2"}
        assert sorted(n["cpu"] for n in nodes) == [0, 1, 1]  # head 0 CPUs, workers 1 each
        assert [n["head"] for n in nodes].count(True) == 1
        assert len(got["workers"]) == 2 and got["ran_on"] == got["workers"]
        assert got["gcs"] == f"127.0.0.2:{port}"

        status = sh("status", timeout=30)
        assert status.returncode == 0 and "Active:" in status.stdout, status.stderr

        # the engine on this cluster: `backfill run --address auto`, depth 5, gives the
        # inline backend's store bit for bit
        cfg, model = cli_project(Path(root) / "project", depth=5)
        stores = {b: Path(root) / f"{b}.zarr" for b in ("inline", "ray")}
        for backend, path in stores.items():
            extra = ["--address", "auto"] if backend == "ray" else []
            r = subprocess.run(backfill_cmd("run", "--config", cfg, "--model", model,
                                            "--store", path, "--depth", 5,
                                            "--backend", backend, *extra),
                               check=False, env={**env, **driver_env}, capture_output=True,
                               text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
        assert ScenarioStore.open(stores["ray"]).levels_complete == 5
        assert_same_bytes(stores["inline"], stores["ray"])
    finally:
        down = sh("down", timeout=40)
        left = _marked_pids(f"BACKFILL_RAY_CLUSTER={root}")
        shutil.rmtree(root, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert left == [], f"processes of the test cluster left running: {left}"
    for p in (port, port + 100, port + 200, port + 300):  # GCS, then each node manager
        assert _port_free(p), f"port {p} of the test cluster is still open"


# ---------------------------------------------------------------- cluster/gpu_bench.sh

def test_gpu_bench_sh_parses_and_needs_a_cuda_torch(tmp_path):
    script = CLUSTER / "gpu_bench.sh"
    assert os.access(script, os.X_OK), "chmod +x cluster/gpu_bench.sh"
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(script)], check=False, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the script would install packages and run the GPU bench")
    r = subprocess.run(["bash", str(script), str(tmp_path / "out")], check=False,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable,
                            "BACKFILL_SITE": str(tmp_path / "site")})
    assert r.returncode == 2 and "no CUDA device" in r.stderr, r.stderr
    assert not (tmp_path / "site").exists()  # it stopped before installing anything
