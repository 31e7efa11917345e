"""Reports: Markdown tables, JSON and a PNG plot of perplexity against effective bits."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path


def environment() -> dict:
    import torch
    import transformers

    from .. import __version__

    dev = "cpu"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} threads)".strip(),
        "device": dev,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvquant": __version__,
    }


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(rows: list[dict], ref_ppl: float | None = None) -> str:
    head = ("| method | family | bits | outliers | eff. bits | ppl | ppl vs fp16 | KL |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        d = "" if ref_ppl is None or r["family"] == "fp16" else f"{(r['ppl'] / ref_ppl - 1) * 100:+.2f}%"
        frac = r.get("outlier_fraction") or 0
        lines.append(
            f"| {r['method']} | {r['family']} | {_fmt(r['bits'])} | {frac * 100:g}% | {r['effective_bits']:.2f} | "
            f"{r['ppl']:.3f} | {d} | {r['kl']:.4f} |"
        )
    return "\n".join(lines)


def plot_ppl_vs_bits(rows: list[dict], path: str | Path, title: str, ymax_factor: float = 2.0) -> None:
    """Perplexity vs measured effective bits; points far above fp16 are drawn at the top edge with their value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ref = next((r["ppl"] for r in rows if r["family"] == "fp16"), None) or min(r["ppl"] for r in rows)
    top = ref * ymax_factor
    style = {"kvquant": ("tab:blue", "o"), "baseline": ("tab:orange", "x")}
    for fam in ("baseline", "kvquant"):
        color, marker = style[fam]
        pts = [r for r in rows if r["family"] == fam]
        xs = [r["effective_bits"] for r in pts]
        ys = [min(r["ppl"], top) for r in pts]
        ax.scatter(xs, ys, label=fam, c=color, marker=marker, s=28)
        for r, x, y in zip(pts, xs, ys):
            label = r["method"] + (f" ({r['ppl']:.0f})" if r["ppl"] > top else "")
            ax.annotate(label, (x, y), fontsize=5.5, alpha=0.8, rotation=20, xytext=(2, 2), textcoords="offset points")
    ax.axhline(ref, color="k", ls="--", lw=1, label=f"fp16 ({ref:.2f})")
    ax.set_ylim(ref * 0.98, top * 1.02)
    ax.set_xlabel("effective bits per element (measured from storage)")
    ax.set_ylabel(f"perplexity (clipped at {ymax_factor:g}x fp16)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_json(obj: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
