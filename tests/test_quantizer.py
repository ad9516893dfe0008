import pytest
import torch

from sub8 import Sub8Error
from sub8.quant import Quantizer, parse_bits
from sub8.quant.quantizer import _FakeQuantSTE, round_ste
from sub8.quant.ranges import estimate


def calibrated(x, bits, axis=None, symmetric=False, method="minmax"):
    channels = x.shape[0] if axis is not None else 1
    q = Quantizer(bits, channels=channels, channel_axis=axis, symmetric=symmetric)
    rows = x.reshape(channels, -1)
    q.set_range(*estimate(rows, method, bits, symmetric))
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_within_half_step(bits, symmetric):
    x = torch.randn(16, 3, 3, 3) * torch.logspace(-2, 1, 16)[:, None, None, None]
    q = calibrated(x, bits, axis=0, symmetric=symmetric)
    err = (q(x) - x).abs()
    step = q.step.view(-1, 1, 1, 1)
    assert (err <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_reproduce_fake_quant_exactly(bits):
    x = torch.randn(8, 5, 3, 3)
    q = calibrated(x, bits, axis=0, method="mse")
    codes = q.codes(x)
    assert torch.equal(codes, codes.round())
    assert codes.min() >= q.qmin and codes.max() <= q.qmax
    assert torch.equal(q.dequantize(codes), q(x))  # bit for bit


def test_per_channel_steps_differ_per_channel():
    x = torch.randn(6, 10) * torch.tensor([0.01, 0.1, 1, 10, 100, 1000])[:, None]
    q = calibrated(x, 8, axis=0)
    assert len(set(q.step.tolist())) == 6
    ratio = q.step[-1] / q.step[0]
    assert 1e4 < ratio < 1e6


def test_unsigned_after_relu_and_signed_symmetric():
    relu_out = torch.rand(1000)
    q = calibrated(relu_out, 4, symmetric=True)
    assert not q.signed and (q.qmin, q.qmax) == (0, 15)
    q = calibrated(torch.randn(1000), 4, symmetric=True)
    assert q.signed and (q.qmin, q.qmax) == (-8, 7) and q.zero_point.item() == 0
    q = calibrated(relu_out, 4, symmetric=False)
    assert q.zero_point.item() == 0  # min 0 maps to code 0


def test_zero_is_exact():
    x = torch.randn(4, 100) + 0.3
    q = calibrated(x, 3, axis=0)
    assert torch.equal(q(torch.zeros(4, 1)), torch.zeros(4, 1))


def test_straight_through_gradients_reach_step_and_zero_point():
    x = torch.randn(4, 50)
    q = calibrated(x, 4, axis=0)
    x = (x * 1.5).requires_grad_(True)  # some values beyond the calibrated range: clamped
    loss = (q(x) - x.detach() * 1.1).pow(2).sum()
    loss.backward()
    assert q.step.grad is not None and q.step.grad.abs().sum() > 0
    assert q.zero_point.grad is not None and q.zero_point.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("x_shape, step_shape", [((6, 5, 3, 3), (6, 1, 1, 1)), ((4, 7, 5, 5), ())])
def test_fused_fake_quant_matches_op_by_op_autograd_in_float64(x_shape, step_shape):
    """The hand-written backward equals autograd through the op-by-op formula (float64), except
    on values that land exactly on qmin/qmax: those count as inside the grid (gradient 1 to x,
    as torch's own fake-quant), where torch.clamp's backward treats them as clamped."""
    torch.manual_seed(0)
    x = (torch.randn(x_shape, dtype=torch.float64) * 3).requires_grad_()
    step = (torch.rand(step_shape, dtype=torch.float64) * 0.3 + 0.1).requires_grad_()
    zero = (torch.rand(step_shape, dtype=torch.float64) * 4 + 2).requires_grad_()
    fused = _FakeQuantSTE.apply(x, step, zero, 0, 15)
    z = round_ste(zero)
    reference = (torch.clamp(round_ste(x / step) + z, 0, 15) - z) * step
    assert torch.equal(fused, reference)
    codes = (torch.round(x / step) + torch.round(zero)).detach()
    on_edge = (codes == 0) | (codes == 15)
    assert on_edge.any()
    grad = torch.randn_like(fused) * ~on_edge
    for a, b in zip(torch.autograd.grad(fused, (x, step, zero), grad, retain_graph=True),
                    torch.autograd.grad(reference, (x, step, zero), grad)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    edge_grad = torch.autograd.grad(fused, x, on_edge.double())[0]
    assert torch.equal(edge_grad[on_edge], torch.ones(int(on_edge.sum()), dtype=torch.float64))


def test_fused_fake_quant_that_may_overwrite_its_gradient_gives_the_same_step_and_zero_gradients():
    """AdaQuant's input quantizer: x is cached data (no gradient), and the backward masks the
    incoming gradient in place; the step and zero-point gradients are those of the copying path."""
    torch.manual_seed(0)
    x = torch.randn(4, 7, 5, 5, dtype=torch.float64) * 3
    step = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    zero = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 7, 5, 5, dtype=torch.float64)
    copying = torch.autograd.grad(_FakeQuantSTE.apply(x, step, zero, 0, 15), (step, zero), grad)
    scratch = grad.clone()
    in_place = torch.autograd.grad(_FakeQuantSTE.apply(x, step, zero, 0, 15, True), (step, zero), scratch)
    for a, b in zip(in_place, copying):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12) and a.abs() > 0
    assert not torch.equal(scratch, grad)  # it was used as scratch (the gradient masked)


def test_float_bits_pass_through():
    q = Quantizer(parse_bits("float"))
    x = torch.randn(10)
    assert q(x) is x


@pytest.mark.parametrize("bad", [1, 9, 0, -4, "abc", 12, 4.5])
def test_bits_out_of_range(bad):
    with pytest.raises(Sub8Error):
        parse_bits(bad)


def test_state_dict_carries_the_grid():
    x = torch.randn(3, 20)
    q = calibrated(x, 5, axis=0, symmetric=True)
    q2 = Quantizer(8, channels=3, channel_axis=0)
    q2.load_state_dict(q.state_dict())
    assert (q2.bits, q2.signed, q2.symmetric) == (5, True, True)
    assert torch.equal(q2(x), q(x))


def test_fused_per_tensor_kernel_agrees_with_codes_bit_for_bit():
    """Per-tensor grids run torch's fused kernel in training; codes()/dequantize() (export) and
    the no-grad forward must give the very same values, ties included."""
    torch.manual_seed(0)
    x = torch.randn(64, 8, 16, 16) * 3
    for step_value in (0.0371, 0.1, 1 / 3, 0.007):
        q = Quantizer(4)
        q.set_range(torch.tensor(x.min().item()), torch.tensor(x.max().item()))
        q.step.data.fill_(step_value)
        ties = (torch.arange(-1024, 1024).float() + 0.5) * step_value  # halfway between codes
        xs = torch.cat([x.reshape(-1), ties]).reshape(-1, 8, 16, 16)
        trained = q(xs.clone().requires_grad_())
        with torch.no_grad():
            plain = q(xs)
        assert torch.equal(trained.detach(), plain)
        assert torch.equal(q.dequantize(q.codes(xs)), plain)
        # The fused kernel that CUDA training runs (here on CPU) gives the same values too.
        fused, _ = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            xs, q.step.detach().reshape(1), q.zero_point.detach().round().reshape(1).int(),
            torch.ones(1, dtype=torch.long), q.qmin, q.qmax)
        assert torch.equal(fused, plain)
