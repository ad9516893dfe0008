import torch

from sub8.quant.quantizer import affine_params, fake_quantize, grid
from sub8.quant.ranges import estimate


def quant_mse(rows, lo, hi, bits):
    step, zero, signed = affine_params(lo, hi, bits, False)
    qmin, qmax = grid(bits, signed)
    return (fake_quantize(rows, step[:, None], zero[:, None], qmin, qmax) - rows).pow(2).mean(1)


def test_mse_clipping_beats_minmax_on_heavy_tails():
    rows = torch.distributions.Laplace(0.0, 1.0).sample((8, 4096))
    for bits in (3, 4, 8):
        mm = quant_mse(rows, *estimate(rows, "minmax", bits, False), bits)
        ms = quant_mse(rows, *estimate(rows, "mse", bits, False), bits)
        assert (ms <= mm + 1e-12).all()
        if bits <= 4:  # clipping pays most at low bit-widths
            assert ms.mean() < 0.7 * mm.mean()


def test_mse_search_matches_brute_force_on_its_grid():
    rows = torch.randn(3, 500) ** 3
    lo, hi = estimate(rows, "mse", 4, False)
    lo0, hi0 = rows.amin(1), rows.amax(1)
    best = torch.full((3,), float("inf"))
    for alpha in torch.linspace(1.0, 0.01, 100):
        best = torch.minimum(best, quant_mse(rows, lo0 * alpha, hi0 * alpha, 4))
    assert torch.allclose(quant_mse(rows, lo, hi, 4), best)


def test_percentile_is_inside_minmax():
    rows = torch.randn(2, 100000)
    lo, hi = estimate(rows, "percentile", 8, False, pct=99.9)
    assert (hi < rows.amax(1)).all() and (lo > rows.amin(1)).all()
    assert torch.allclose(hi, torch.full((2,), 3.09), atol=0.1)  # 99.9th pct of N(0, 1)
