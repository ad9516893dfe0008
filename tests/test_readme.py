"""The README's Python API example runs as written."""

import os
import re

import pytest
import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.mark.slow
def test_python_api_example_runs(tmp_path, monkeypatch):
    text = open(README).read()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    q, prepared, evals = scope["q"], scope["prepared"], scope["evals"]
    names = [s["name"] for s in q.report["steps"]]
    assert names == ["prepare", "evaluate", "ranges", "bn_tuning"]
    after = {s["name"]: s["metrics"]["kl"] for s in q.report["steps"] if "metrics" in s}
    assert after["bn_tuning"] < after["ranges"]  # BN tuning helps W4A8 MobileNetV2
    with torch.no_grad():  # by hand == in one call
        assert torch.equal(prepared(evals), q(evals))


def test_readme_is_short_and_its_method_example_registers_a_working_step():
    text = open(README).read()
    assert len(text) < 13_000
    block = re.search(r"### Adding a method.*?```python\n(.*?)```", text, re.S).group(1)
    import sub8
    from sub8.registry import unregister
    from tinymodels import tiny
    exec(compile(block, "README.md", "exec"), {})
    try:
        model, _ = tiny()
        config = sub8.QuantConfig(w_bits=8, a_bits=8, steps=("ranges", "shift"), shift={"amount": 0.5},
                                  cache_dir=None)
        q = sub8.quantize(model, torch.randn(8, 3, 32, 32), config)
        assert q.report["shift"] == {"amount": 0.5} and q.report["config"]["methods"]["shift"] == {"amount": 0.5}
    finally:
        unregister("shift")
