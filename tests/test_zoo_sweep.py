"""A slice of benchmarks/bench_zoo.py: real architectures (random weights, small inputs), one of
each way sub8 reaches their weights: a traced graph, a traced graph with a function it keeps
whole (Swin's attention), scaled dot-product attention in the graph (timm's ViT), and a model
torch.fx cannot trace (timm's MobileViT). Slow, still run in CI."""

import pytest
import torch

from sub8 import QuantConfig, quantize
from sub8.evaluate import predict
from sub8.quant import float_mode

pytestmark = pytest.mark.slow


def build(spec):
    torch.manual_seed(0)
    kind, name = spec.split(":")
    if kind == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model(name, pretrained=False)
    else:
        import torchvision
        model = torchvision.models.get_model(name, weights=None)
    with torch.no_grad():  # zero-initialized heads would make every output the same
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.02)
    return model.eval()


# spec, input size, capture path, attention products expected
CASES = [("torchvision:mobilenet_v3_small", 96, "fx", 0),
         ("torchvision:swin_t", 64, "fx", 24),
         ("timm:vit_tiny_patch16_224", 224, "fx", 24),
         ("timm:mobilevit_xxs", 64, "modules", 18)]


@pytest.mark.parametrize("spec,size,capture,products", CASES, ids=[c[0] for c in CASES])
def test_architecture_is_quantized_whole(spec, size, capture, products):
    model = build(spec)
    g = torch.Generator().manual_seed(1)
    calib, evals = torch.randn(8, 3, size, size, generator=g), torch.randn(4, 3, size, size, generator=g)
    float_logits = predict(model, evals)
    q = quantize(model, calib, QuantConfig(steps=("ranges",), cache_dir=None), eval_images=evals,
                 float_logits=float_logits)
    report = q.report
    assert report["capture"]["path"] == capture
    coverage = report["coverage"]
    assert coverage["float"] == [] and coverage["macs"]["share"] == 1.0
    assert coverage["params"]["share"] > 0.98  # the rest: biases, norms, position tables
    assert coverage["products"]["quantized"] == products and coverage["products"]["float"] == 0
    quantized = predict(q.module, evals)
    centred = [t - t.mean(1, keepdim=True) for t in (quantized, float_logits)]
    correlation = torch.nn.functional.cosine_similarity(*centred, dim=1)
    assert not torch.equal(quantized, float_logits) and correlation.min() > 0.9, correlation
    with float_mode(q.module):
        assert torch.allclose(predict(q.module, evals), float_logits, rtol=1e-3, atol=1e-4)


def test_block_reconstruction_runs_on_a_model_without_a_graph():
    model = build("timm:mobilevit_xxs")
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(8, 3, 64, 64, generator=g)
    q = quantize(model, calib, QuantConfig(w_bits=4, a_bits=8, pipeline="adaquant", cache_dir=None,
                                           adaquant={"iters": 1, "batch_size": 4}))
    record = q.report["adaquant"]
    assert record["settings"]["reconstruct"] == "block"
    blocks = [u for u in record["units"] if u["kind"] == "block"]
    assert blocks and all(len(u["layers"]) >= 2 for u in blocks)
