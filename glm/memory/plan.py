"""A run's memory plan from its parsed flags: the estimate of each phase (training, evaluation, decoding),
whether it fits a device, and when it does not, the cheapest changes that make it fit, each with its
figure. Used by tools/plan_memory.py, by every training task's header and by predict_generation.py."""

import dataclasses
import re
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import UserError
from .estimate import GIB, MIB, DecodingLoad, Estimate, TrainingLoad, estimate_decoding, estimate_training, larger
from .measure import available_memory_bytes, current_memory_bytes, peak_memory_bytes, peak_tensor_bytes

__all__ = [
    "Change", "Plan", "sharding_stage", "training_plan", "decoding_plan", "describe", "suggestions", "table",
    "refuse_if_it_cannot_fit", "memory_metrics", "memory_summary", "header_line",
]  # fmt: skip


@dataclass
class Change:
    """A way to need less memory: what to pass, and what the run then needs."""

    flags: str
    estimate: Estimate
    keeps_result: bool  # the same trained weights (recompute, sharding, accumulation) or not


@dataclass
class Plan:
    """The worst phase of a run (`estimate`) and the loads it was computed from."""

    estimate: Estimate
    training: Optional[TrainingLoad] = None
    evaluation: Optional[DecodingLoad] = None
    decoding: Optional[DecodingLoad] = None
    runtime: Optional[int] = None

    def recompute(self, training: Optional[TrainingLoad] = None, decoding: Optional[DecodingLoad] = None) -> Estimate:
        """The estimate of this run with other loads."""
        training = training or self.training
        if training is not None:
            phases = [estimate_training(training, self.runtime)]
            if self.evaluation is not None:
                states = {k: v for k, v in phases[0].parts.items() if k not in ("gradients", "activations", "runtime", "allocator_slack")}
                phases.append(estimate_decoding(replace(self.evaluation, half=training.half), self.runtime, states))
            return larger(*phases)
        return estimate_decoding(decoding or self.decoding, self.runtime)


def sharding_stage(argv: Sequence[str]) -> int:
    """The sharding stage --sharding asks for in `argv` (PaddleNLP clears it in a single process)."""
    text = ""
    for index, arg in enumerate(argv):
        if arg.startswith("--sharding="):
            text = arg.split("=", 1)[1]
        elif arg == "--sharding" and index + 1 < len(argv):
            text = argv[index + 1]
    stages = [int(stage) for stage in re.findall(r"stage(\d)", text)]
    return max(stages, default=0)


def training_plan(training: TrainingLoad, evaluation: Optional[DecodingLoad] = None,
                  runtime: Optional[int] = None) -> Plan:
    plan = Plan(estimate=None, training=training, evaluation=evaluation, runtime=runtime)
    plan.estimate = plan.recompute()
    return plan


def decoding_plan(decoding: DecodingLoad, runtime: Optional[int] = None) -> Plan:
    plan = Plan(estimate=None, decoding=decoding, runtime=runtime)
    plan.estimate = plan.recompute()
    return plan


def _training_changes(plan: Plan) -> List[Tuple[str, Callable[[TrainingLoad], TrainingLoad], bool]]:
    load = plan.training
    changes = []
    if not load.recompute:
        changes.append(("--recompute true", lambda l: replace(l, recompute=True), True))
    if load.devices > 1:
        for stage in range(max(1, load.sharding_stage + 1), 4):
            changes.append((f"--sharding stage{stage}", lambda l, s=stage: replace(l, sharding_stage=s), True))
    batch = load.batch
    while batch > 1:
        batch //= 2
        factor = load.batch // batch
        changes.append((f"--per_device_train_batch_size {batch} with --gradient_accumulation_steps x{factor}",
                        lambda l, b=batch: replace(l, batch=b), True))
    if load.gpu and not load.half:
        changes.append(("--fp16 true --fp16_opt_level O2 (or --bf16)", lambda l: replace(l, half=True), False))
    if not load.lora_rank:
        changes.append(("--lora true --lora_rank 8", lambda l: replace(
            l, lora_rank=8, lora_targets=(".*query_key_value.*", ".*attention.dense.*")), False))
    return changes


def _decoding_changes(plan: Plan) -> List[Tuple[str, Callable[[DecodingLoad], DecodingLoad], bool]]:
    load = plan.decoding
    changes = []
    batch = load.batch
    while batch > 1:
        batch //= 2
        changes.append((f"--batch_size {batch}", lambda l, b=batch: replace(l, batch=b), True))
    if load.rows_per_source > 1:
        changes.append(("--num_beams 1 (or fewer answers)", lambda l: replace(l, rows_per_source=1), False))
    if load.gpu and not load.half:
        changes.append(("--dtype float16", lambda l: replace(l, half=True), False))  # half precision moves answers
    return changes


