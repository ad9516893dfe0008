"""A run killed in the middle of AdaQuant resumes where it stopped and ends where an
uninterrupted run ends."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file
from click.testing import CliRunner

from sub8.cli import main

TESTS = os.path.dirname(__file__)


def command(calib, evals, cache, out, *extra):
    return ["quantize", "--model", "python:tinymodels:tiny", "--calib", calib, "--eval", evals,
            "--samples", "10", "--w-bits", "4", "--a-bits", "4", "--pipeline", "adaquant",
            "--adaquant", "sequential", "--reconstruct", "layer", "--iters", "800", "--batch-size", "4",
            "--cache-dir", str(cache), "--out", str(out), *extra]


def test_killed_run_resumes_to_the_same_result(image_dirs, tmp_path):
    calib, evals = image_dirs
    cache = tmp_path / "cache"
    args = command(calib, evals, cache, tmp_path / "resumed")
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "sub8.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Checkpoints: one for the ranges step, then one per AdaQuant layer (sequential mode).
    deadline = time.time() + 300
    while len(glob.glob(str(cache / "checkpoint-*.pt"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "resumed").exists()  # a killed run leaves no output folder

    resumed = CliRunner().invoke(main, args)
    assert resumed.exit_code == 0, resumed.output
    fresh = CliRunner().invoke(main, command(calib, evals, tmp_path / "other-cache", tmp_path / "fresh", "--fresh"))
    assert fresh.exit_code == 0, fresh.output

    a = json.load(open(tmp_path / "resumed" / "report.json"))
    b = json.load(open(tmp_path / "fresh" / "report.json"))
    steps = {s["name"]: s for s in a["steps"]}
    assert steps["ranges"].get("resumed") and not steps["adaquant"].get("resumed")
    assert 2 <= a["adaquant"]["resumed_groups"] < a["adaquant"]["groups"]
    assert b["adaquant"]["resumed_groups"] == 0
    assert a["metrics"] == b["metrics"]
    assert a["adaquant"]["layers"] == [dict(r, seconds=r2["seconds"]) for r, r2 in
                                       zip(b["adaquant"]["layers"], a["adaquant"]["layers"])]
    sa = load_file(tmp_path / "resumed" / "model.safetensors")
    sb = load_file(tmp_path / "fresh" / "model.safetensors")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # A finished run removes its checkpoints; the allocation cache is another matter.
    assert not glob.glob(str(cache / "checkpoint-*.pt"))
