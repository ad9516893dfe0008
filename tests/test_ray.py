"""--executor ray on a real two-node Ray cluster on this machine: the same report as a local run,
tasks on both nodes, a killed worker survived, an unreachable cluster refused before any work."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import sub8
import tinymodels
from sub8.allocate.allocation import AllocationConfig
from sub8.cli import main

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cmd(*args, env=None):
    done = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node and a second node joining it, one CPU each, on this machine."""
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    ray_cmd("start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
            "--disable-usage-stats", env=env)
    ray_cmd("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", env=env)
    address = f"127.0.0.1:{port}"
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield address
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def light_run(executor, calib):
    model, _ = tinymodels.tiny()
    config = sub8.QuantConfig(pipeline="light", cache_dir=None, bias_tuning={"iters": 5, "batch_size": 8},
                              allocation=AllocationConfig(size_ratio=0.25, precisions=((8, 8), (4, 8), (4, 4), (2, 4))))
    evals = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return sub8.quantize(model, calib, config, eval_images=evals, executor=executor)


def same_result(a, b):
    ra, rb = a.report, b.report
    assert ra["allocate"]["choice"] == rb["allocate"]["choice"]
    assert ra["allocate"]["sensitivity"] == rb["allocate"]["sensitivity"]  # exactly: bit for bit
    assert ra["metrics"] == rb["metrics"] and ra["size"] == rb["size"] and ra["layers"] == rb["layers"]
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k


CALIB = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def local_result():
    return light_run(None, CALIB)


def test_light_pipeline_on_two_nodes_equals_the_local_run(cluster, local_result):
    from sub8.ray_executor import RayExecutor
    on_ray = light_run(RayExecutor(cluster), CALIB)
    same_result(local_result, on_ray)
    stages = {s["stage"]: s for s in on_ray.report["executor"]["stages"]}
    assert on_ray.report["executor"]["kind"] == "ray"
    assert stages["run_candidate"]["tasks"] == 4 and stages["run_candidate"]["nodes"] == 2  # both nodes worked
    assert stages["measure_precision"]["tasks"] >= 3  # the table cut by precision and layer group
    assert all(s["task_seconds"] > 0 and s["wall_seconds"] > 0 for s in stages.values())
    local_stages = {s["stage"] for s in local_result.report["executor"]["stages"]}
    assert local_result.report["executor"]["kind"] == "local" and local_stages == set(stages)


def test_the_cli_runs_on_the_cluster(cluster, image_dirs, tmp_path):
    import json
    calib, evals = image_dirs
    reports = {}
    for kind, extra in (("local", []), ("ray", ["--executor", "ray", "--ray-address", cluster])):
        out = tmp_path / kind
        result = CliRunner().invoke(main, ["quantize", "--model", "python:tinymodels:tiny", "--calib", calib,
                                           "--eval", evals, "--samples", "8", "--steps", "ranges,allocate",
                                           "--size-ratio", "0.25", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        reports[kind] = json.load(open(out / "report.json"))
    assert reports["ray"]["executor"]["kind"] == "ray" and reports["local"]["executor"]["kind"] == "local"
    assert reports["ray"]["allocate"]["choice"] == reports["local"]["allocate"]["choice"]
    assert reports["ray"]["metrics"] == reports["local"]["metrics"]


class KillingExecutor:
    """A RayExecutor that, once the sensitivity cells are submitted, kills a worker that runs one."""

    def __new__(cls, address):
        from sub8.ray_executor import RayExecutor

        class Killing(RayExecutor):
            killed = []

            def _results(self, fn, items):
                results = super()._results(fn, items)
                if fn.__name__ == "measure_precision" and not self.killed:
                    self.killed.append(kill_a_busy_worker())
                return results
        return Killing(address)


def kill_a_busy_worker(timeout: float = 30.0) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(p.info["cmdline"] or [])
            if title.startswith("ray::_run_task"):
                os.kill(p.info["pid"], signal.SIGKILL)
                return p.info["pid"]
        time.sleep(0.002)
    raise AssertionError("no worker ran a sensitivity task")


def test_a_worker_killed_during_the_sensitivity_stage_is_retried(cluster, local_result):
    executor = KillingExecutor(cluster)
    on_ray = light_run(executor, CALIB)
    assert executor.killed and executor.killed[0] > 0
    same_result(local_result, on_ray)


def test_an_unreachable_cluster_is_one_line_before_any_work(tmp_path, image_dirs):
    calib, _ = image_dirs
    port = free_port()  # nothing listens there
    result = CliRunner().invoke(main, ["quantize", "--model", "python:tinymodels:tiny", "--calib", calib,
                                       "--out", str(tmp_path / "o"), "--executor", "ray",
                                       "--ray-address", f"127.0.0.1:{port}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in result.output
    assert "loading the model" not in result.output and not (tmp_path / "o").exists()

