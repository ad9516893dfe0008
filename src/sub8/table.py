"""Plain-text rows for the metrics tables that the CLI and the demo print."""


def fmt_bits(b):
    return "float" if b is None else str(b)


def metrics_line(name: str, m: dict, size_ratio: float | None = None) -> str:
    conf = m["top1_agreement_confident"]
    conf_txt = f"{100 * conf:6.1f}%" if conf is not None else "    n/a"
    acc = f"  {100 * m['accuracy']:6.1f}%" if "accuracy" in m else ""
    size = f"  {100 * size_ratio:5.1f}%" if size_ratio is not None else "       "
    return (f"{name:<13} {100 * m['top1_agreement']:6.1f}% {conf_txt} {100 * m['top5_agreement']:6.1f}%"
            f" {m['kl']:8.4f}{size}{acc}")


def table_header(labelled: bool) -> str:
    head = f"{'config':<13} {'top1':>7} {'top1@conf':>7} {'top5':>7} {'KL':>8}  {'size':>6}"
    return head + ("  accuracy" if labelled else "")