def suggestions(plan: Plan, device_bytes: int) -> List[Change]:
    """The changes that make `plan` fit `device_bytes`, cheapest first (those that keep the result before
    those that change it); when no single change does, the fewest of them together, in that order."""
    options = _training_changes(plan) if plan.training is not None else _decoding_changes(plan)
    rebuild = (lambda apply: plan.recompute(training=apply(plan.training))) if plan.training is not None else (
        lambda apply: plan.recompute(decoding=apply(plan.decoding)))
    single = [Change(flags, rebuild(apply), keeps) for flags, apply, keeps in options]
    fitting = sorted((c for c in single if c.estimate.peak <= device_bytes), key=lambda c: (not c.keeps_result, c.estimate.peak))
    if fitting:
        return fitting[:3]
    chosen, applied, load = [], [], plan.training if plan.training is not None else plan.decoding
    for flags, apply, keeps in sorted(options, key=lambda option: not option[2]):
        if flags.startswith("--sharding") and any(f.startswith("--sharding") for f in applied):
            applied = [f for f in applied if not f.startswith("--sharding")]
        if flags.startswith("--per_device_train_batch_size") and any(f.startswith("--per_device") for f in applied):
            applied = [f for f in applied if not f.startswith("--per_device")]
        if flags.startswith("--batch_size") and any(f.startswith("--batch_size") for f in applied):
            applied = [f for f in applied if not f.startswith("--batch_size")]
        load = apply(load)
        applied.append(flags)
        estimate = plan.recompute(training=load) if plan.training is not None else plan.recompute(decoding=load)
        chosen = [Change(" ".join(applied), estimate, all(o[2] for o in options if o[0] in applied))]
        if estimate.peak <= device_bytes:
            return chosen
    return chosen  # the most it can save; still too much


def describe(estimate: Estimate) -> str:
    """One line: the peak and its largest parts."""
    parts = sorted(((value, name) for name, value in estimate.parts.items() if value >= 0.01 * estimate.peak), reverse=True)
    said = ", ".join(f"{name.replace('_', ' ')} {value / GIB:.2f}" for value, name in parts)
    return f"{estimate.gib():.2f} GiB ({said})"


def table(estimate: Estimate) -> List[str]:
    """The parts, one line each, and the peak."""
    width = max(len(name) for name in estimate.parts) + 2
    lines = [f"  {name.replace('_', ' '):<{width}}{value / MIB:>10.0f} MiB  {value / GIB:>7.2f} GiB"
             for name, value in estimate.parts.items()]
    lines.append(f"  {'peak':<{width}}{estimate.mib():>10.0f} MiB  {estimate.gib():>7.2f} GiB   ({estimate.moment})")
    return lines


def as_dict(load) -> dict:
    """A load as JSON (its model shape inline)."""
    return {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(load).items()}


def header_line(plan: Plan) -> str:
    """The header's memory line: the estimated peak and, where known, what is available."""
    available = available_memory_bytes()
    room = f"; {(available + current_memory_bytes()) / GIB:.1f} GiB available" if available is not None else ""
    return f"estimated peak {describe(plan.estimate)}{room}"


def refuse_if_it_cannot_fit(plan: Plan, ignore_flag: str = "--ignore_memory_check true"):
    """A UserError, before any weights are loaded, when the estimate is above what this device has free
    (what this process holds now counts as available: the estimate includes it)."""
    available = available_memory_bytes()
    if available is None:
        return
    device = available + current_memory_bytes()
    if plan.estimate.peak <= device:
        return
    changes = suggestions(plan, device)
    best = f"; {changes[0].flags} would need {changes[0].estimate.gib():.2f} GiB" if changes else ""
    raise UserError(f"this run needs about {plan.estimate.gib():.2f} GiB at its peak ({plan.estimate.moment}) and "
                    f"{device / GIB:.2f} GiB are available{best}; tools/plan_memory.py says more, {ignore_flag} "
                    "runs it anyway")


def memory_metrics(plan: Optional[Plan]) -> dict:
    """What a run records of its memory: the estimated and the measured peaks, in MiB."""
    metrics = {"peak_memory_mib": round(peak_memory_bytes() / MIB, 1),
               "peak_tensor_memory_mib": round(peak_tensor_bytes() / MIB, 1)}
    if plan is not None:
        metrics["estimated_peak_memory_mib"] = round(plan.estimate.mib(), 1)
    return metrics


def memory_summary(plan: Optional[Plan]) -> str:
    """The closing line of a run's memory: the measured peaks and the estimate."""
    metrics = memory_metrics(plan)
    estimated = metrics.get("estimated_peak_memory_mib")
    return (f"Memory: peak {metrics['peak_memory_mib'] / 1024:.2f} GiB"
            + (f", estimated {estimated / 1024:.2f} GiB" if estimated else "")
            + f" (tensors {metrics['peak_tensor_memory_mib'] / 1024:.2f} GiB).")
