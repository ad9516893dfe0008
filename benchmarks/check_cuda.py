"""Checks that need a GPU (CI has none): run on a CUDA machine, prints one line per check and
exits non-zero if one fails.

    python benchmarks/check_cuda.py

1. The fused per-tensor fake-quant kernel that AdaQuant trains with on CUDA gives the same
   values as codes()/dequantize() and the no-grad forward, rounding ties included.
2. AdaQuant on CUDA: the grouped parallel run equals the one-layer-at-a-time run.
3. AdaQuant on CUDA and on CPU end in the same place (to float rounding of the two devices).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402

from sub8 import QuantConfig, calibrate_ranges, prepare  # noqa: E402
from sub8.calibrate import AdaQuantConfig, adaquant  # noqa: E402
from sub8.calibrate.adaquant import per_sample_bytes  # noqa: E402
from sub8.quant import Quantizer  # noqa: E402
from tinymodels import TinyNet, randomize_bn  # noqa: E402


def fused_kernel_matches() -> bool:
    torch.manual_seed(0)
    x = torch.randn(64, 8, 16, 16, device="cuda") * 3
    ok = True
    for step in (0.0371, 0.1, 1 / 3, 0.007):
        q = Quantizer(4).cuda()
        q.set_range(x.min(), x.max())
        q.step.data.fill_(step)
        ties = (torch.arange(-1024, 1024, device="cuda").float() + 0.5) * step
        xs = torch.cat([x.reshape(-1), ties]).reshape(-1, 8, 16, 16)
        trained = q(xs.clone().requires_grad_()).detach()
        with torch.no_grad():
            plain = q(xs)
        ok &= torch.equal(trained, plain) and torch.equal(q.dequantize(q.codes(xs)), plain)
    return ok


def run(model, device: str, budget_gb: float | None, x: torch.Tensor):
    x = x.to(device)
    p = prepare(model, x[:1], QuantConfig(w_bits=4, a_bits=4, first_last_bits=4, device=device))
    calibrate_ranges(p, x, "minmax")
    if budget_gb is None:
        # (the default loss caches Fisher weights too)
        budget_gb = max(per_sample_bytes(p, x, 4, AdaQuantConfig().weighted).values()) * len(x) * 1.01 / 2 ** 30
    rec = adaquant(p, x, AdaQuantConfig(mode="parallel", iters=15, batch_size=8, lr_weight=1e-3, max_memory_gb=budget_gb),
                   show_progress=False)
    return rec["groups"], {k: v.cpu() for k, v in p.module.state_dict().items() if isinstance(v, torch.Tensor)}


def max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)).item()
               for k in a if a[k].is_floating_point())


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = {"fused per-tensor kernel == codes/dequantize (ties too)": fused_kernel_matches()}
    torch.manual_seed(0)
    model = randomize_bn(TinyNet())
    g_all, grouped = run(model, "cuda", 1.0, x)
    g_one, single = run(model, "cuda", None, x)
    diff = max_relative_difference(grouped, single)
    results[f"cuda grouped ({g_all} group) == one at a time ({g_one} groups), max rel diff {diff:.1e}"] = \
        g_all == 1 and g_one >= 4 and diff < 1e-5
    _, on_cpu = run(model, "cpu", 1.0, x)
    diff = max_relative_difference(grouped, on_cpu)
    results[f"cuda vs cpu AdaQuant, max rel diff {diff:.1e}"] = diff < 1e-3
    for name, ok in results.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
