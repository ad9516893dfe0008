import importlib
import math

import pytest
import torch
import torchvision
from torch import nn

from sub8 import QuantConfig, Sub8Error, calibrate_ranges, prepare
from sub8.calibrate import AdaQuantConfig, adaquant
from sub8.prepare.blocks import find_units
from tinymodels import ResidualBlock, TinyNet, randomize_bn

rc = importlib.import_module("sub8.calibrate.reconstruct")


class TwoBlocks(nn.Module):
    """A stem, two residual blocks (a class built twice: blocks) and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.block1 = ResidualBlock(8)
        self.block2 = ResidualBlock(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def rtn(model, x, w_bits=4, a_bits=4, **config):
    p = prepare(model, x[:1], QuantConfig(w_bits=w_bits, a_bits=a_bits, first_last_bits=w_bits, **config))
    calibrate_ranges(p, x, "minmax")
    return p


def names(units):
    return [(u.name, u.kind, len(u.layers)) for u in units]


def test_blocks_of_mobilenet_v2_and_resnet18():
    x = torch.randn(1, 3, 224, 224)
    p = prepare(torchvision.models.mobilenet_v2(), x, QuantConfig())
    units = find_units(p.module, p.layers)
    assert names(units) == ([("features.0.0", "layer", 1), ("features.1", "block", 2)]
                            + [(f"features.{i}", "block", 3) for i in range(2, 18)]
                            + [("features.18.0", "layer", 1), ("classifier.1", "layer", 1)])
    # an inverted residual with a skip ends at its add; one without, at its projection conv
    assert units[3].output == "add" and units[2].output == "features_2_conv_2"
    assert sum(len(u.layers) for u in units) == len(p.layers) == 53

    p = prepare(torchvision.models.resnet18(), x, QuantConfig(requantize=True))
    units = find_units(p.module, p.layers)
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert [u.name for u in units] == ["conv1", *blocks, "fc"]
    down = units[3]  # layer2.0: the downsampling basic block
    assert down.layers == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert down.output == "layer2_0_relu_1"  # after the add, the block's last ReLU
    # the junction quantizers of its add belong to it
    assert any(n.startswith("requant_add") for n in down.nodes)
    assert [u.name for u in find_units(p.module, p.layers, block=False)] == [i.name for i in p.layers]


@pytest.mark.slow
def test_blocks_of_minilm_are_its_transformer_layers():
    from sub8.zoo import load_model

    loaded = load_model("zoo:minilm")
    tokens = torch.ones(1, 2, 8, dtype=torch.long)  # ids and mask of one 8-token sentence
    p = prepare(loaded.module, tokens, QuantConfig())
    units = find_units(p.module, p.layers)
    layer = [f"model.encoder.layer.{i}" for i in range(6)]
    assert [u.name for u in units] == layer
    attention = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]
    assert units[0].layers == [f"{layer[0]}.{a}" for a in attention]


def test_one_layer_units_give_layerwise_adaquant_exactly():
    """TinyNet's residual block is built once, so every unit is a single layer: the block engine
    then fits what sequential AdaQuant fits, on the same batches, to the same values."""
    torch.manual_seed(0)
    model = randomize_bn(TinyNet())
    x = torch.rand(40, 3, 32, 32)
    cfg = dict(mode="sequential", iters=25, batch_size=8, lr_weight=1e-2, lr_input_quant=1e-1, qdrop=0.0)
    layerwise, blockwise = rtn(model, x), rtn(model, x)
    adaquant(layerwise, x, AdaQuantConfig(**cfg, reconstruct="layer"), show_progress=False)
    record = adaquant(blockwise, x, AdaQuantConfig(**cfg, reconstruct="block"), show_progress=False)
    assert all(u["kind"] == "layer" for u in record["units"]) and len(record["layers"]) == 6
    a, b = layerwise.module.state_dict(), blockwise.module.state_dict()
    moved = 0
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(v, b[k], rtol=1e-5, atol=1e-6), k
            moved += int(not torch.equal(v, rtn(model, x).module.state_dict()[k]))
    assert moved > 10  # the fit changed weights, biases and steps


def test_one_layer_units_match_layerwise_adaquant_with_8_bit_weights_on_4_bit_inputs():
    """Both move such weights in the same coarser unit (variables.weight_unit). (The engines
    sum in different orders; on the 8-bit grid that differs by up to 5e-5 of a tensor's
    largest value here, 2e-6 at 4 bits.)"""
    torch.manual_seed(1)
    model = randomize_bn(TinyNet())
    x = torch.rand(24, 3, 32, 32)
    cfg = dict(mode="sequential", iters=10, batch_size=8, lr_weight=1e-2, lr_input_quant=1e-1, qdrop=0.0)
    layerwise, blockwise = rtn(model, x, w_bits=8), rtn(model, x, w_bits=8)
    adaquant(layerwise, x, AdaQuantConfig(**cfg, reconstruct="layer"), show_progress=False)
    adaquant(blockwise, x, AdaQuantConfig(**cfg, reconstruct="block"), show_progress=False)
    a, b = layerwise.module.state_dict(), blockwise.module.state_dict()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(v, b[k], rtol=1e-4, atol=1e-4 * v.abs().max().item()), k


def test_free_weights_move_in_4_bit_units_only_where_the_input_is_coarser():
    """The unit is the channel's own step, but a 4-bit grid's step over the same range (float64:
    (hi - lo) / 15) where the weights have more than 4 bits and more than the input."""
    from sub8.calibrate.variables import weight_unit
    from sub8.quant.layers import QuantLayer

    lo, hi = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 2.5])
    for w_bits, a_bits, levels in ((2, 4, 3), (4, 4, 15), (4, 2, 15), (8, 8, 255), (8, None, 255),
                                   (8, 4, 15), (6, 4, 15), (6, 2, 15)):
        layer = QuantLayer(nn.Linear(3, 2), w_bits, a_bits)
        layer.weight_quantizer.set_range(lo, hi)
        unit = weight_unit(layer)
        assert unit.shape == (2, 1)
        assert torch.allclose(unit.flatten().double(), (hi - lo).double() / levels, rtol=1e-6), (w_bits, a_bits)


def test_learned_rounding_codes_are_within_one_step_of_round_to_nearest():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.rand(48, 3, 32, 32)
    p = rtn(model, x)
    start = {n: (m.weight_quantizer.codes(m.layer.weight).clone(), m.weight_quantizer.step.clone())
             for n, m in p.quant_layers().items()}
    record = adaquant(p, x, AdaQuantConfig(mode="sequential", iters=60, batch_size=8, reconstruct="block",
                                           rounding="learned", loss="mse"), show_progress=False)
    assert [u["kind"] for u in record["units"]] == ["layer", "block", "block", "layer"]
    changed = 0
    for n, m in p.quant_layers().items():
        codes = m.weight_quantizer.codes(m.layer.weight)
        rtn_codes, step0 = start[n]
        assert torch.equal(codes, codes.round())
        assert (codes - rtn_codes).abs().max() <= 1, n
        changed += int((codes != rtn_codes).sum())
        # the weight lies on its grid point exactly: the artifact and export read the same codes
        assert torch.allclose(m.weight_quantizer.fake_quant(m.layer.weight), m.layer.weight, atol=1e-6)
    assert changed > 0
    for u in record["layers"]:
        assert u["heldout_mse_after"] < u["heldout_mse_before"], u["name"]


def spy_on_fits(monkeypatch, at_iteration):
    seen = []
    original = rc.fit_unit

    def fit(module, variables, xs_q, xs_f, *args, **kw):
        def on_batch(it, idx, mixed):
            if it == at_iteration:
                seen.append((idx.clone(), [x[idx].float() for x in xs_q], [f[idx].float() for f in xs_f],
                             [(m.clone(), k.clone()) for m, k in mixed]))
        return original(module, variables, xs_q, xs_f, *args, on_batch=on_batch, **kw)

    monkeypatch.setattr(rc, "fit_unit", fit)
    return seen


def test_qdrop_mixes_float_and_quantized_inputs_by_the_mask(monkeypatch):
    torch.manual_seed(0)
    x = torch.rand(40, 3, 32, 32)
    p = rtn(TwoBlocks().eval(), x)
    iters = 30
    seen = spy_on_fits(monkeypatch, at_iteration=iters - 2)  # a late batch
    adaquant(p, x, AdaQuantConfig(mode="sequential", iters=iters, batch_size=8, reconstruct="block", qdrop=0.5),
             show_progress=False)
    assert len(seen) == 4  # every unit
    for k, (idx, xq, xf, mixed) in enumerate(seen):
        for q, f, (m, mask) in zip(xq, xf, mixed):
            mask = mask.bool()
            assert torch.equal(m[mask], f[mask]) and torch.equal(m[~mask], q[~mask])
            share = mask.float().mean()
            assert 0.45 < share < 0.55 if mask.numel() > 10_000 else 0.2 < share < 0.8
            if k > 0:  # after the first unit the quantized model's inputs differ from float
                assert not torch.equal(q, f)


def test_qdrop_that_never_drops_is_plain_block_reconstruction():
    """With a probability too small to ever drop, the dropping machinery (masks, mixing, their
    own generator) leaves block reconstruction exactly as it is without it."""
    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.rand(40, 3, 32, 32)
    cfg = dict(mode="sequential", iters=20, batch_size=8, reconstruct="block", qdrop=0.0)
    plain, dropping = rtn(model, x), rtn(model, x)
    adaquant(plain, x, AdaQuantConfig(**cfg), show_progress=False)
    adaquant(dropping, x, AdaQuantConfig(**{**cfg, "qdrop": 1e-12}), show_progress=False)
    for k, v in plain.module.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, dropping.module.state_dict()[k]), k


def test_mix_inputs():
    g = torch.Generator().manual_seed(0)
    q, f = torch.zeros(1000), torch.ones(1000)
    mixed, mask = rc.mix_inputs(q, f, 0.3, g)
    assert torch.equal(mixed, mask) and 0.25 < mask.mean() < 0.35


def test_random_mask_and_mix_agree_with_torch_where():
    """The fast mask keeps x's layout and its probability; mixing by it is torch.where's value
    and gradients, bit for bit."""
    from sub8.calibrate.variables import mix, random_mask

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 30, 30).contiguous(memory_format=torch.channels_last)
    for p in (0.5, 0.1, 0.9):
        m = random_mask(x, p, g)
        assert m.is_contiguous(memory_format=torch.channels_last) and m.shape == x.shape
        assert set(m.unique().tolist()) == {0.0, 1.0} and abs(m.mean().item() - p) < 0.01
    assert random_mask(torch.zeros(100), 1e-12, g).sum() == 0  # below 2^-16: never
    a, b = torch.randn(7, 9, requires_grad=True), torch.randn(7, 9, requires_grad=True)
    m = random_mask(a, 0.5, g)
    grad = torch.randn(7, 9)
    out = mix(a, b, m)
    ga, gb = torch.autograd.grad(out, (a, b), grad)
    ref = torch.where(m.bool(), a, b)
    ra, rb = torch.autograd.grad(ref, (a, b), grad)
    assert torch.equal(out, ref) and torch.equal(ga, ra) and torch.equal(gb, rb)


def test_bad_settings_are_refused():
    with pytest.raises(Sub8Error, match="reconstruct"):
        AdaQuantConfig(reconstruct="stage")
    with pytest.raises(Sub8Error, match="rounding"):
        AdaQuantConfig(rounding="nearest")
    with pytest.raises(Sub8Error, match="qdrop"):
        AdaQuantConfig(qdrop=1.0)


class MemoryCheckpoints:
    def __init__(self):
        self.saved = {}

    def load(self, *parts):
        return self.saved.get(repr(parts))

    def save(self, value, *parts):
        self.saved[repr(parts)] = value


def test_interrupted_reconstruction_resumes_after_the_last_finished_unit(monkeypatch):
    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.rand(40, 3, 32, 32)
    cfg = AdaQuantConfig(mode="sequential", iters=15, batch_size=8, reconstruct="block", rounding="learned",
                         qdrop=0.5)
    whole = rtn(model, x)
    adaquant(whole, x, cfg, show_progress=False)

    interrupted, checkpoints = rtn(model, x), MemoryCheckpoints()
    original, fits = rc.fit_unit, []

    def fit(*args, **kw):
        if len(fits) == 2:
            raise KeyboardInterrupt
        fits.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(rc, "fit_unit", fit)
    with pytest.raises(KeyboardInterrupt):
        adaquant(interrupted, x, cfg, show_progress=False, checkpoints=checkpoints)
    monkeypatch.setattr(rc, "fit_unit", original)
    resumed = rtn(model, x)
    record = adaquant(resumed, x, cfg, show_progress=False, checkpoints=checkpoints)
    assert record["resumed_units"] == 2
    for k, v in whole.module.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed.module.state_dict()[k]), k


class Residual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale=1.0):
        return x + self.fc2(torch.relu(self.fc1(x))) * scale


class UntracedStack(nn.Module):
    """Runs without a graph (as transformers models do); its blocks take a keyword argument."""
    sub8_traceable = False

    def __init__(self, blocks=2):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Residual(16) for _ in range(blocks)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, scale=0.5)
        return self.head(torch.relu(h))


def test_untraced_one_layer_units_match_layerwise_adaquant():
    """Without a graph, a unit is a module call: with one layer per unit, the recorded calls
    give what layer-wise AdaQuant's captured inputs give."""
    torch.manual_seed(0)
    model, x = UntracedStack(blocks=1).eval(), torch.randn(40, 8)
    cfg = dict(mode="sequential", iters=25, batch_size=8, lr_weight=1e-2, lr_input_quant=1e-1, qdrop=0.0)
    layerwise, blockwise = rtn(model, x), rtn(model, x)
    adaquant(layerwise, x, AdaQuantConfig(**cfg, reconstruct="layer"), show_progress=False)
    record = adaquant(blockwise, x, AdaQuantConfig(**cfg, reconstruct="block"), show_progress=False)
    assert names_of(record) == [(n, "layer") for n in ("inp", "blocks.0.fc1", "blocks.0.fc2", "head")]
    a, b = layerwise.module.state_dict(), blockwise.module.state_dict()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(v, b[k], rtol=1e-5, atol=1e-6), k


