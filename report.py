"""Where a run's numbers and pictures go: log.jsonl (always), TensorBoard, wandb (train.report_to), and
validation/curves.png, drawn from log.jsonl alone (`python validate.py plot RUN_DIR` re-draws it).

log.jsonl holds one JSON object per line: a training step's record ({"step", "loss", "lr", "grad_norm", ...}) or a
validation's ({"step", "held_out_loss", the edit metrics' means edit_* / base_* / copy_*, "pairs": {sample key:
{edit_*, base_*, copy_*}}}, validate.validate_edits). A resumed run appends; a step logged twice (the steps between
the checkpoint and the interruption) counts with its last record.
"""

import json
import math
from pathlib import Path

from config import Config, TrainConfig, to_json

METRICS = ("mae_target", "mae_control", "mse_target", "mse_control")  # validate.edit_metrics' names
WANDB_MISSING = "train.report_to has 'wandb' but the wandb package is not installed: pip install wandb"
MATPLOTLIB_MISSING = "validation/curves.png needs matplotlib, which is not installed: pip install matplotlib"


def check_report_to(tc: TrainConfig) -> None:
    """Before any model loads: the libraries report_to names are importable (wandb: a ValueError naming the pip
    command)."""
    if "wandb" in tc.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError(WANDB_MISSING) from None


def open_reports(cfg: Config, out_dir: Path, run_id: str, log=print, start: int = 0) -> dict:
    """The run's sinks: {"jsonl": log.jsonl opened for appending, "tensorboard": a SummaryWriter on <out_dir>/tb or
    None, "wandb": a wandb run or None}. The wandb run's id is the training run's (lora.new_run_id, kept in every
    checkpoint), so `--resume` continues the same wandb run; its files go to <out_dir>/wandb (WANDB_MODE=offline
    keeps them there). TensorBoard missing is said and skipped (it is not a requirement)."""
    tc = cfg.train
    rep = {"jsonl": open(out_dir / "log.jsonl", "a"), "tensorboard": None, "wandb": None}
    if "tensorboard" in tc.report_to:
        try:
            from torch.utils.tensorboard import SummaryWriter

            # a resume from step `start` purges the later steps' events: one history, as log.jsonl (rundir)
            rep["tensorboard"] = SummaryWriter(str(out_dir / "tb"), purge_step=start + 1 if start else None)
        except ImportError:
            log("tensorboard: not installed, skipped (pip install tensorboard)")
    if "wandb" in tc.report_to:
        check_report_to(tc)
        import wandb

        rep["wandb"] = wandb.init(project=tc.wandb_project, id=run_id, resume="allow", dir=str(out_dir),
                                  name=out_dir.resolve().name, config=json.loads(to_json(cfg)))
        log(f"wandb: run {run_id} of project {tc.wandb_project} ({rep['wandb'].settings.mode})")
    return rep


def scalars(rec: dict) -> dict[str, float]:
    """A log record's numbers as flat scalar names: pairs' metrics as pair/<key>/<name>; None and the step left out."""
    out = {}
    for k, v in rec.items():
        if k == "pairs":
            out.update({f"pair/{key}/{n}": x for key, m in v.items() for n, x in m.items() if x is not None})
        elif k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def report(rep: dict, rec: dict) -> None:
    """One record to every sink: the line in log.jsonl (flushed), its scalars to TensorBoard and wandb at
    rec["step"]."""
    rep["jsonl"].write(json.dumps(rec) + "\n")
    rep["jsonl"].flush()
    flat = scalars(rec)
    if rep["tensorboard"] is not None:
        for k, v in flat.items():
            rep["tensorboard"].add_scalar(k, v, rec["step"])
    if rep["wandb"] is not None:
        rep["wandb"].log(flat, step=rec["step"])


def report_images(rep: dict, images: dict[str, Path], step: int) -> None:
    """PNG files (validation grids, user samples, curves) as images in TensorBoard and wandb under their names."""
    if rep["tensorboard"] is not None:
        import numpy as np
        from PIL import Image

        for name, path in images.items():
            rep["tensorboard"].add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
    if rep["wandb"] is not None:
        import wandb

        rep["wandb"].log({name: wandb.Image(str(path)) for name, path in images.items()}, step=step)


def close_reports(rep: dict) -> None:
    rep["jsonl"].close()
    if rep["tensorboard"] is not None:
        rep["tensorboard"].close()
    if rep["wandb"] is not None:
        rep["wandb"].finish()


# ---------------------------------------------------------------- curves


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """log.jsonl as (training records, validation records), each sorted by step, the last record of a step kept."""
    train, val = {}, {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (val if "held_out_loss" in rec else train)[rec["step"]] = rec
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start (weight 0: the values)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def curve_data(train: list[dict], val: list[dict]) -> dict:
    """What curves.png shows, from the log records: per series (steps, values); baselines (base_*, copy_*) as their
    last logged value. Only series the log has."""
    data = {}
    if train:
        steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
        data["loss"] = (steps, loss)
        data["loss_smoothed"] = (steps, smooth(loss))
    data["held_out_loss"] = ([r["step"] for r in val], [r["held_out_loss"] for r in val])
    for m in METRICS:
        pts = [(r["step"], r[f"edit_{m}"]) for r in val if r.get(f"edit_{m}") is not None]
        if pts:
            data[f"edit_{m}"] = ([s for s, _ in pts], [v for _, v in pts])
        for base in ("base", "copy"):
            last = [r[f"{base}_{m}"] for r in val if r.get(f"{base}_{m}") is not None]
            if last:
                data[f"{base}_{m}"] = last[-1]
    return data


def plot_curves(log_path: Path, png_path: Path) -> dict:
    """validation/curves.png from log.jsonl: training loss (raw, faint, and smoothed) with the held-out loss; the
    edit's pixel MAE and latent MSE to the target (solid) and to the control (dotted) against steps, the base model's
    and copy-the-control's distance to the target as dashed lines. Returns the plotted data (curve_data)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend switched
    except ImportError:
        raise ValueError(MATPLOTLIB_MISSING) from None
    data = curve_data(*read_log(log_path))
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    ax = axes[0]
    if "loss" in data:
        ax.plot(*data["loss"], color="C0", alpha=0.25, lw=0.8)
        ax.plot(*data["loss_smoothed"], color="C0", label="training loss (smoothed)")
    if data["held_out_loss"][0]:
        ax.plot(*data["held_out_loss"], "o-", color="C1", label="held-out loss")
    ax.set(xlabel="step", title="loss", yscale="log" if _positive(data, ("loss", "held_out_loss")) else "linear")
    for ax, unit, title in ((axes[1], "mae", "pixel MAE (0-255)"), (axes[2], "mse", "latent MSE")):
        if f"edit_{unit}_target" in data:
            ax.plot(*data[f"edit_{unit}_target"], "o-", color="C2", label="edit to target")
        if f"edit_{unit}_control" in data:
            ax.plot(*data[f"edit_{unit}_control"], "o:", color="C4", label="edit to control")
        for base, colour in (("base", "C3"), ("copy", "C7")):
            if f"{base}_{unit}_target" in data:
                ax.axhline(data[f"{base}_{unit}_target"], ls="--", color=colour,
                           label="base model to target" if base == "base" else "copy the control (to target)")
        ax.set(xlabel="step", title=title + ": lower to target is better")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=80)
    return data


def _positive(data: dict, names) -> bool:
    vals = [v for n in names if n in data for v in data[n][1]]
    return bool(vals) and all(v > 0 and math.isfinite(v) for v in vals)
