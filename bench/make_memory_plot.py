"""Context length vs peak GPU memory for fxfuse and the peers -> docs/img/memory-vs-context.svg.

One LoRA training step, Llama-3.1-8B shape, r=16 on all 7 linears, bf16, batch 1, gradient
checkpointing, AdamW; peak = torch.cuda.max_memory_allocated (GiB), which does not depend on the
card. Every point is a measurement: the peers' from the team lead's H100 table
(shared/README.md, 2026-11-24) and bench/RESULTS.md (same-call H100 rows, 2026-11-25); fxfuse's
from bench/logs (H100 2026-11-25, H200 2026-12-01 and 2026-12-03, 32k-320k capped at 79.1 GiB). Missing points were not measured or ran out
of memory (listed in the legend). Standard library only: `python bench/make_memory_plot.py [OUT]`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

SERIES = [
    # name, colour, {seq: peak GiB}, note
    ("HF+PEFT sdpa", "#888888", {1024: 17.5, 4096: 23.4, 16384: 47.2}, "OOM from 32k"),
    ("torch.compile", "#b279a2", {4096: 20.0, 16384: 34.0}, ""),
    ("Liger 0.8.5", "#54a24b", {1024: 16.1, 4096: 17.8, 16384: 24.7, 32768: 33.9}, ""),
    ("Unsloth 2026.10.9", "#e45756", {1024: 15.9, 4096: 16.7, 16384: 19.7, 32768: 23.9, 65536: 32.3,
                                      131072: 49.1}, ""),
    ("fxfuse, no offload", "#72b7b2", {1024: 16.01, 4096: 17.59, 16384: 23.14}, ""),
    ("fxfuse cudagraphs=True", "#f58518", {1024: 15.91}, "H200 2026-12-03 (sixteenth session), 79.1 GiB cap"),
    ("fxfuse defaults (offload)", "#4c78a8", {1024: 15.88, 4096: 16.41, 16384: 18.87, 32768: 22.10, 65536: 27.05,
                                              131072: 44.88},
     "H200 (1k: 2026-12-04, graph ops, twenty-first session; 128k: fourteenth; others eighteenth), 79.1 GiB cap"),
    ("fxfuse, third session", "#1f3b73", {4096: 16.69, 16384: 18.49, 327680: 62.47},
     "320k: before save_attention, 79.1 GiB cap"),
]
GOALS = {1024: 15.9, 4096: 16.5, 16384: 19.5, 32768: 23.5, 65536: 32.0, 131072: 48.0}

W, H, L, R, T, B = 760, 440, 70, 250, 30, 60


def _x(seq: int, lo: int, hi: int) -> float:
    return L + (W - L - R) * (math.log2(seq) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))


def _y(gib: float, top: float) -> float:
    return H - B - (H - B - T) * gib / top


def svg() -> str:
    seqs = sorted({s for _, _, pts, _ in SERIES for s in pts} | set(GOALS))
    peak = max(g for _, _, pts, _ in SERIES for g in pts.values())
    lo, hi, top = seqs[0], seqs[-1], max(55.0, math.ceil(peak / 10) * 10 + 5)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="14">Peak GPU memory of one LoRA training step, Llama-3.1-8B shape (GiB)</text>']
    for g in range(0, int(top) + 1, 10):
        y = _y(g, top)
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 8}" y="{y + 4:.1f}" text-anchor="end">{g}</text>')
    for s in seqs:
        x = _x(s, lo, hi)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{T}" y2="{H - B}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle">{s // 1024}k</text>')
    out.append(f'<text x="{(L + W - R) / 2:.0f}" y="{H - 20}" text-anchor="middle">context length (tokens, log scale)</text>')
    goal = " ".join(f"{_x(s, lo, hi):.1f},{_y(g, top):.1f}" for s, g in sorted(GOALS.items()))
    out.append(f'<polyline points="{goal}" fill="none" stroke="black" stroke-dasharray="5,4"/>')
    for name, colour, pts, _ in SERIES:
        xy = " ".join(f"{_x(s, lo, hi):.1f},{_y(g, top):.1f}" for s, g in sorted(pts.items()))
        out.append(f'<polyline points="{xy}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{_x(s, lo, hi):.1f}" cy="{_y(g, top):.1f}" r="3.5" fill="{colour}"/>' for s, g in pts.items()]
    y = T + 10
    for name, colour, _, note in SERIES + [("goal (issue 4)", "black", {}, "")]:
        dash = ' stroke-dasharray="5,4"' if colour == "black" else ""
        out.append(f'<line x1="{W - R + 15}" x2="{W - R + 40}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{W - R + 46}" y="{y + 4}">{name}</text>')
        if note:
            y += 15
            out.append(f'<text x="{W - R + 46}" y="{y + 4}" fill="#666" font-size="10">{note}</text>')
        y += 20
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> None:
    path = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "docs/img/memory-vs-context.svg"
    path.write_text(svg())
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv)
