"""A small SVG scatter plot (no plotting dependency): metric against size."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT, MARGIN = 640, 420, 60


def scatter_svg(series: list[dict], x_label: str, y_label: str, title: str) -> str:
    """`series`: [{"name", "points": [(x, y, label or None)], "line": bool, "color"}]."""
    xs = [x for s in series for x, _, _ in s["points"]]
    ys = [y for s in series for _, y, _ in s["points"]]
    if not xs:
        xs, ys = [0.0, 1.0], [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(1.0, max(ys))
    x0, x1 = (x0 - 0.01, x1 + 0.01) if x1 - x0 < 1e-9 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))

    def px(x):
        return MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)

    def py(y):
        return HEIGHT - MARGIN - (y - y0) / (y1 - y0) * (HEIGHT - 2 * MARGIN)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
           f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
           f'<text x="{WIDTH / 2}" y="{HEIGHT - 15}" text-anchor="middle">{escape(x_label)}</text>',
           f'<text x="15" y="{HEIGHT / 2}" text-anchor="middle" transform="rotate(-90 15 {HEIGHT / 2})">'
           f'{escape(y_label)}</text>']
    for k in range(5):
        x, y = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        out.append(f'<text x="{px(x):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle">{x:.3f}</text>')
        out.append(f'<text x="{MARGIN - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for i, s in enumerate(series):
        pts = sorted(s["points"])
        if s.get("line") and len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{s["color"]}"/>')
        for x, y, label in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{s["color"]}"/>')
            if label:
                out.append(f'<text x="{px(x) + 6:.1f}" y="{py(y) - 6:.1f}">{escape(label)}</text>')
        out.append(f'<circle cx="{WIDTH - MARGIN - 120}" cy="{MARGIN + 16 * i}" r="4" fill="{s["color"]}"/>')
        out.append(f'<text x="{WIDTH - MARGIN - 110}" y="{MARGIN + 16 * i + 4}">{escape(s["name"])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
