"""The PaddleNLP Trainer as every GLM task trains with it: THUDM's decay-to-ratio schedule, a resumable
single-process shuffle, checkpoints that appear only when complete (crash_safety.py) and rotate in a
single process too, and a stop at the first non-finite loss."""

import math
import os
from functools import partial

import paddle
from paddle.io import DistributedBatchSampler
from paddlenlp.trainer import ProgressCallback, Trainer
from paddlenlp.trainer.trainer_utils import PREFIX_CHECKPOINT_DIR
from paddlenlp.utils.log import logger

from ..errors import UserError
from ..files import crash_point, write_json_atomic
from ..lora import BASE_FINGERPRINT
from . import console
from .crash_safety import STAGING, publish_checkpoint, staging_dir

__all__ = ["GLMTrainer", "TrainingDiverged", "lr_factor"]


def lr_factor(step: int, warmup: int, total: int, ratio: float, cosine: bool) -> float:
    """Linear warm-up, then linear or cosine decay from 1 to `ratio` at the last step (THUDM's AnnealingLR)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cosine else 1.0 - progress
    return ratio + (1.0 - ratio) * decay


class EpochSeededBatchSampler(DistributedBatchSampler):
    """One process's shuffled batches, the order a function of (seed, epoch) only."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, num_replicas=1, rank=0, **kwargs)
        self.seed = seed

    def set_epoch(self, epoch=0, consumed_samples=0):
        super().set_epoch(self.seed + epoch)


class TrainingDiverged(UserError):
    """A non-finite loss or weights: training stops before anything non-finite is saved."""


class GLMTrainer(Trainer):
    """The PaddleNLP Trainer with THUDM's decay-to-ratio schedule, a resumable single-process shuffle,
    checkpoints that appear only when complete (rotated outside paddle.distributed.launch too) and a stop
    at the first non-finite loss. Task trainers subclass it for evaluation."""

    def __init__(self, *args, lr_decay_ratio, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_decay_ratio = lr_decay_ratio
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(console.ConsoleProgress)
        self.last_finite_loss = None  # (step, loss)
        save = self._save_ckpt_func

        def save_then_crash_point(obj, path, *args, **kwargs):
            save(obj, path, *args, **kwargs)
            crash_point(f"saved:{os.path.basename(path)}")
            crash_point(f"torn:{os.path.basename(path)}", torn_file=path)

        self._save_ckpt_func = save_then_crash_point  # the weights and optimizer files of every save

    def training_step(self, model, inputs):
        # The loss, not the gradients: with fp16 dynamic loss scaling, steps the scaler skips for inf
        # gradients are normal and keep a finite loss. One host sync per step is the price.
        loss = super().training_step(model, inputs)
        step = self.state.global_step + 1
        value = float(loss) * max(1, self.args.gradient_accumulation_steps)
        if not math.isfinite(value):
            last = f"the last finite loss was {self.last_finite_loss[1]:.4g} at step {self.last_finite_loss[0]}" \
                if self.last_finite_loss else "no step before it had a finite loss"
            raise TrainingDiverged(
                f"the loss became {value} at step {step} ({last}); nothing was saved from this step on. "
                "Try a lower --learning_rate (on a GPU with fp16: bf16, or a smaller --scale_loss)"
            )
        self.last_finite_loss = (step, value)
        return loss

    def check_finite_weights(self):
        for name, param in self.model.named_parameters():
            if not bool(paddle.isfinite(param).all()):
                raise TrainingDiverged(
                    f"parameter {name} holds non-finite values at step {self.state.global_step}; not saving it. "
                    "Try a lower --learning_rate (on a GPU with fp16: bf16, or a smaller --scale_loss)"
                )

    def _save(self, output_dir=None, state_dict=None, merge_tensor_parallel=False):
        super()._save(output_dir, state_dict, merge_tensor_parallel)
        fingerprint = getattr(self.model, "base_fingerprint", None)
        if fingerprint is not None and self.args.should_save:
            write_json_atomic(os.path.join(output_dir or self.args.output_dir, BASE_FINGERPRINT), fingerprint)

    def create_scheduler(self, num_training_steps: int):
        schedule = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
        if self.lr_scheduler is None and schedule in ("linear", "cosine"):
            warmup = self.args.get_warmup_steps(num_training_steps)
            factor = partial(
                lr_factor, warmup=warmup, total=num_training_steps, ratio=self.lr_decay_ratio, cosine=schedule == "cosine"
            )
            self.lr_scheduler = paddle.optimizer.lr.LambdaDecay(self.args.learning_rate, factor)
        elif self.lr_decay_ratio and schedule not in ("linear", "cosine"):
            logger.warning(f"lr_decay_ratio applies to linear and cosine schedules; {schedule} ignores it")
        return super().create_scheduler(num_training_steps)

    def _get_train_sampler(self):
        # PaddleNLP shuffles a single process's data from the global RNG, so a run resumed in a later
        # epoch sees another order than the run it continues. A sampler shuffled by (seed + epoch),
        # which the Trainer sets at every epoch (set_epoch), gives a resumed run the same order.
        if self.args.world_size > 1 or self.train_dataset is None:
            return super()._get_train_sampler()
        return EpochSeededBatchSampler(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=True,
            drop_last=self.args.dataloader_drop_last,
            seed=self.args.seed,
        )

    def _save_checkpoint(self, model, metrics=None):
        # PaddleNLP writes checkpoint-N in place, trainer_state.json before the RNG state, and its
        # get_last_checkpoint takes the highest number: a kill mid-save blocked or silently reset every
        # rerun. The whole checkpoint is written under .staging and renamed once complete.
        self.check_finite_weights()
        run_dir = self.args.output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING)
        if self.args.should_save:
            staging_dir(run_dir, name)
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, metrics)
        finally:
            self.args.output_dir = run_dir
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        if self.args.should_save:
            paddle.save(self.args, os.path.join(staged, "training_args.bin"))  # with the real output_dir
            publish_checkpoint(staged, final)
            # PaddleNLP rotates only when local_rank == 0 (never in a single process), and here it
            # would rotate inside .staging.
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