def test_untraced_blocks_are_fitted_on_their_calls():
    torch.manual_seed(0)
    model, x = UntracedStack().eval(), torch.randn(48, 8)
    p = rtn(model, x)
    before = p.module(x)
    record = adaquant(p, x, AdaQuantConfig(mode="sequential", iters=40, batch_size=8, reconstruct="block", qdrop=0.5),
                      show_progress=False)
    assert names_of(record) == [("inp", "layer"), ("blocks.0", "block"), ("blocks.1", "block"), ("head", "layer")]
    # (each unit's held-out error is measured, but on 4 samples: whether it falls is up to the
    # seed; the whole model's error on all 48 is the property)
    assert all(math.isfinite(u["heldout_fisher_after"]) for u in record["layers"])
    with torch.no_grad():
        reference, after = model(x), p.module(x)
    assert (after - reference).square().mean() < (before - reference).square().mean()
    # the defaults fit blocks there too
    assert adaquant(rtn(model, x), x, AdaQuantConfig(mode="sequential", iters=2),
                    show_progress=False)["settings"]["reconstruct"] == "block"


def names_of(record):
    return [(u["name"], u["kind"]) for u in record["units"]]


def test_advanced_pipeline_reconstructs_blocks_after_allocation(tmp_path):
    """Candidates stay per layer (parallel layer-wise AdaQuant, each layer at its candidate
    precision); after allocation the chosen mix is fitted block by block, with QDrop: the defaults."""
    from sub8 import quantize

    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.rand(40, 3, 32, 32)
    config = QuantConfig(pipeline="advanced", cache_dir=str(tmp_path / "cache"),
                         adaquant={"iters": 5, "batch_size": 8},
                         bias_tuning={"iters": 2, "batch_size": 8}, allocation={"size_ratio": 0.2})
    report = quantize(model, x, config).report
    for steps in report["allocate"]["candidates"].values():  # parallel: single layers on float inputs
        settings = steps["adaquant"]["settings"]
        assert (settings["mode"], settings["reconstruct"], settings["qdrop"]) == ("parallel", "layer", 0.0)
        assert "units" not in steps["adaquant"]  # layer-wise AdaQuant's record
    after = report["adaquant_sequential"]
    assert (after["settings"]["reconstruct"], after["settings"]["qdrop"]) == ("block", 0.5)
    assert [u["kind"] for u in after["units"]] == ["layer", "block", "block", "layer"]
    assert all(torch.isfinite(torch.tensor(u["heldout_mse_after"])) for u in after["layers"])


