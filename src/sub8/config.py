"""What a run is asked to do: one dataclass shared by the Python API and the CLI.

The settings that every run has (bits, grids, ranges, data sizes, device) are fields here. Each
registered method's settings live in `methods` under the method's settings key (`adaquant`,
`allocation`, `bias_tuning`, `gptq`, ...): built from the registry, so a method added at run time
gets its settings, its CLI options and its place in report.json without touching this file.
`config.adaquant` reads `config.methods["adaquant"]`, and `QuantConfig(adaquant={...})` sets it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from .allocate.allocation import SOLVERS, AllocationConfig  # noqa: F401  (re-exported)
from .cache import default_cache_dir
from .calibrate.adaquant import ADAQUANT_LOSSES, ADAQUANT_MODES, LR_SCHEDULES, AdaQuantConfig  # noqa: F401
from .calibrate.bias_tuning import INPUT_RANGES, BiasTuningConfig  # noqa: F401
from .errors import Sub8Error
from .evaluate import OUTPUT_LOSSES
from .quant.quantizer import parse_bits
from .quant.ranges import METHODS as RANGE_METHODS
from .registry import build_settings, settings_classes, settings_dict

# report.json's `config` and the artifact header carry this; from_dict reads every older one.
CONFIG_VERSION = 3


@dataclass
class QuantConfig:
    # 8 bits: what a user can ship without a second look; fewer bits are asked for explicitly.
    w_bits: int | None = 8
    a_bits: int | None = 8
    # First and last quantizable layers (in graph order); None keeps them in float.
    first_last_bits: int | None = 8
    # fnmatch pattern on layer names -> (w_bits, a_bits); applied after first/last, in order.
    layer_bits: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    # Embedding tables' weights (per-row grids); None keeps them in float.
    embedding_bits: int | None = 8
    # Quantize the operands of attention's two matrix products (queries, keys, softmax
    # probabilities, values) at a_bits, in transformers models.
    quantize_attention: bool = True
    # Range estimator of every grid; auto: at 8 bits min-max weights and percentile activations,
    # MSE-optimal clipping below.
    ranges: str = "auto"
    percentile: float = 99.99
    # Weight grids with zero point 0 (True), a zero point per channel (False), or None: symmetric
    # at 8 bits and asymmetric below (prepare.weight_symmetric says why).
    w_symmetric: bool | None = None
    a_symmetric: bool = False
    # Quantize the tensors between layers that would stay float (both inputs of every residual
    # add, the final pool's input; prepare/requantize.py), so that an integer runtime keeps the
    # whole network in integers; None (auto): when every layer is W8A8, without bit allocation.
    requantize: bool | None = None
    # Refuse to run when a weight-bearing operation would stay in float without being asked
    # to (report.json's coverage lists them either way).
    strict: bool = False
    pipeline: str = "auto"
    steps: tuple[str, ...] | None = None  # an explicit step list overrides the pipeline's
    samples: int = 256
    forward_batch: int = 32  # images per forward pass (calibration, evaluation)
    # The label-free loss between float and quantized outputs (sensitivities, bias tuning):
    # kl of the softmax outputs (classifiers) or mse (feature extractors); None lets the model's
    # adapter pick (mse for a sentence encoder's embeddings, kl otherwise).
    output_loss: str | None = None
    seed: int = 0
    device: str = "cpu"
    # Where expensive intermediate results (allocation candidates, sensitivities, checkpoints)
    # are kept; None: nowhere.
    cache_dir: str | None = field(default_factory=default_cache_dir)
    # Settings key -> that method's settings dataclass (see the module docstring).
    methods: dict = field(default_factory=dict)

    def __post_init__(self):
        classes = settings_classes()
        unknown = sorted(set(self.methods) - set(classes))
        if unknown:
            raise Sub8Error(f"no registered method has settings named {', '.join(unknown)}; "
                            f"known: {', '.join(classes)}")
        self.methods = {key: build_settings(cls, self.methods[key]) if key in self.methods else cls()
                        for key, cls in classes.items()}
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
        if self.ranges not in RANGE_METHODS:
            raise Sub8Error(f"unknown range method {self.ranges!r}; choose one of {', '.join(RANGE_METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise Sub8Error(f"percentile must be in (50, 100], got {self.percentile}")
        if self.samples < 1:
            raise Sub8Error(f"samples must be at least 1, got {self.samples}")
        if self.output_loss is not None and self.output_loss not in OUTPUT_LOSSES:
            raise Sub8Error(f"output loss must be one of {', '.join(OUTPUT_LOSSES)}, got {self.output_loss!r}")
        if self.forward_batch < 1:
            raise Sub8Error(f"forward batch must be at least 1, got {self.forward_batch}")

    def __getattr__(self, name):
        # Only called when normal lookup fails: a method's settings by its key.
        methods = self.__dict__.get("methods")
        if methods is not None and name in methods:
            return methods[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "methods"}
        out["layer_bits"] = {k: list(v) for k, v in self.layer_bits.items()}
        out["steps"] = None if self.steps is None else list(self.steps)
        out["methods"] = {key: settings_dict(value) for key, value in self.methods.items()}
        return {"version": CONFIG_VERSION, **out}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        """A config from `to_dict`'s output of this or any earlier version. Unknown settings are
        an error that names them; settings missing from an older record take today's defaults."""
        data = dict(data)
        version = data.pop("version", 1)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise Sub8Error(f"this config has version {version!r}, newer than this sub8 reads "
                            f"({CONFIG_VERSION}); upgrade sub8")
        if version <= 2:  # written before junctions were requantized: they were float
            data.setdefault("requantize", False)
        if version == 1:  # method settings were top-level fields
            data["methods"] = {k: data.pop(k) for k in ("adaquant", "allocation", "bias_tuning") if k in data}
        data["layer_bits"] = {k: tuple(v) for k, v in (data.get("layer_bits") or {}).items()}
        methods = data.get("methods") or {}
        if "allocation" in methods:
            a = dict(methods["allocation"])
            for key in ("precisions", "ties"):
                if key in a:
                    a[key] = tuple(tuple(p) if isinstance(p, list) else p for p in a[key])
            if "base" in a:
                a["base"] = tuple(a["base"])
            methods["allocation"] = a
        data["methods"] = methods
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise Sub8Error(f"unknown config setting(s) {', '.join(unknown)} (config version {version})")
        return cls(**data)


_dataclass_init = QuantConfig.__init__


def _init(self, *args, methods=None, **kwargs):
    """QuantConfig(..., adaquant={...}): a registered method's settings by their key."""
    methods = dict(methods or {})
    for key in settings_classes():
        if key in kwargs:
            methods[key] = kwargs.pop(key)
    _dataclass_init(self, *args, methods=methods, **kwargs)


_init.__wrapped__ = _dataclass_init
QuantConfig.__init__ = _init


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
