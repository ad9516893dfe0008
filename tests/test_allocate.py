"""Bit allocation: the integer program against brute force, budgets, ties, infeasibility, and the
allocate step end to end (cost model = the real size, additivity, the on-disk cache)."""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from sub8 import QuantConfig, Sub8Error, quantize
from sub8.allocate import Problem, greedy, minimize_cost, minimize_degradation
from sub8.config import AllocationConfig
from tinymodels import tiny


def random_problem(rng, n_layers, n_prec, ties=()):
    # Costs fall and degradations rise with the column, as lower precisions do, plus noise.
    size = np.sort(rng.integers(100, 1000, (n_layers, n_prec)), axis=1)[:, ::-1].astype(float)
    bops = np.sort(rng.integers(10, 500, (n_layers, n_prec)), axis=1)[:, ::-1].astype(float)
    degr = np.sort(rng.random((n_layers, n_prec)), axis=1)
    degr[:, 0] = 0.0
    return Problem([f"l{i}" for i in range(n_layers)], [(8 - k, 8) for k in range(n_prec)], degr,
                   {"size": size, "bops": bops}, {"size": 50.0, "bops": 0.0}, [list(t) for t in ties])


def brute_force(problem, budgets, objective="degradation", max_degradation=None):
    """Best feasible allocation by enumeration: (value, choice) or None."""
    n_l, n_p = problem.degradation.shape
    best = None
    for combo in itertools.product(range(n_p), repeat=n_l):
        c = np.array(combo)
        if any(len({c[i] for i in g}) > 1 for g in problem.ties):
            continue
        if any(problem.total(k, c) > b for k, b in budgets.items()):
            continue
        if max_degradation is not None and problem.predicted(c) > max_degradation:
            continue
        value = problem.predicted(c) if objective == "degradation" else problem.total(objective, c)
        if best is None or value < best[0] - 1e-12:
            best = (value, c)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_milp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    ties = [(0, 2)] if seed % 3 == 0 else ()
    problem = random_problem(rng, n_layers=5, n_prec=3, ties=ties)
    lo = [problem.total(k, np.full(5, 2)) for k in ("size", "bops")]
    hi = [problem.total(k, np.zeros(5, int)) for k in ("size", "bops")]
    budgets = {"size": rng.uniform(lo[0], hi[0])}
    if seed % 2:
        budgets["bops"] = rng.uniform(lo[1], hi[1])
    expected = brute_force(problem, budgets)
    if expected is None:
        with pytest.raises(Sub8Error):
            minimize_degradation(problem, budgets)
        return
    choice = minimize_degradation(problem, budgets)
    assert problem.predicted(choice) == pytest.approx(expected[0], abs=1e-9)
    for k, b in budgets.items():  # never over budget
        assert problem.total(k, choice) <= b
    for g in problem.ties:
        assert len({choice[i] for i in g}) == 1
    # The greedy baseline is feasible and never better than the optimum.
    g = greedy(problem, budgets)
    assert all(problem.total(k, g) <= b for k, b in budgets.items())
    assert problem.predicted(g) >= expected[0] - 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_min_cost_under_degradation_budget_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    problem = random_problem(rng, n_layers=5, n_prec=3, ties=[(1, 3, 4)] if seed % 2 else ())
    allowed = rng.uniform(0, problem.degradation[:, -1].sum())
    expected = brute_force(problem, {}, objective="size", max_degradation=allowed)
    choice = minimize_cost(problem, "size", allowed)
    assert problem.total("size", choice) == pytest.approx(expected[0])
    assert problem.predicted(choice) <= allowed + 1e-9


def test_infeasible_budget_names_the_smallest_feasible_one():
    problem = random_problem(np.random.default_rng(7), n_layers=4, n_prec=3, ties=[(0, 1)])
    least = brute_force(problem, {}, objective="size")[0]
    with pytest.raises(Sub8Error, match=f"least reachable is {least:.6g}"):
        minimize_degradation(problem, {"size": least - 1})
    assert problem.total("size", minimize_degradation(problem, {"size": least})) == least  # tight is fine
    with pytest.raises(Sub8Error, match="least reachable degradation is 0"):
        minimize_cost(problem, "size", -1.0)


def test_ties_force_one_precision():
    degr = np.array([[0, 1.0], [0, 0.0], [0, 0.0]])  # layer 0 hates the low precision, 1 and 2 do not
    size = np.array([[10, 1.0], [10, 1.0], [10, 1.0]])
    free = Problem(["a", "b", "c"], [(8, 8), (4, 8)], degr, {"size": size})
    tied = Problem(["a", "b", "c"], [(8, 8), (4, 8)], degr, {"size": size}, ties=[[0, 1]])
    assert list(minimize_degradation(free, {"size": 21})) == [0, 1, 1]
    assert list(minimize_degradation(tied, {"size": 21})) == [0, 0, 1]
    with pytest.raises(Sub8Error, match="least reachable is 3"):
        minimize_degradation(tied, {"size": 2.5})


