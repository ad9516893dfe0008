from .allocation import allocate
from .costs import parse_precision, precision_label
from .solve import Problem, greedy, minimize_cost, minimize_degradation

__all__ = ["Problem", "allocate", "greedy", "minimize_cost", "minimize_degradation", "parse_precision",
           "precision_label"]
