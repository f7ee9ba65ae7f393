#!/usr/bin/env python3
"""Draws the timelines of `tether-load --herd --json` runs side by side: the
sessions welcomed and the false expiries, second by second, one colour per
run. Standard library only; writes an SVG.

    tools/herd_plot.py -o herd.svg tether=tether.json "tokio baseline=tokio.json"

Each argument is LABEL=FILE, FILE holding the JSON line the load tool
printed (the last line of the file is read).
"""

import argparse
import json
import sys

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
W, H, PAD = 520, 300, 56


def load(path):
    with open(path) as f:
        lines = [line for line in f if line.strip().startswith("{")]
    if not lines:
        sys.exit(f"{path}: no JSON line (run tether-load with --json)")
    run = json.loads(lines[-1])
    server = run.get("server") or sys.exit(f"{path}: no server run in it")
    timeline = server.get("timeline") or sys.exit(f"{path}: no timeline (run with --herd)")
    return run, server, timeline


def panel(x0, title, series, y_max, unit):
    """One chart at x offset x0: series is [(label, colour, [(t, y)])]."""
    t_max = max((t for _, _, pts in series for t, _ in pts), default=1)
    y_max = max(y_max, 1)
    sx = lambda t: x0 + PAD + (W - 2 * PAD) * t / t_max  # noqa: E731
    sy = lambda y: H - PAD + -(H - 2 * PAD) * y / y_max  # noqa: E731
    out = [f'<text x="{x0 + W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(t_max)}" y2="{sy(0)}" stroke="black"/>',
           f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(0)}" y2="{sy(y_max)}" stroke="black"/>',
           f'<text x="{x0 + W / 2}" y="{H - 14}" text-anchor="middle">seconds from the first HELLO</text>',
           f'<text x="{sx(0) - 6}" y="{sy(y_max) + 4}" text-anchor="end">{y_max:,.0f}</text>',
           f'<text x="{sx(0) - 6}" y="{sy(0) + 4}" text-anchor="end">0</text>',
           f'<text x="{sx(t_max)}" y="{sy(0) + 16}" text-anchor="middle">{t_max:.0f}</text>',
           f'<text x="{sx(0)}" y="{sy(y_max) - 8}">{unit}</text>']
    for i, (label, colour, pts) in enumerate(series):
        path = " ".join(f"{sx(t):.1f},{sy(y):.1f}" for t, y in [(0, 0)] + pts)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        out.append(f'<text x="{x0 + W - PAD}" y="{sy(y_max) + 16 * (i + 1)}" text-anchor="end" '
                   f'fill="{colour}">{label}</text>')
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=FILE")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.svg")
    args = parser.parse_args()
    welcomed, false = [], []
    clients = 0
    for i, spec in enumerate(args.runs):
        label, _, path = spec.partition("=")
        if not path:
            sys.exit(f"{spec}: write LABEL=FILE")
        run, server, timeline = load(path)
        clients = max(clients, run.get("clients", 0))
        colour = COLOURS[i % len(COLOURS)]
        welcomed.append((label, colour, [(s["t_s"], s["welcomed"]) for s in timeline]))
        false.append((f'{label}: {server["false_expiries"]:,}', colour,
                      [(s["t_s"], s["false_expiries"]) for s in timeline]))
    false_max = max((y for _, _, pts in false for _, y in pts), default=0)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H}" '
           'font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>']
    svg += panel(0, "sessions welcomed", welcomed, clients, "sessions")
    svg += panel(W, "false expiries (cumulative)", false, false_max, "clients")
    svg.append("</svg>")
    with open(args.output, "w") as f:
        f.write("\n".join(svg) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
