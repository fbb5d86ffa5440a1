"""What a person sees of a training run, in order: what it runs, progress bars, a table of the untrained
vs the trained model's scores, and where the files are (glm.cli.console prints the lines and bars).
"""

import os
from typing import Dict, Iterable, List, Optional

import paddle
from paddlenlp.trainer.trainer_callback import ProgressCallback

from ..checkpoint import has_weights
from ..cli.console import progress_bar, say, shown
from .checkpoints import checkpoint_step

# Metrics every Trainer evaluation reports about itself, not about the model.
BOOKKEEPING = ("runtime", "samples_per_second", "steps_per_second", "epoch", "progress_or_epoch")


class ConsoleProgress(ProgressCallback):
    """PaddleNLP's progress callback with the loss and learning rate on the training bar, and without its
    one-step 'PredictProcess' bar of the loss pass (the task's evaluation shows its own, by rows)."""

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run's bar starts at the checkpoint's step, so its rate and time left count only the
        # steps this process trains (PaddleNLP's bar counted the steps resumed over as just done).
        if state.is_local_process_zero:
            self.training_bar = progress_bar(state.max_steps, "training", "step", initial=state.global_step,
                                            seconds_per_unit=True)
        self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and self.training_bar is not None and "loss" in (logs or {}):
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs.get('learning_rate', 0):.2e}", refresh=False)
        super().on_log(args, state, control, logs=logs, **kwargs)  # the per-step line, at --log_level info


def describe_model(model_args, model) -> str:
    """The header's model line: where it comes from, its size, and whether it starts untrained."""
    config = model.config
    parameters = sum(int(p.numel()) for p in model.parameters())
    text = (f"{shown(model_args.model_name_or_path)}: GLM {config.num_layers} layers, hidden {config.hidden_size}, "
            f"{parameters / 1e6:.1f}M parameters")
    if os.path.isdir(model_args.model_name_or_path) and not has_weights(model_args.model_name_or_path):
        text += ", random init (the directory holds no weights)"
    if model_args.lora:
        text += f", LoRA rank {model_args.lora_rank} on {' '.join(model_args.lora_target_modules)}"
    if model_args.prefix_tuning:
        trained = trainable_parameters(model)
        text += (f", P-tuning v2 prefix of {model_args.num_prefix_tokens} tokens"
                 f"{' through an MLP' if model_args.prefix_projection else ''} ({trained / 1e3:.1f}k trained)")
    return text


def trainable_parameters(model) -> int:
    """What trains: the whole model, or an adapter, prefix or prompt beside a frozen base."""
    return sum(int(p.numel()) for p in model.parameters() if not p.stop_gradient)


def running_device() -> str:
    """Where the run computes: `--device gpu` (the built-in default) on a machine without one runs on the CPU."""
    return paddle.device.get_device().split(":")[0]


def print_header(trainer, checkpoint, about: Dict[str, str]):
    """What runs, after the recipe line: the task's lines, the schedule, the output directory."""
    args = trainer.args
    for label, text in about.items():
        say(f"{label:<8} {text}")
    if args.do_train and trainer.train_dataset is not None:
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.dataset_world_size)
        steps = trainer.total_steps()
        resumed = f", resuming {shown(checkpoint)}" if checkpoint else ""
        if checkpoint and checkpoint_step(checkpoint) >= steps:
            resumed = f", finishing from {shown(checkpoint)} (its steps are all trained)"
        say(
            f"train    {steps} steps of {batch} rows ({steps / trainer.steps_per_epoch():.3g} epochs), learning rate "
            f"{args.learning_rate:g}, {args.world_size} process{'es' if args.world_size > 1 else ''} on {running_device()}"
            + resumed
        )
    say(f"output   {shown(args.output_dir)}")


def model_metrics(metrics: Optional[dict], prefix: str) -> Dict[str, float]:
    """`metrics` of one evaluation without its prefix and without the Trainer's bookkeeping."""
    return {
        name[len(prefix) + 1:]: value
        for name, value in (metrics or {}).items()
        if name.startswith(prefix + "_") and name[len(prefix) + 1:] not in BOOKKEEPING
    }


def results_table(rows: Dict[str, Dict[str, float]], labels: Optional[Dict[str, str]] = None) -> List[str]:
    """One line per model ({row name: metrics}), one column per metric; `labels` ({metric: heading})
    chooses and orders the columns, by default every metric with loss last."""
    names = [name for row in rows.values() for name in row]
    if labels is None:
        labels = {name: name for name in sorted(set(names), key=lambda name: (name == "loss", names.index(name)))}
    columns = [(name, heading) for name, heading in labels.items() if name in names]
    width = max(len(row) for row in rows) + 2
    lines = [" " * width + "  ".join(f"{heading:>9}" for _, heading in columns)]
    for row_name, metrics in rows.items():
        cells = [f"{metrics[name]:>9.2f}" if name in metrics else f"{'-':>9}" for name, _ in columns]
        lines.append(f"{row_name:<{width}}" + "  ".join(cells))
    return lines


def output_files(output_dir: str) -> List[str]:
    """Where the run's results are in `output_dir`: the model (with its config; an adapter, prefix or prompt with
    its config and the base it was trained on),
    its tokenizer, the settings predict takes from it, predictions, scores, the loss curve and the record of
    the run (what a rerun compares against)."""
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []

    def matching(suffixes: Iterable[str], exclude=()):
        return ", ".join(n for n in names if n.endswith(tuple(suffixes)) and n not in exclude)

    groups = [
        ("model", matching((".pdparams", ".safetensors", ".index.json", "config.json", "base_fingerprint.json"),
                           exclude=("tokenizer_config.json",))),
        ("tokenizer", matching((".model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"))),
        ("settings", matching(("generation_settings.json", "pretraining_settings.json"))),
        ("predictions", matching(("_predictions.jsonl",))),
        ("scores", matching(("_results.json",), exclude=("all_results.json",))),
        ("loss curve", matching(("training_curve.png",))),
        ("run record", matching(("run_record.json", "trainer_state.json"))),
    ]
    lines = [f"Files in {shown(output_dir)}{os.sep}"]
    lines += [f"  {label:<12}{files}" for label, files in groups if files]
    return lines


def print_summary(args, untrained: Optional[dict], trained: Optional[dict], metric_labels, seconds: float,
                  memory: Optional[str] = None):
    """The untrained vs trained table, the memory the run used (`memory`: glm.memory.plan.memory_summary),
    then where the files are."""
    rows = {name: model_metrics(metrics, prefix)
            for name, metrics, prefix in (("untrained", untrained, "untrained"),
                                          ("trained" if args.do_train else "evaluated", trained, "eval"))
            if metrics}
    say()
    for line in results_table(rows, metric_labels) if rows else []:
        say(line)
    if memory:
        say(memory)
    minutes, seconds = divmod(round(seconds), 60)
    say(f"\nDone in {minutes}:{seconds:02d}.")
    for line in output_files(args.output_dir):
        say(line)
