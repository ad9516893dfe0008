"""Fidelity of a quantized model to its float model, and accuracy when labels exist."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import progress
from .choices import OUTPUT_LOSSES
from .errors import Sub8Error


CONFIDENT = 0.5  # float top probability at or above this marks a "confident" image


@torch.no_grad()
def predict(module, images: torch.Tensor, batch_size: int = 32, device: str = "cpu",
            desc: str | None = None) -> torch.Tensor:
    """The model's outputs for all images, on the CPU in float32 (`desc`: with a progress bar)."""
    outs = []
    with progress.bar(len(images), desc, "sample") as shown:
        for i in range(0, len(images), batch_size):
            outs.append(module(images[i:i + batch_size].to(device)).float().cpu())
            shown.update(len(outs[-1]))
    return torch.cat(outs)


def compare(float_logits: torch.Tensor, quant_logits: torch.Tensor,
            labels: torch.Tensor | None = None, output: str = "logits", probe=None) -> dict:
    """Agreement of the quantized model's predictions with the float model's (for sentence
    embeddings, `output="embedding"`: see compare_embeddings; with labels and a fitted
    text.probe.Probe, `accuracy` is the embeddings' accuracy through that frozen head).

    top1_agreement: same argmax; top5_agreement: the float argmax is in the quantized top 5;
    kl: mean KL(float || quantized) of the softmax outputs; the *_confident figure counts only
    images whose float top probability is at least CONFIDENT.
    """
    if output == "embedding":
        out = compare_embeddings(float_logits, quant_logits)
        if labels is not None and probe is not None:
            out["accuracy"] = probe.accuracy(quant_logits, labels)
        return out
    f_logp = F.log_softmax(float_logits.double(), dim=1)
    q_logp = F.log_softmax(quant_logits.double(), dim=1)
    f_top1 = float_logits.argmax(dim=1)
    agree = quant_logits.argmax(dim=1) == f_top1
    k = min(5, quant_logits.shape[1])
    top5 = (quant_logits.topk(k, dim=1).indices == f_top1[:, None]).any(dim=1)
    kl = (f_logp.exp() * (f_logp - q_logp)).sum(dim=1)
    confident = f_logp.exp().max(dim=1).values >= CONFIDENT
    n_conf = int(confident.sum())
    out = {
        "n_images": len(float_logits),
        "top1_agreement": agree.double().mean().item(),
        "top5_agreement": top5.double().mean().item(),
        "kl": kl.mean().item(),
        "n_confident": n_conf,
        "top1_agreement_confident": agree[confident].double().mean().item() if n_conf else None,
    }
    if labels is not None:
        out["accuracy"] = (quant_logits.argmax(dim=1) == labels).double().mean().item()
    return out


def compare_embeddings(float_emb: torch.Tensor, quant_emb: torch.Tensor) -> dict:
    """cosine_similarity: mean cosine between each sample's float and quantized embedding;
    relative_mse: squared error over the float embeddings' mean squared norm."""
    f, q = float_emb.double(), quant_emb.double()
    return {"n_samples": len(f),
            "cosine_similarity": F.cosine_similarity(f, q, dim=1).mean().item(),
            "relative_mse": ((f - q) ** 2).sum(1).mean().item() / (f ** 2).sum(1).mean().item()}


def output_loss(kind: str, quant: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A label-free loss of quantized vs float outputs, summed over the batch (in float64):
    KL(float || quantized) of the softmax outputs, or the mean squared error per sample."""
    return per_sample_loss(kind, quant, reference).sum()


def per_sample_loss(kind: str, quant: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """output_loss of each sample (a float64 vector)."""
    quant, reference = quant.double(), reference.double()
    if kind == "kl":
        f = F.log_softmax(reference.flatten(1), dim=1)
        q = F.log_softmax(quant.flatten(1), dim=1)
        return (f.exp() * (f - q)).sum(dim=1)
    if kind == "mse":
        return ((quant - reference) ** 2).flatten(1).mean(dim=1)
    raise Sub8Error(f"unknown output loss {kind!r}; choose one of {', '.join(OUTPUT_LOSSES)}")
