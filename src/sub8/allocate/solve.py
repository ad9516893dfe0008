"""The bit-allocation integer program, solved exactly with scipy's milp (HiGHS).

One binary x[l, p] per (layer, candidate precision), exactly one precision per layer, tied
layers share one precision. Either minimize the summed degradation under cost budgets, or
minimize one cost under a degradation budget (and any cost budgets). Costs are `const + sum
cost[l, p] x[l, p]`: the constant holds what allocation cannot change (fixed layers, other
parameters). A greedy allocation is here too, as the baseline the program must beat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import Sub8Error

SLACK = 1e-9  # relative margin kept under each budget against the solver's feasibility tolerance


@dataclass
class Problem:
    layers: list[str]
    precisions: list[tuple]          # the candidate columns, shared by every layer
    degradation: np.ndarray          # L x P: increase of the loss, layer alone at that precision
    costs: dict[str, np.ndarray]     # cost name -> L x P
    const: dict[str, float] = field(default_factory=dict)  # cost name -> fixed part
    ties: list[list[int]] = field(default_factory=list)   # groups of layer indices, one precision each

    def total(self, name: str, choice: np.ndarray) -> float:
        """The cost `name` of an allocation (`choice[l]` = column of layer l)."""
        return float(self.const.get(name, 0.0) + self.costs[name][np.arange(len(choice)), choice].sum())

    def predicted(self, choice: np.ndarray) -> float:
        return float(self.degradation[np.arange(len(choice)), choice].sum())


def _model(problem: Problem):
    """Shape of the flat variable vector and the one-per-layer and tie constraints."""
    n_l, n_p = problem.degradation.shape
    rows = []
    one = np.zeros((n_l, n_l * n_p))
    for i in range(n_l):
        one[i, i * n_p:(i + 1) * n_p] = 1
    rows.append(LinearConstraint(one, 1, 1))
    tie_rows = []
    for group in problem.ties:
        for other in group[1:]:
            for p in range(n_p):
                r = np.zeros(n_l * n_p)
                r[group[0] * n_p + p], r[other * n_p + p] = 1, -1
                tie_rows.append(r)
    if tie_rows:
        rows.append(LinearConstraint(np.array(tie_rows), 0, 0))
    return n_l, n_p, rows


def _cost_row(problem: Problem, name: str) -> np.ndarray:
    if name not in problem.costs:
        raise Sub8Error(f"no {name} cost is known for this model")
    return problem.costs[name].reshape(-1)


def _run(problem: Problem, objective: np.ndarray, budgets: dict[str, float],
         max_degradation: float | None = None) -> np.ndarray | None:
    n_l, n_p, constraints = _model(problem)
    for name, budget in budgets.items():
        row = _cost_row(problem, name)
        scale = max(abs(budget), np.abs(row).max(), 1e-30)  # rows near 1 for the solver's tolerances
        limit = (budget - problem.const.get(name, 0.0)) / scale
        constraints.append(LinearConstraint(row[None] / scale, -np.inf, limit - SLACK * abs(limit)))
    if max_degradation is not None:
        row = problem.degradation.reshape(-1)
        constraints.append(LinearConstraint(row[None], -np.inf, max_degradation))
    scale = max(np.abs(objective).max(), 1e-30)
    res = milp(objective / scale, constraints=constraints, integrality=np.ones(n_l * n_p),
               bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        return None
    return np.round(res.x).reshape(n_l, n_p).argmax(axis=1)


def _check(problem: Problem, choice: np.ndarray, budgets: dict[str, float]) -> np.ndarray:
    for name, budget in budgets.items():
        if problem.total(name, choice) > budget * (1 + 1e-12):  # the solver's answer, checked exactly
            raise Sub8Error(f"internal error: the solver's allocation exceeds the {name} budget")
    return choice


def smallest_feasible(problem: Problem, name: str, others: dict[str, float]) -> float | None:
    """The least value of cost `name` that any allocation reaches under the other budgets."""
    choice = _run(problem, _cost_row(problem, name), others)
    return None if choice is None else problem.total(name, choice)


def _infeasible(problem: Problem, budgets: dict[str, float], what: str) -> Sub8Error:
    parts = []
    for name, budget in budgets.items():
        others = {k: v for k, v in budgets.items() if k != name}
        least = smallest_feasible(problem, name, others)
        if least is None:
            least = smallest_feasible(problem, name, {})
            parts.append(f"{name} {budget:.6g} (the least reachable even alone is {least:.6g})")
        elif least > budget:
            parts.append(f"{name} {budget:.6g} (the least reachable is {least:.6g})")
    detail = "; ".join(parts) or "the budgets cannot hold together"
    return Sub8Error(f"no allocation {what}: {detail}")


def minimize_degradation(problem: Problem, budgets: dict[str, float]) -> np.ndarray:
    """The allocation of least predicted degradation whose costs are all within `budgets`."""
    choice = _run(problem, problem.degradation.reshape(-1), budgets)
    if choice is None:
        raise _infeasible(problem, budgets, "meets the budget")
    return _check(problem, choice, budgets)


def minimize_cost(problem: Problem, name: str, max_degradation: float,
                  budgets: dict[str, float] | None = None) -> np.ndarray:
    """The allocation of least cost `name` whose predicted degradation is at most `max_degradation`."""
    budgets = budgets or {}
    choice = _run(problem, _cost_row(problem, name), budgets, max_degradation)
    if choice is None:
        least = _run(problem, problem.degradation.reshape(-1), budgets)
        if least is None:
            raise _infeasible(problem, budgets, "meets the budget")
        raise Sub8Error(f"no allocation degrades the loss by at most {max_degradation:.6g}; the least "
                        f"reachable degradation is {problem.predicted(least):.6g}")
    return _check(problem, choice, budgets)


def greedy(problem: Problem, budgets: dict[str, float]) -> np.ndarray:
    """Baseline: start every layer at its most expensive precision and repeatedly make the move
    (a layer, or a tied group, to a cheaper precision) that adds the least degradation per unit
    of budget overshoot removed, until every budget holds."""
    n_l, n_p = problem.degradation.shape
    groups = [list(g) for g in problem.ties]
    tied = {i for g in groups for i in g}
    groups += [[i] for i in range(n_l) if i not in tied]
    ref = {k: max(abs(v), 1e-30) for k, v in budgets.items()}
    weight = sum(problem.costs[k] / ref[k] for k in budgets)  # L x P, budgets in relative units
    choice = weight.argmax(axis=1)
    for g in groups:
        choice[g] = weight[g].sum(axis=0).argmax()

    def over(c):
        return [k for k in budgets if problem.total(k, c) > budgets[k]]

    while over(choice):
        active = over(choice)
        best, best_score = None, np.inf
        for g in groups:
            now = choice[g[0]]
            for p in range(n_p):
                change = {k: (problem.costs[k][g, now] - problem.costs[k][g, p]).sum() / ref[k] for k in budgets}
                if min(change.values()) < 0:  # never trade one budget for another: no cycles
                    continue
                saved = sum(change[k] for k in active)
                if saved <= 0:
                    continue
                added = (problem.degradation[g, p] - problem.degradation[g, now]).sum()
                score = added / saved
                if score < best_score:
                    best, best_score = (g, p), score
        if best is None:
            raise _infeasible(problem, budgets, "meets the budget (greedy)")
        choice[best[0]] = best[1]
    return choice
