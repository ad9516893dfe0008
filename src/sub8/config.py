"""What a run is asked to do: one dataclass shared by the Python API and the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .cache import default_cache_dir
from .errors import Sub8Error
from .quant.quantizer import parse_bits
from .quant.ranges import METHODS

ADAQUANT_MODES = ("parallel", "sequential")
ADAQUANT_LOSSES = ("mse", "fisher")
SOLVERS = ("milp", "greedy")
OUTPUT_LOSSES = ("kl", "mse")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class AdaQuantConfig:
    mode: str = "parallel"
    iters: int = 1000
    batch_size: int = 50
    # Weights move in units of their channel's grid step (see calibrate/adaquant.py): the
    # paper's absolute 1e-5 is about 1e-3 of a step for MobileNetV2's 1x1 convs at 4 bits, but
    # under 1e-4 for its depthwise convs, which then barely move.
    lr_weight: float = 1e-3
    lr_bias: float = 1e-3
    # Quantizer steps are optimized in log space, so these two are relative rates (see
    # calibrate/adaquant.py); the paper's absolute 1e-1 for the input step becomes 1e-2 here.
    lr_weight_quant: float = 1e-3
    lr_input_quant: float = 1e-2
    # Every rate decays to 0 along a half cosine over the iterations (the reference code keeps
    # them constant: Adam then hovers around the optimum instead of settling in it).
    lr_schedule: str = "cosine"
    holdout: float = 0.1          # share of calibration samples kept out of the optimization
    # The reconstruction loss: each element's squared error weighted by the output loss's Fisher
    # diagonal there (see calibrate/fisher.py), estimated from `fisher_draws` backward passes of
    # the float model per calibration sample; or the paper's plain MSE of the layer's activated
    # output. On MobileNetV2 at W4A4 the plain MSE keeps 0.16 of the confident top-1s, the
    # weighted one 0.72 (README).
    loss: str = "fisher"
    fisher_draws: int = 1
    max_memory_gb: float = 4.0    # bound on the cached inputs and targets
    cache_fp16: bool = False

    def __post_init__(self):
        if self.mode not in ADAQUANT_MODES:
            raise Sub8Error(f"--adaquant must be one of {', '.join(ADAQUANT_MODES)}, got {self.mode!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise Sub8Error(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.iters < 0 or self.batch_size < 1:
            raise Sub8Error("AdaQuant needs iters >= 0 and a batch size >= 1")
        if self.loss not in ADAQUANT_LOSSES:
            raise Sub8Error(f"--adaquant-loss must be one of {', '.join(ADAQUANT_LOSSES)}, got {self.loss!r}")
        if self.fisher_draws < 1:
            raise Sub8Error(f"--fisher-draws must be at least 1, got {self.fisher_draws}")

    @property
    def weighted(self) -> bool:
        """Whether the loss weights its elements (then the cache holds the weights too)."""
        return self.loss == "fisher"
        if not 0.0 < self.holdout < 1.0:
            raise Sub8Error(f"holdout must be in (0, 1), got {self.holdout}")
        if self.max_memory_gb <= 0:
            raise Sub8Error(f"max memory must be positive, got {self.max_memory_gb}")


INPUT_RANGES = ("none", "last", "all")  # which input steps bias tuning also trains


@dataclass
class BiasTuningConfig:
    iters: int = 200
    batch_size: int = 32
    lr: float = 1e-3        # Adam, decayed along a half cosine
    holdout: float = 0.1    # share of calibration samples kept out to measure over-fitting
    # Also train input steps: the last layer's (the paper's option) or every layer's. The rate
    # is relative to each step: an Adam move of range_lr times its initial value per iteration,
    # at most. On MobileNetV2 at A4, trained input steps shrank up to 14x from the MSE ranges.
    input_ranges: str = "none"
    range_lr: float = 3e-2

    def __post_init__(self):
        if self.iters < 0 or self.batch_size < 1 or self.lr <= 0 or self.range_lr <= 0:
            raise Sub8Error("bias tuning needs iters >= 0, a batch size >= 1 and positive learning rates")
        if not 0.0 < self.holdout < 1.0:
            raise Sub8Error(f"holdout must be in (0, 1), got {self.holdout}")
        if self.input_ranges not in INPUT_RANGES:
            raise Sub8Error(f"input_ranges must be one of {', '.join(INPUT_RANGES)}, got {self.input_ranges!r}")


@dataclass
class AllocationConfig:
    """Bit allocation by integer programming (see allocate/)."""
    # Candidate (weight bits, activation bits) per layer; `base` is added if missing.
    precisions: tuple = ((8, 8), (4, 8), (4, 4), (2, 4))
    base: tuple = (8, 8)            # the precision every other layer holds while one is measured
    size_ratio: float | None = None  # weight memory / the float32 model's
    bops_ratio: float | None = None  # BOPs / the float model's at 32-bit weights and activations
    latency_ms: float | None = None  # summed per-layer latency from `latency_table`
    latency_table: str | None = None  # JSON: layer -> precision ("W4A8", "float") -> ms
    max_degradation: float | None = None  # then: least weight memory with at most this degradation
    ties: tuple[str, ...] = ()      # each "pat1,pat2": the matching layers share one precision
    sensitivity_samples: int | None = None  # measure sensitivities on the first N samples (None: all)
    solver: str = "milp"            # milp (exact) or greedy (the baseline)
    # The first and last layers join the allocation instead of holding first_last_bits.
    first_last: bool = False

    def __post_init__(self):
        self.precisions = tuple(tuple(parse_bits(b) for b in p) for p in self.precisions)
        self.base = tuple(parse_bits(b) for b in self.base)
        if not self.precisions:
            raise Sub8Error("bit allocation needs at least one candidate precision")
        if self.solver not in SOLVERS:
            raise Sub8Error(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        for name in ("size_ratio", "bops_ratio", "latency_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise Sub8Error(f"--{name.replace('_', '-')} must be positive, got {value}")
        self.ties = tuple(self.ties)
        if self.sensitivity_samples is not None and self.sensitivity_samples < 1:
            raise Sub8Error(f"sensitivity samples must be at least 1, got {self.sensitivity_samples}")

    def has_budget(self) -> bool:
        return any(v is not None for v in (self.size_ratio, self.bops_ratio, self.latency_ms,
                                           self.max_degradation))


@dataclass
class QuantConfig:
    w_bits: int | None = 4
    a_bits: int | None = 4
    # First and last quantizable layers (in graph order); None keeps them in float.
    first_last_bits: int | None = 8
    # fnmatch pattern on layer names -> (w_bits, a_bits); applied after first/last, in order.
    layer_bits: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    # Embedding tables' weights (per-row grids); None keeps them in float.
    embedding_bits: int | None = 8
    # Quantize the operands of attention's two matrix products (queries, keys, softmax
    # probabilities, values) at a_bits, in transformers models.
    quantize_attention: bool = True
    ranges: str = "mse"
    percentile: float = 99.99
    w_symmetric: bool = False
    a_symmetric: bool = False
    pipeline: str = "rtn"
    steps: tuple[str, ...] | None = None  # an explicit step list overrides the pipeline's
    samples: int = 256
    forward_batch: int = 32  # images per forward pass (calibration, evaluation)
    # The label-free loss between float and quantized outputs (sensitivities, bias tuning):
    # kl of the softmax outputs (classifiers) or mse (feature extractors); None picks by the
    # model's output (mse for a sentence encoder's embeddings, kl otherwise).
    output_loss: str | None = None
    seed: int = 0
    device: str = "cpu"
    adaquant: AdaQuantConfig = field(default_factory=AdaQuantConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    bias_tuning: BiasTuningConfig = field(default_factory=BiasTuningConfig)
    # Where expensive intermediate results (allocation candidates, sensitivities) are kept;
    # None: nowhere.
    cache_dir: str | None = field(default_factory=default_cache_dir)

    def __post_init__(self):
        if isinstance(self.adaquant, dict):
            self.adaquant = AdaQuantConfig(**self.adaquant)
        if isinstance(self.allocation, dict):
            self.allocation = AllocationConfig(**self.allocation)
        if isinstance(self.bias_tuning, dict):
            self.bias_tuning = BiasTuningConfig(**self.bias_tuning)
        self.w_bits = parse_bits(self.w_bits)
        self.a_bits = parse_bits(self.a_bits)
        self.first_last_bits = parse_bits(self.first_last_bits)
        self.embedding_bits = parse_bits(self.embedding_bits)
        self.layer_bits = {pattern: (parse_bits(w), parse_bits(a))
                           for pattern, (w, a) in dict(self.layer_bits).items()}
        if isinstance(self.steps, str):
            self.steps = tuple(s.strip() for s in self.steps.split(",") if s.strip())
        elif self.steps is not None:
            self.steps = tuple(self.steps)
        if self.ranges not in METHODS:
            raise Sub8Error(f"unknown range method {self.ranges!r}; choose one of {', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise Sub8Error(f"percentile must be in (50, 100], got {self.percentile}")
        if self.samples < 1:
            raise Sub8Error(f"samples must be at least 1, got {self.samples}")
        if self.output_loss is not None and self.output_loss not in OUTPUT_LOSSES:
            raise Sub8Error(f"output loss must be one of {', '.join(OUTPUT_LOSSES)}, got {self.output_loss!r}")
        if self.forward_batch < 1:
            raise Sub8Error(f"forward batch must be at least 1, got {self.forward_batch}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["layer_bits"] = {k: list(v) for k, v in self.layer_bits.items()}
        out["steps"] = None if self.steps is None else list(self.steps)
        return out


def parse_layer_bits(items: list[str]) -> dict[str, tuple[int | None, int | None]]:
    """Parse CLI items 'PATTERN=W' or 'PATTERN=W,A' (A defaults to W)."""
    out = {}
    for item in items:
        pattern, sep, bits = item.partition("=")
        if not sep or not pattern:
            raise Sub8Error(f"--layer-bits expects PATTERN=W[,A], got {item!r}")
        w, _, a = bits.partition(",")
        out[pattern] = (parse_bits(w), parse_bits(a or w))
    return out