def peaky_tiny():
    """The tiny model with confident outputs, so that KL degradations are well above noise."""
    model, _ = tiny()
    with torch.no_grad():
        model.fc.weight.mul_(40)
    return model


@pytest.fixture
def calib():
    return torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def light(tmp_path, **alloc):
    # (the grids these tests were measured with: asymmetric weights, MSE ranges)
    return QuantConfig(pipeline="light", allocation=AllocationConfig(**alloc), cache_dir=str(tmp_path / "cache"),
                       w_symmetric=False, ranges="mse")


def test_allocated_model_meets_budget_and_its_cost_is_the_real_size(tmp_path, calib):
    model = peaky_tiny()
    result = quantize(model, calib, light(tmp_path, size_ratio=0.2, bops_ratio=0.02))
    report = result.report
    a = report["allocate"]
    assert a["costs"]["size"]["ratio"] <= a["budgets"]["size_ratio"] == 0.2
    assert a["costs"]["bops"]["ratio"] <= a["budgets"]["bops_ratio"] == 0.02
    # The cost model is the size report of the model actually built.
    assert a["costs"]["size"]["result"] == report["size"]["weight_bits"]
    bits = {layer["name"]: f"W{layer['w_bits']}A{layer['a_bits']}" for layer in report["layers"]}
    assert {n: bits[n] for n in a["choice"]} == a["choice"]
    assert set(a["choice"]) == {"block.conv1", "block.conv2", "dw", "grouped"}  # first/last stay 8-bit
    assert bits["stem.0"] == bits["fc"] == "W8A8"


def test_degradations_add_up_on_a_small_model(tmp_path, calib):
    """The program assumes that per-layer degradations add up; measured on the built model."""
    model = peaky_tiny()
    a = quantize(model, calib, light(tmp_path, size_ratio=0.2)).report["allocate"]
    low = [n for n, p in a["choice"].items() if p != "W8A8"]
    assert len(low) >= 2  # a real mix, not one layer
    predicted, measured = a["predicted_degradation"], a["measured_degradation"]
    assert predicted > 50 * a["base_loss"]  # well above the 8-bit model's own loss
    assert measured == pytest.approx(predicted, rel=0.5)


def test_second_solve_reads_the_cache(tmp_path, calib):
    model = peaky_tiny()
    first = quantize(model, calib, light(tmp_path, size_ratio=0.2)).report["allocate"]
    second = quantize(model, calib, light(tmp_path, size_ratio=0.19)).report["allocate"]
    assert first["cache"]["misses"] > 0
    assert second["cache"]["misses"] == 0 and second["cache"]["hits"] > 0
    assert second["sensitivity"] == first["sensitivity"]
    # A changed calibration set is another key: no stale entry is read.
    third = quantize(model, calib.flip(0)[:30], light(tmp_path, size_ratio=0.19)).report["allocate"]
    assert third["cache"]["hits"] == 0


def test_advanced_reports_each_candidates_adaquant(tmp_path, calib):
    """The advanced recipe runs parallel AdaQuant once per candidate precision; each run's
    per-layer record lands in the report, and a cached candidate brings its record back."""
    model = peaky_tiny()
    config = QuantConfig(pipeline="advanced", adaquant={"iters": 5, "batch_size": 8},
                         bias_tuning={"iters": 2, "batch_size": 8},
                         allocation=AllocationConfig(size_ratio=0.2), cache_dir=str(tmp_path / "cache"))
    a = quantize(model, calib, config).report["allocate"]
    assert set(a["candidates"]) == set(a["precisions"]) | {a["base"]}
    for label, steps in a["candidates"].items():
        assert steps["adaquant"]["settings"]["mode"] == "parallel", label  # auto, in a candidate's recipe
        layers = steps["adaquant"]["layers"]
        assert {r["name"] for r in layers} >= set(a["choice"]), label
        assert all(r["heldout_mse_after"] >= 0 and r["heldout_mse_before"] >= 0 for r in layers)
    again = quantize(model, calib, replace(config, allocation=AllocationConfig(size_ratio=0.19))).report["allocate"]
    assert again["candidates"] == a["candidates"] and again["cache"]["misses"] == 0