def test_a_unit_too_large_for_the_budget_in_float32_is_cached_in_float16():
    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.rand(40, 3, 32, 32)
    cfg = dict(mode="sequential", iters=3, batch_size=8, reconstruct="block", qdrop=0.5)
    # The stem's cache: 40 samples x (its 3x32x32 input, quantized and float, and its 8x16x16
    # output and Fisher weights) = 409,600 elements: 1.6 MB in float32, 0.8 MB in float16.
    roomy = adaquant(rtn(model, x), x, AdaQuantConfig(**cfg, max_memory_gb=1.0), show_progress=False)
    tight = adaquant(rtn(model, x), x, AdaQuantConfig(**cfg, max_memory_gb=1.2 / 1024), show_progress=False)
    assert (roomy["cache_dtype"], tight["cache_dtype"]) == ("float32", "float16")
    with pytest.raises(Sub8Error, match="max-memory"):
        adaquant(rtn(model, x), x, AdaQuantConfig(**cfg, max_memory_gb=0.5 / 1024), show_progress=False)


def test_cpu_budget_gives_blocks_more_iterations_than_layers():
    """Where a sequential run fits blocks, the budget's iterations are per block; layer-wise and
    parallel runs (bit allocation's candidates) keep the per-layer count; --iters wins."""
    from sub8.calibrate.adaquant import BLOCK_ITERS, BUDGETS

    cpu = BUDGETS["cpu"]["iters"]
    assert AdaQuantConfig().resolve("cpu").iters == BLOCK_ITERS["cpu"] > cpu
    assert AdaQuantConfig(reconstruct="layer").resolve("cpu").iters == cpu
    assert AdaQuantConfig(mode="parallel").resolve("cpu").iters == cpu
    assert AdaQuantConfig(iters=7).resolve("cpu").iters == 7
    assert AdaQuantConfig(budget="full").resolve("cpu").iters == BLOCK_ITERS["full"]
