"""The PaddleNLP Trainer as every GLM task trains with it: THUDM's decay-to-ratio schedule, a resumable
single-process shuffle, checkpoints that appear only when complete (checkpoints.py), rotate in a
single process too and record the run's settings (run_record.py), a resume that stops at max_steps and
reports the whole run's loss, results written atomically, and a stop at the first non-finite loss."""

import dataclasses
import json
import math
import os
from functools import partial
from typing import Optional

import paddle
from paddle.distributed.parallel import sync_params_buffers
from paddle.io import DistributedBatchSampler
from paddlenlp.trainer import ProgressCallback, Trainer, TrainerState
from paddlenlp.trainer import trainer as paddlenlp_trainer
from paddlenlp.trainer.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from paddlenlp.utils.log import logger

from ..errors import TrainingDiverged
from ..files import crash_point, write_json_atomic
from ..lora import BASE_FINGERPRINT
from ..prefix import prefix_model
from ..ptuning import PromptTunedModel
from . import console
from .checkpoints import STAGING, TRAINER_STATE, checkpoint_step, publish_checkpoint, staging_dir
from .run_record import RECORD_FILE, RunSettings, read_record, total_steps

__all__ = ["GLMTrainer", "lr_factor"]


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


class GLMTrainer(Trainer):
    """The PaddleNLP Trainer with THUDM's decay-to-ratio schedule, a resumable single-process shuffle,
    checkpoints that appear only when complete (rotated outside paddle.distributed.launch too) and hold
    the run's record, a resume that stops at max_steps, and a stop at the first non-finite loss. Task
    trainers subclass it for evaluation.

    `run_settings` (run_record.run_settings) go into every record; `base_fingerprint` (a LoRA or prefix run's
    base, lora.base_fingerprint) is written beside every saved adapter or prefix."""

    def __init__(self, *args, lr_decay_ratio, run_settings: Optional[RunSettings] = None,
                 base_fingerprint: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_decay_ratio = lr_decay_ratio
        self.run_settings, self.base_fingerprint = run_settings, base_fingerprint
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(console.ConsoleProgress)
        self.last_finite_loss = None  # (step, loss)
        self.earlier_loss_sum = 0.0  # the step losses of the run before the checkpoint it resumed
        self.train_loss_sum = None  # all of the run's step losses, once trained
        self._unlogged_loss = None  # the Trainer's running loss since its last log, during training
        self._steps_per_epoch = None
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

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, as PaddleNLP's train counts them."""
        if self._steps_per_epoch is None:
            self._steps_per_epoch = max(len(self.get_train_dataloader()) // self.args.gradient_accumulation_steps, 1)
        return self._steps_per_epoch

    def total_steps(self) -> int:
        return total_steps(self.args.max_steps, self.args.num_train_epochs, self.steps_per_epoch())

    def train(self, resume_from_checkpoint=None, ignore_keys_for_eval=None):
        # Overridden for two resume bugs of PaddleNLP's train: resumed from a checkpoint at max_steps, it
        # skips to that step's batch and trains one step more (13 of 12); and its train_loss is the sum
        # of the losses this process trained divided by all the run's steps.
        record = read_record(resume_from_checkpoint) if resume_from_checkpoint else None
        self.earlier_loss_sum = record.get("train_loss_sum", 0.0) if record else 0.0
        if resume_from_checkpoint and checkpoint_step(resume_from_checkpoint) >= self.total_steps():
            return self._trained_until(resume_from_checkpoint)
        # PaddleNLP's 'Skipping the first batches' bar (drawn unlabelled first) would stand beside the run's
        # own, which starts at the resumed step (console.ConsoleProgress): it is drawn disabled.
        original_tqdm = paddlenlp_trainer.tqdm
        paddlenlp_trainer.tqdm = partial(original_tqdm, disable=True)
        try:
            output = super().train(resume_from_checkpoint, ignore_keys_for_eval)
        finally:
            paddlenlp_trainer.tqdm = original_tqdm
        self._unlogged_loss = None  # now in _total_loss_scalar
        self.train_loss_sum = self.earlier_loss_sum + self._total_loss_scalar
        loss = self.train_loss_sum / max(output.global_step, 1)
        output.metrics["train_loss"] = loss
        self.state.log_history[-1]["train_loss"] = loss  # the entry Trainer.train logged its metrics in
        return TrainOutput(output.global_step, loss, output.metrics)

    def _trained_until(self, checkpoint):
        """The run's training ended at `checkpoint` (a kill came after it): its weights and state, no step."""
        self.load_trained_weights(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE))
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()
        self.train_loss_sum = self.earlier_loss_sum
        loss = self.train_loss_sum / max(self.state.global_step, 1)
        metrics = {"train_loss": loss}
        self.log(metrics)  # adds progress_or_epoch, as to the metrics of a run that trained
        return TrainOutput(self.state.global_step, loss, metrics)

    def load_trained_weights(self, directory):
        """The weights saved in `directory` (a checkpoint or a final model, full, LoRA or a prefix), on every
        process."""
        if prefix_model(self.model) is not None:
            self.model.fold_like(directory)  # a final model's prefix is saved folded
        self._load_from_checkpoint(directory)

    def _load_from_checkpoint(self, resume_from_checkpoint=None):
        if isinstance(self.model, PromptTunedModel) and resume_from_checkpoint:
            self.model.load_saved(resume_from_checkpoint)  # what _save wrote, on every process
            return
        super()._load_from_checkpoint(resume_from_checkpoint)
        if self.args.world_size > 1:  # PaddleNLP loads on data-parallel rank 0 only (training's wrap broadcasts)
            sync_params_buffers(self.model, fuse_params=False)

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        # Overridden to see the running loss a checkpoint saved here must count in its record's loss sum.
        self._unlogged_loss = tr_loss
        super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)

    def run_record(self) -> dict:
        """What a checkpoint (or a finished run) records: settings, planned steps, losses so far."""
        loss_sum = self.train_loss_sum
        if loss_sum is None:  # during training
            unlogged = float(self._unlogged_loss) if self._unlogged_loss is not None else 0.0
            loss_sum = self.earlier_loss_sum + self._total_loss_scalar + unlogged
        return {
            "settings": self.run_settings.to_json() if self.run_settings else None,
            "steps_per_epoch": self.steps_per_epoch(),
            "total_steps": self.state.max_steps,
            "global_step": self.state.global_step,
            "train_loss_sum": loss_sum,
        }

    def save_metrics(self, split, metrics, combined=True):
        # Overridden: PaddleNLP writes *_results.json in place, so a kill mid-write tore them.
        if not self.is_world_process_zero():
            return
        write_json_atomic(os.path.join(self.args.output_dir, f"{split}_results.json"), metrics, indent=4, sort_keys=True)
        if combined:
            path = os.path.join(self.args.output_dir, "all_results.json")
            try:
                with open(path, encoding="utf-8") as f:
                    everything = json.load(f)
            except (OSError, ValueError):
                everything = {}
            write_json_atomic(path, dict(everything, **metrics), indent=4, sort_keys=True)

    def save_state(self):
        # Overridden: PaddleNLP writes trainer_state.json in place (see save_metrics).
        if self.is_world_process_zero():
            write_json_atomic(os.path.join(self.args.output_dir, TRAINER_STATE), dataclasses.asdict(self.state),
                              indent=2, sort_keys=True)

    def check_finite_weights(self):
        for name, param in self.model.named_parameters():
            if not bool(paddle.isfinite(param).all()):
                raise TrainingDiverged(
                    f"parameter {name} holds non-finite values at step {self.state.global_step}; not saving it. "
                    "Try a lower --learning_rate (on a GPU with fp16: bf16, or a smaller --scale_loss)"
                )

    def _save(self, output_dir=None, state_dict=None, merge_tensor_parallel=False):
        if isinstance(self.model, PromptTunedModel):
            # PaddleNLP saves a model that is not a PretrainedModel as one state dict: a frozen base's
            # weights in every checkpoint. The prompt saves itself (and the backbone when it trains).
            output_dir = output_dir or self.args.output_dir
            if self.args.should_save:
                self.model.save_pretrained(output_dir)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(output_dir)
                paddle.save(self.args, os.path.join(output_dir, "training_args.bin"))
        else:
            super()._save(output_dir, state_dict, merge_tensor_parallel)
        if self.base_fingerprint is not None and self.args.should_save:
            write_json_atomic(os.path.join(output_dir or self.args.output_dir, BASE_FINGERPRINT), self.base_fingerprint)

    def create_optimizer(self, lr_scheduler=None):
        # Gradients released after each optimizer step (PaddleNLP's clear_grad zeroes them in place, so they
        # stay allocated through the next forward pass, the moment activations peak): the next backward
        # creates them again. A step's peak is then lower by the gradients' size (12 % of a 12-layer,
        # hidden-1024 GLM's; bench/memory.py), with the same numbers (0 + g is g).
        optimizer = super().create_optimizer(lr_scheduler)
        if not getattr(optimizer, "_glm_releases_grads", False):
            clear_grad = optimizer.clear_grad
            optimizer.clear_grad = lambda set_to_zero=False: clear_grad(set_to_zero=False)
            optimizer._glm_releases_grads = True
        return optimizer

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
            write_json_atomic(os.path.join(staged, RECORD_FILE), self.run_record())
            publish_checkpoint(staged, final)
            # PaddleNLP rotates only when local_rank == 0 (never in a single process), and here it
            # would rotate inside .staging.
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
