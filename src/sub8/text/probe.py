"""The probe task for sentence encoders, which have no head of their own: a logistic-regression
head is fit on the float encoder's embeddings of a labelled train split and frozen; the accuracy
of the quantized encoder's embeddings through that head on a test split is the accuracy a
downstream classifier built on the float model keeps."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import Sub8Error


class Probe:
    def __init__(self, head, classes: list[str] | None = None):
        self.head = head
        self.classes = classes

    @classmethod
    def fit(cls, embeddings: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None,
            seed: int = 0) -> "Probe":
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError:
            raise Sub8Error("the probe needs scikit-learn: pip install 'sub8[text]'") from None
        labels = np.asarray(labels)
        if len(np.unique(labels)) < 2:
            raise Sub8Error("the probe's train split needs at least two classes")
        head = LogisticRegression(max_iter=2000, random_state=seed).fit(embeddings.double().numpy(), labels)
        return cls(head, classes)

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.head.predict(embeddings.double().numpy()))

    def accuracy(self, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(embeddings) == torch.as_tensor(labels)).double().mean().item()
