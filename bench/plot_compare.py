#!/usr/bin/env python3
"""Plot a bench/compare.py --json file: the figures of both servers side by side, one panel per
unit (msg/s, seconds, ms, cmd/s, MiB), and each row's ratio against the goal.

    python bench/plot_compare.py out.json docs/performance.png

Needs matplotlib (`pip install '.[bench]'`), which nothing else in the project uses.
"""
from __future__ import annotations

import argparse
import json
import sys

COLOURS = {"reference": "#4c72b0", "mailsuite": "#dd8452"}
LABELS = {"reference": "Postfix / Dovecot", "mailsuite": "mailsuite"}
UNITS = [("msg/s", "SMTP accept -> Maildir (msg/s, higher is better)"),
         ("s", "IMAP (seconds, lower is better)"),
         ("ms", "LOGIN latency (ms, lower is better)"),
         ("cmd/s", "imaptest stress (cmd/s, higher is better)"),
         ("MiB", "memory PSS (MiB, lower is better)")]


def plot(data: dict, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    servers = data["servers"]
    rows = [r for r in rows if any(v is not None for v in r["medians"].values())]
    panels = [(unit, title) for unit, title in UNITS if any(r["unit"] == unit for r in rows)]
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(10, 3.2 * (len(panels) + 1)))
    for ax, (unit, title) in zip(axes, panels):
        chosen = [r for r in rows if r["unit"] == unit]
        width = 0.8 / len(servers)
        for k, server in enumerate(servers):
            xs = [i + (k - (len(servers) - 1) / 2) * width for i in range(len(chosen))]
            values = [r["medians"].get(server) or 0 for r in chosen]
            bars = ax.bar(xs, values, width, label=LABELS.get(server, server),
                          color=COLOURS.get(server))
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(chosen)), [r["name"] for r in chosen], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    scored = [r for r in rows if r.get("score") is not None]
    ax = axes[-1]
    scores = [r["score"] for r in scored]
    ax.barh([r["name"] for r in scored], scores,
            color=["#55a868" if s >= 1.0 else "#c44e52" for s in scores])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_title("mailsuite as good as the reference (x; >= 1.0 is the goal)", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.invert_yaxis()
    fig.suptitle(f"{data.get('summary', '')}\n{data['machine']['processor']}, "
                 f"{data['machine']['cpus']} CPUs; medians of {data['rounds']} round(s)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out_path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json_file")
    p.add_argument("png_file")
    args = p.parse_args(argv)
    with open(args.json_file) as f:
        plot(json.load(f), args.png_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
