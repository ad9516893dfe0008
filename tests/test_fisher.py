import pytest
import torch
from torch import nn

from sub8 import QuantConfig, Sub8Error, calibrate_ranges, prepare
from sub8.calibrate import AdaQuantConfig, adaquant
from sub8.calibrate.fisher import fisher_weights, tapped_copy
from sub8.quant.layers import float_mode
from tinymodels import TinyNet, randomize_bn


def layerwise(**settings) -> AdaQuantConfig:
    """The paper's layer-wise AdaQuant at its own budget (the defaults fit blocks on a CPU)."""
    return AdaQuantConfig(**{"reconstruct": "layer", "budget": "full", **settings})


def sequential_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(), nn.Conv2d(4, 5, 1), nn.Flatten(),
                        nn.Linear(5 * 6 * 6, 7)).eval()
    return net, torch.randn(5, 3, 6, 6) * 2


def exact_fisher(net: nn.Sequential, x: torch.Tensor, after: int, kind: str) -> torch.Tensor:
    """E[(J^T u)^2] in float64 by enumeration: u = p - onehot(y) with probability p_y (kl), or
    u = each unit vector (mse: u ~ N(0, I) has E[u u^T] = I); J = d output / d (output of
    net[after]), sample by sample. Scaled to mean 1, as fisher_weights does."""
    net = net.double()
    rows = []
    for n in range(len(x)):
        a = net[:after + 1](x[n:n + 1].double()).detach().requires_grad_(True)
        out = net[after + 1:](a)[0]
        if kind == "kl":
            p = torch.softmax(out, 0)
            directions = [(p[y], p - torch.eye(len(p), dtype=p.dtype)[y]) for y in range(len(p))]
        else:
            directions = [(1.0, e) for e in torch.eye(len(out), dtype=out.dtype)]
        acc = torch.zeros_like(a)
        for weight, u in directions:
            acc += weight * torch.autograd.grad(out, a, u, retain_graph=True)[0] ** 2
        rows.append(acc)
    exact = torch.cat(rows)
    return (exact / exact.mean()).float()


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_fisher_weights_converge_to_the_exact_expectation(kind):
    """Monte Carlo over draws of u against enumeration; 0.8 to 1.3% off at 20000 draws (kl)."""
    net, x = sequential_net()
    p = prepare(net, x, QuantConfig(w_bits=4, a_bits=4, cache_dir=None))
    names = [i.name for i in p.layers]
    followed = {i.name: i.followed_by for i in p.layers}
    assert followed["0"] == "relu6"
    weights = fisher_weights(p.reference, names, followed, x, kind, 20000, len(x), 0, torch.float32)
    # conv 0's weights sit after its ReLU6 (index 1): the gradient there is not masked where it clamps
    for name, after in (("0", 1), ("2", 2), ("4", 4)):
        exact = exact_fisher(net, x, after, kind)
        got = weights[name].contiguous()
        assert got.shape == exact.shape
        assert (got - exact).norm() / exact.norm() < 0.03, name
        assert got.mean().item() == pytest.approx(1.0, rel=1e-5)


def test_taps_sit_after_the_activation_that_follows_in_the_graph():
    """In a residual net: the gradient each tap reports is the one at the consumer's input (after
    the ReLU that follows conv1; at conv2's own output, which feeds the add; after the
    functional relu that follows `grouped`), measured with hooks on the untouched model."""
    torch.manual_seed(0)
    model, x = randomize_bn(TinyNet()), torch.randn(4, 3, 16, 16)
    p = prepare(model, x, QuantConfig(w_bits=4, a_bits=4, cache_dir=None))
    followed = {i.name: i.followed_by for i in p.layers}
    assert (followed["block.conv1"], followed["block.conv2"], followed["grouped"]) == ("relu", None, "relu")
    u = torch.randn(4, 10)
    seen = []
    tapped = tapped_copy(p.reference, list(followed), followed, seen)
    with float_mode(tapped):
        out = tapped(x)
    assert [name for name, _, _ in seen] == list(followed)
    got = dict(zip(followed, torch.autograd.grad(out, [t for _, t, _ in seen], u)))

    at = {}  # the same tensors, found by hooks on the untouched model
    ref = p.reference
    hooks = [ref.get_submodule("block.conv2").register_forward_pre_hook(lambda m, a: at.__setitem__("conv1", a[0])),
             ref.get_submodule("block.conv2").register_forward_hook(lambda m, a, o: at.__setitem__("conv2", o)),
             ref.get_submodule("pool").register_forward_pre_hook(lambda m, a: at.__setitem__("grouped", a[0]))]
    with float_mode(ref):
        out = ref(x.clone().requires_grad_(True))
    for h in hooks:
        h.remove()
    grads = dict(zip(at, torch.autograd.grad(out, list(at.values()), u)))
    assert torch.equal(got["block.conv1"], grads["conv1"])
    assert (got["block.conv1"][at["conv1"] == 0] != 0).any()  # not masked where the ReLU clamps
    assert torch.equal(got["block.conv2"], grads["conv2"])
    assert torch.equal(got["grouped"], grads["grouped"])


def test_adaquant_with_fisher_loss_lowers_the_weighted_heldout_error():
    torch.manual_seed(0)
    model, x = randomize_bn(TinyNet()), torch.rand(120, 3, 16, 16)
    p = prepare(model, x[:1], QuantConfig(w_bits=4, a_bits=4, first_last_bits=8, cache_dir=None))
    calibrate_ranges(p, x, "mse")
    record = adaquant(p, x, layerwise(mode="parallel", iters=200, loss="fisher", fisher_draws=2), forward_batch=32,
                      show_progress=False)
    assert record["settings"]["loss"] == "fisher" and record["settings"]["fisher_draws"] == 2
    for layer in record["layers"]:
        assert layer["heldout_fisher_after"] < layer["heldout_fisher_before"], layer["name"]
        assert layer["heldout_mse_before"] > 0  # the plain error is still reported


def test_a_model_with_several_outputs_is_told_to_use_the_plain_loss():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 4)

        def forward(self, x):
            y = self.body(x)
            return y, y.sum(1)

    torch.manual_seed(0)
    x = torch.randn(20, 6)
    p = prepare(TwoHeads().eval(), x, QuantConfig(w_bits=4, a_bits=4, cache_dir=None))
    calibrate_ranges(p, x, "mse")
    with pytest.raises(Sub8Error, match="adaquant-loss mse"):
        adaquant(p, x, layerwise(iters=2), show_progress=False)
    adaquant(p, x, layerwise(iters=2, loss="mse"), show_progress=False)  # the plain loss runs