def test_adaquant_auto_mode_is_sequential_at_the_runs_own_bits(calib):
    model = peaky_tiny()
    config = QuantConfig(w_bits=4, a_bits=4, pipeline="adaquant", adaquant={"iters": 2, "batch_size": 8},
                         cache_dir=None)
    assert config.adaquant.mode == "auto" and config.adaquant.reconstruct == "auto"
    record = quantize(model, calib, config).report["adaquant"]
    # sequential, in blocks with QDrop (a traced model, 4-bit inputs), the CPU budget's rates, the given numbers
    settings = record["settings"]
    assert settings["mode"] == "sequential" and settings["reconstruct"] == "block" and settings["qdrop"] == 0.5
    assert settings["budget"] == "cpu" and settings["lr_weight"] == 1e-2 and settings["iters"] == 2
    assert "units" in record and settings["batch_size"] == 8
    # every activation at 8 bits: blocks without QDrop
    at8 = quantize(model, calib, replace(config, a_bits=8)).report["adaquant"]["settings"]
    assert (at8["reconstruct"], at8["qdrop"]) == ("block", 0.0)
    layerwise = QuantConfig(pipeline="adaquant", adaquant={"iters": 2, "reconstruct": "layer"}, cache_dir=None)
    record = quantize(model, calib, layerwise).report["adaquant"]
    assert record["settings"]["qdrop"] == 0.0 and record["groups"] == len(record["layers"])


def test_first_and_last_layers_can_join_the_allocation(tmp_path, calib):
    model = peaky_tiny()
    fixed = quantize(model, calib, light(tmp_path, size_ratio=0.2)).report
    joined = quantize(model, calib, light(tmp_path, size_ratio=0.2, first_last=True)).report
    names = [layer["name"] for layer in fixed["layers"]]
    assert set(fixed["allocate"]["choice"]) == set(names[1:-1])
    assert set(joined["allocate"]["choice"]) == set(names)
    assert joined["size"]["ratio"] <= 0.2 and joined["allocate"]["cache"]["hits"] == 0  # its own candidates
    # below what the fixed 8-bit first and last layers allow, a budget is now reachable
    low = quantize(model, calib, light(tmp_path, size_ratio=0.15, first_last=True)).report
    assert low["size"]["ratio"] <= 0.15


def test_latency_budget(tmp_path, calib):
    import json
    model = peaky_tiny()
    names = ["stem.0", "block.conv1", "block.conv2", "dw", "grouped", "fc"]
    table = {n: {"float": 4.0, "W8A8": 2.0, "W4A8": 1.5, "W4A4": 1.0, "W2A4": 0.8} for n in names}
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(table))
    a = quantize(model, calib, light(tmp_path, latency_ms=8.0, latency_table=str(path))).report["allocate"]
    assert a["costs"]["latency"]["result"] <= 8.0
    assert a["costs"]["latency"]["float"] == 24.0
    del table["dw"]["W2A4"]
    path.write_text(json.dumps(table))
    with pytest.raises(Sub8Error, match="lacks 1 entry, e.g. dw W2A4"):
        quantize(model, calib, light(tmp_path, latency_ms=8.0, latency_table=str(path)))


def test_allocation_config_errors(tmp_path, calib):
    model = peaky_tiny()
    with pytest.raises(Sub8Error, match="needs a budget"):
        quantize(model, calib, light(tmp_path))
    with pytest.raises(Sub8Error, match=r"size_ratio 0.01 \(the least reachable is 0.17.*--allocate-first-last"):
        quantize(model, calib, light(tmp_path, size_ratio=0.01))
    with pytest.raises(Sub8Error, match="matches no layer"):
        quantize(model, calib, light(tmp_path, size_ratio=0.2, ties=("nothing*",)))
    with pytest.raises(Sub8Error, match="must be parallel"):
        quantize(model, calib, QuantConfig(pipeline="advanced", adaquant={"mode": "sequential"},
                                           allocation=AllocationConfig(size_ratio=0.2), cache_dir=None))


def test_suffix_runs_equal_whole_model_runs(calib):
    """Sensitivities re-run only the layers after the measured one; the values are the same."""
    from sub8.allocate.allocation import layer_states
    from sub8.allocate.sensitivity import measure, model_loss
    from sub8.calibrate import calibrate_ranges
    from sub8.adapters import prepare
    from sub8.quant.layers import float_mode

    model = peaky_tiny()
    low = prepare(model, calib[:1], QuantConfig(w_bits=2, a_bits=4))
    calibrate_ranges(low, calib)
    base = prepare(model, calib[:1], QuantConfig(w_bits=8, a_bits=8))
    calibrate_ranges(base, calib)
    with float_mode(base.reference), torch.no_grad():
        reference = base.reference(calib)
    names = ["block.conv1", "block.conv2", "dw", "grouped"]
    states, base_states = layer_states(low), layer_states(base)
    fast = measure(base.module, base.quant_layers(), names, base_states, {(2, 4): states}, calib, reference,
                   "kl", batch=12)[(2, 4)]
    for n in names:
        layer = base.quant_layers()[n]
        layer.load_state_dict(states[n])
        slow = model_loss(base.module, calib, reference, "kl", 12)
        layer.load_state_dict(base_states[n])
        assert fast[n] == pytest.approx(slow, rel=1e-12, abs=1e-15), n
