"""The method registry: a method is one module that registers a step by name.

A step is one function over the run context (`RunContext`, below): it reads `ctx.config`, changes
`ctx.prepared` in place and may return a record, which report.json keeps under the step's
name. A method with settings declares them as a dataclass whose fields carry their CLI flag
and help (`setting(...)`); the CLI options, `QuantConfig`'s to/from dict, report.json's config
record and every cache key (allocation candidates included) are derived from here, so adding a
method touches its own file only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import Sub8Error


def setting(default=dataclasses.MISSING, *, flag: str | None = None, help: str = "", choices=None,
            type=None, multiple: bool = False, is_flag: bool = False, parse=None, show=None,
            default_factory=dataclasses.MISSING):
    """A settings field with what the CLI needs to offer it. `flag` defaults to
    --METHOD-FIELD; `parse` maps the CLI string to the value, `show` the default back."""
    meta = {"flag": flag, "help": help, "choices": choices, "type": type, "multiple": multiple,
            "is_flag": is_flag, "parse": parse, "show": show}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"cli": meta})
    return field(default=default, metadata={"cli": meta})


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[Any], dict | None]
    settings: type | None = None   # the settings dataclass, kept in QuantConfig under `settings_key`
    settings_key: str | None = None
    # None: the method needs the other layers' bits (it cannot come before 'allocate'); else a
    # check of the config, raising Sub8Error when this config's run of it is not per-layer.
    per_layer: Callable[[Any], None] | None = None


METHODS: dict[str, Method] = {}


def register(name: str, *, settings: type | None = None, settings_key: str | None = None,
             per_layer: Callable[[Any], None] | None = None, replace: bool = False):
    """Decorator: register `fn(ctx) -> record | None` as the step `name`. `settings_key` shares
    another method's settings (adaquant_sequential reads adaquant's)."""
    def decorator(fn):
        if name in METHODS and not replace:
            raise Sub8Error(f"a method named {name!r} is registered already")
        if settings is not None and not dataclasses.is_dataclass(settings):
            raise Sub8Error(f"method {name!r}: settings must be a dataclass")
        key = settings_key or (name if settings is not None else None)
        METHODS[name] = Method(name, fn, settings, key, per_layer)
        return fn
    return decorator


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def get(name: str) -> Method:
    if name not in METHODS:
        raise Sub8Error(f"unknown step {name!r}; steps are: {', '.join(METHODS)}")
    return METHODS[name]


def settings_classes() -> dict[str, type]:
    """{settings key: dataclass} of every registered method that has settings."""
    return {m.settings_key: m.settings for m in METHODS.values() if m.settings is not None}


def settings_dict(value) -> dict:
    """A settings dataclass as plain JSON-able data (tuples as lists)."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}


def build_settings(cls: type, data) -> object:
    """A settings dataclass from a dict (unknown keys are an error that names them)."""
    if isinstance(data, cls):
        return data
    if dataclasses.is_dataclass(data):
        data = settings_dict(data)
    if not isinstance(data, dict):
        raise Sub8Error(f"{cls.__name__} expects a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise Sub8Error(f"unknown {cls.__name__} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)


def recipe_settings(config, steps) -> dict:
    """{step: its settings as data} for the given steps: what a cache of their results is keyed by."""
    out = {}
    for name in steps:
        m = get(name)
        out[name] = None if m.settings_key is None else settings_dict(config.methods[m.settings_key])
    return out


def cli_fields(cls: type):
    """(field, its CLI metadata) of a settings dataclass."""
    for f in dataclasses.fields(cls):
        yield f, f.metadata.get("cli", {})


@dataclass
class RunContext:
    """What every step receives: the run's config, its prepared model and calibration data, and
    the run's services. A step changes `prepared` in place."""
    config: Any
    prepared: Any                      # prepare.PreparedModel
    calib: Any                         # the calibration samples, one tensor
    model: Any = None                  # the user's float model
    adapter: Any = None                # adapters.ModelAdapter of `model`
    executor: Any = None               # executor.Executor for the step's independent work
    recipe: tuple[str, ...] = ()       # per-layer steps that bit allocation replays per precision
    checkpoints: Any = None            # resume.Checkpoints
    done: tuple[str, ...] = ()         # the steps finished before the current one
    fresh: bool = False                # read nothing from the disk cache
    candidate: bool = False            # a per-layer recipe that bit allocation replays at one precision

    def inside(self):
        """Checkpoints inside the current step (AdaQuant resumes after its last finished group)."""
        return None if self.checkpoints is None else self.checkpoints.scope("inside", self.done)
