"""The light pipeline on a two-node Ray cluster against the same run in this process.

    python benchmarks/bench_ray.py --photos data/bench-photos [--model zoo:mobilenet_v2]
        [--size-ratio 0.2] [--json PATH]

Starts a Ray head and a second node on this machine (one CPU each: together the machine's two
cores), runs the light pipeline at one size budget locally (two torch threads) and on the
cluster, one after the other, and compares: the allocation and the metrics (identical?), the
wall times, each distributed stage's summed task time on Ray against the same stage's local
time (Ray's overhead), and the speed-up the measured task durations predict for 2, 8 and 32
nodes of one CPU: the steps that do not distribute stay as they are; each distributed stage
takes its tasks scheduled longest first on that many nodes (the critical path, not the sum).
Writes benchmarks/results/ray.json.
"""

from __future__ import annotations

import argparse
import heapq
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import write_result  # noqa: E402
from sub8 import QuantConfig, quantize  # noqa: E402
from sub8.data import load_images  # noqa: E402
from sub8.evaluate import predict  # noqa: E402
from sub8.ray_executor import RayExecutor  # noqa: E402
from sub8.zoo import load_model  # noqa: E402

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def makespan(durations: list[float], nodes: int) -> float:
    """Tasks scheduled longest first on `nodes` identical nodes: when the last one ends."""
    ends = [0.0] * nodes
    for d in sorted(durations, reverse=True):
        heapq.heappush(ends, heapq.heappop(ends) + d)
    return max(ends)


def predicted_seconds(report: dict, nodes: int) -> float:
    """The run's wall time with its distributed stages' tasks on `nodes` nodes."""
    total = sum(s["seconds"] + s.get("eval_seconds", 0.0) for s in report["steps"])
    for stage in report["executor"]["stages"]:
        total += makespan(stage["each_task_seconds"], nodes) - stage["wall_seconds"]
    return total


def start_cluster() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "stop", "--force"], capture_output=True)
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env)
    subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"], check=True, capture_output=True,
                   env=env)
    return f"127.0.0.1:{port}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--photos", required=True)
    ap.add_argument("--size-ratio", type=float, default=0.2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    loaded = load_model(args.model)
    calib = load_images(os.path.join(args.photos, "calib"), loaded.transform, role="calibration").images
    evals = load_images(os.path.join(args.photos, "eval"), loaded.transform, role="evaluation").images
    float_logits = predict(loaded.module, evals)
    config = QuantConfig(pipeline="light", allocation={"size_ratio": args.size_ratio}, cache_dir=None)
    runs = {}
    address = start_cluster()
    try:
        for kind in ("local", "ray"):
            executor = RayExecutor(address) if kind == "ray" else None
            start = time.perf_counter()
            q = quantize(loaded.module, calib, config, eval_images=evals, float_logits=float_logits,
                         executor=executor)
            runs[kind] = {"wall_seconds": time.perf_counter() - start, "report": q.report}
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
    local, ray_ = runs["local"]["report"], runs["ray"]["report"]
    same = {"allocation": local["allocate"]["choice"] == ray_["allocate"]["choice"],
            "sensitivity": local["allocate"]["sensitivity"] == ray_["allocate"]["sensitivity"],
            "metrics": local["metrics"] == ray_["metrics"]}
    stages = []
    for ls, rs in zip(local["executor"]["stages"], ray_["executor"]["stages"]):
        stages.append({"stage": ls["stage"], "tasks": rs["tasks"], "nodes": rs["nodes"],
                       "local_wall_seconds": ls["wall_seconds"], "local_task_seconds": ls["task_seconds"],
                       "ray_task_seconds": rs["task_seconds"], "ray_wall_seconds": rs["wall_seconds"],
                       "ray_task_over_local_task": rs["task_seconds"] / ls["task_seconds"]})
    prediction = {n: predicted_seconds(ray_, n) for n in (1, 2, 8, 32)}
    print(f"{args.model}, light pipeline, size ratio <= {args.size_ratio}: same {same}")
    print(f"wall: local {runs['local']['wall_seconds']:.1f} s, two Ray nodes {runs['ray']['wall_seconds']:.1f} s")
    print(f"{'stage':<18} {'tasks':>5} {'nodes':>5} {'local s':>8} {'ray task s':>10} {'ray wall s':>10}")
    for s in stages:
        print(f"{s['stage']:<18} {s['tasks']:5d} {s['nodes']:5d} {s['local_task_seconds']:8.1f} "
              f"{s['ray_task_seconds']:10.1f} {s['ray_wall_seconds']:10.1f}")
    print("predicted from the Ray run's task durations: " +
          ", ".join(f"{n} nodes {v:.1f} s" for n, v in prediction.items()))
    path = write_result("ray", {"args": vars(args), "same": same,
                                "wall_seconds": {k: v["wall_seconds"] for k, v in runs.items()},
                                "stages": stages, "predicted_seconds": prediction,
                                "steps": {k: v["report"]["steps"] for k, v in runs.items()},
                                "choice": ray_["allocate"]["choice"], "metrics": ray_["metrics"]}, args.json)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
