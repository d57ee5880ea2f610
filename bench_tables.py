"""bench.py's results as the page shows them: markdown tables of the timed rows and of the step caches, and the
memory-budget curve as a PNG (matplotlib, imported only to draw it)."""


def format_table(rows: list[dict]) -> str:
    lines = ["| work | res | s/step | TFLOP/step | TFLOP/s | % of dense peak | peak GiB | first step s | attention "
             "| GPU ms by kernel kind (one profiled step) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = f"{r['seconds']:.3f}" if r.get("seconds") is not None else f"failed: {r.get('error', '')[:80]}"
        p = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        prof = " · ".join(f"{k} {v:g}" for k, v in r.get("profile_ms", {}).items())
        lines.append(f"| {r['row']} | {r['res']} | {s} | {r.get('tflop', '-')} | {r.get('tflops', '-')} | "
                     f"{r.get('pct_peak', '-')} | {p} | {r.get('first_s', '-')} | {r.get('attention', 'flash')}"
                     f" | {prof} |")
    return "\n".join(lines)


def plot_budget(rows: list[dict], path: str) -> None:
    """The memory-budget curve: s/step against peak GiB, one line per kind, each point labelled with its budget."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(r["kind"] for r in rows if "budget" in r):
        pts = sorted((r["peak_gib"], r["seconds"], r["budget"]) for r in rows
                     if r.get("kind") == kind and "budget" in r and r.get("seconds") is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind)
        for gib, sec, b in pts:
            ax.annotate(f"{b:g}", (gib, sec), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="peak GiB", ylabel="s / step", title="train.memory_budget (labels): LoRA step at 1024^2")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}", flush=True)


def format_stepcache(rows: list[dict]) -> str:
    """The stepcache rows: seconds per image (the whole sample() call and its 28 steps), speed-up of the steps
    against the uncached row, latents' relative error against the same call uncached."""
    rows = [r for r in rows if "cache" in r]
    base = next((r.get("denoise_s") for r in rows if r["cache"] == ""), None)
    lines = ["| cache | res | s/image | denoise s | speed-up | latent rel. error vs uncached | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("seconds") is None:
            lines.append(f"| {r['cache'] or 'off'} | {r['res']} | failed: {r.get('error', '')[:80]} | | | | |")
            continue
        up = f"{base / r['denoise_s']:.2f}x" if base and r.get("denoise_s") else "-"
        lines.append(f"| {r['cache'] or 'off'} | {r['res']} | {r['seconds']:.3f} | {r['denoise_s']:.3f} | {up} | "
                     f"{r['latent_rel_err']:.4f} | {r['peak_gib']:.1f} |")
    return "\n".join(lines)
