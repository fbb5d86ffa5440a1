"""training_curve.png: the training loss by step with the learning rate, and the evaluation metrics when
a run evaluated more than once (the untrained model counts, at step 0). Drawn from the Trainer's
log_history, so a resumed run draws its whole history."""

import os
from typing import Dict, List, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg  # headless: no display, no pyplot state
from matplotlib.figure import Figure

from ..files import atomic_file
from .console import BOOKKEEPING

CURVE_FILE = "training_curve.png"


def evaluation_points(log_history: List[dict], untrained: Optional[Dict[str, float]] = None):
    """[(step, {metric: value})] of every evaluation, the untrained model's (already unprefixed) first."""
    points = [(0, dict(untrained))] if untrained else []
    for entry in log_history:
        metrics = {k[5:]: v for k, v in entry.items() if k.startswith("eval_") and k[5:] not in BOOKKEEPING}
        if metrics:
            points.append((entry["step"], metrics))
    return points


def evaluation_axis_label(metrics: List[str]) -> str:
    """The right panel's axis: "loss" when every metric drawn is a loss (pretraining's, per objective)."""
    return "loss" if all(name.startswith("loss") for name in metrics) else "score"


def plot_training_curve(log_history: List[dict], path: str, untrained: Optional[Dict[str, float]] = None,
                        labels: Optional[Dict[str, str]] = None) -> bool:
    """Writes the picture to `path` (atomically); False when the run logged no training loss. `labels`
    names the metrics ({metric: legend}); by default their keys."""
    train = [entry for entry in log_history if "loss" in entry and "step" in entry]
    if not train:  # fewer steps than logging_steps: only the run's mean loss, at its last step
        train = [dict(step=entry["step"], loss=entry["train_loss"]) for entry in log_history if "train_loss" in entry]
    if not train:
        return False
    evaluations = evaluation_points(log_history, untrained)
    scores = sorted({name for _, metrics in evaluations for name in metrics if name != "loss"})
    several = len(evaluations) > 1 and scores

    figure = Figure(figsize=(12 if several else 7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axis = figure.add_subplot(1, 2 if several else 1, 1)
    steps = [entry["step"] for entry in train]
    lines = loss_axis.plot(steps, [entry["loss"] for entry in train], ".-", color="tab:blue", label="training loss")
    evaluated_loss = [(step, metrics["loss"]) for step, metrics in evaluations if "loss" in metrics]
    if evaluated_loss:
        lines += loss_axis.plot(*zip(*evaluated_loss), "o:", color="tab:red", label="eval loss")  # dotted: measured only at the dots
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.grid(alpha=0.3)
    if any("learning_rate" in entry for entry in train):
        rate_axis = loss_axis.twinx()
        lines += rate_axis.plot(
            steps, [entry.get("learning_rate", float("nan")) for entry in train],
            color="tab:gray", linestyle="--", linewidth=1, label="learning rate",
        )
        rate_axis.set_ylabel("learning rate")
        rate_axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="upper right")
    loss_axis.set_title(f"training: {os.path.basename(os.path.dirname(os.path.abspath(path)))}")

    if several:
        score_axis = figure.add_subplot(1, 2, 2)
        for name in scores:
            points = [(step, metrics[name]) for step, metrics in evaluations if name in metrics]
            score_axis.plot(*zip(*points), "o:", label=(labels or {}).get(name, name))
        score_axis.set_xlabel("step")
        score_axis.set_ylabel(evaluation_axis_label(scores))
        score_axis.grid(alpha=0.3)
        score_axis.legend(loc="best")
        score_axis.set_title("evaluation" + (" (step 0: untrained)" if untrained else ""))

    with atomic_file(path, binary=True) as f:  # with the user's umask, like every other output
        figure.savefig(f, format="png")
    return True
