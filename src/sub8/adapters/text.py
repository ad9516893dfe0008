"""Hugging Face text models: Linear layers wrapped in place (they do not trace), attention's
matrix-product operands quantized, samples read from .csv/.jsonl files through the tokenizer.
The model's own forward declares which tokens are real (quant.token_mask), so statistics and
losses never count padding."""

from __future__ import annotations

import os

from ..errors import Sub8Error
from ..prepare import prepare_untraced
from ..text.model import SentenceEncoder, SequenceClassifier
from .base import ModelAdapter, Samples


class TextAdapter(ModelAdapter):
    kind = "text"

    @classmethod
    def accepts(cls, model) -> bool:
        return isinstance(model, (SentenceEncoder, SequenceClassifier))

    def default_ranges(self) -> str:
        # A transformer's few outlier features carry its meaning: a percentile range clips them
        # (MiniLM W8A8 embedding cosine 0.943 with percentile ranges, 0.992 with MSE ranges).
        return "mse"

    def prepare(self, model, example, config):
        from ..text.attention import quantize_attention

        def attention(module, example):
            return quantize_attention(module, example, config.a_bits, config.a_symmetric)

        quantized = config.quantize_attention and config.a_bits is not None
        return prepare_untraced(model, example, config, attention if quantized else None)

    def load_samples(self, path, loaded, role, limit=None, seed=0, text_column="text", label_column=None,
                     max_length=128, classes=None, **options) -> Samples:
        from ..text.data import load_texts

        texts = load_texts(path, loaded.tokenizer, text_column, label_column, max_length, limit=limit, seed=seed,
                           classes=classes)
        return Samples(texts.tokens, texts.labels, texts.classes, label_source=label_column or "none")

    def describe_input(self, loaded) -> str:
        return repr(loaded.tokenizer)

    def fit_probe(self, loaded, path, eval_path, config, text_column="text", label_column=None,
                  max_length=128, **options):
        """The probe head fit on the float encoder's embeddings of `path`, and its report record."""
        from ..evaluate import predict
        from ..text.probe import Probe

        if self.output_of(loaded.module) != "embedding":
            raise Sub8Error("--probe-train is for sentence encoders; a classifier has its own head")
        if label_column is None or eval_path is None:
            raise Sub8Error("--probe-train needs --eval (the test split) and --label-column")
        train = self.load_samples(path, loaded, "probe", seed=config.seed, text_column=text_column,
                                  label_column=label_column, max_length=max_length)
        embeddings = predict(loaded.module, train.tensor, config.forward_batch, "cpu")
        probe = Probe.fit(embeddings, train.labels, train.classes, seed=config.seed)
        record = {"train": os.path.abspath(path), "n_samples": len(train.tensor), "classes": train.classes,
                  "head": "logistic regression on the float model's embeddings, frozen"}
        return probe, record
