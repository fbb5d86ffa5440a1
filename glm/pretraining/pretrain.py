"""A pretraining run on the shared driver (glm.training): the corpus and flags checked before anything is
written, --dump_examples, the sequential stream, and evaluation by held-out loss per objective.

Everything that can be refused is refused before --output_dir is touched: a directory that is not a
prepared corpus, a tokenizer other than the corpus's, a --seq_length above the model's maximum, objective
flags out of range, a corpus smaller than one window.
"""

import math
import os
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Dict, Optional, Tuple

import paddle
from paddlenlp.datasets import MapDataset
from paddlenlp.trainer import set_seed
from paddlenlp.trainer.trainer_utils import EvalLoopOutput
from paddlenlp.transformers import AutoTokenizer
from paddlenlp.utils.batch_sampler import DistributedBatchSampler

from ..configuration import GLMConfig
from ..errors import DataError, UserError
from ..files import write_jsonl_atomic
from ..tokenization import load_tokenizer, special_token_ids
from ..training import console
from ..training.arguments import resolve_amp
from ..training.driver import last_checkpoint_to_resume, load_for_training, train_and_evaluate
from ..training.run_record import directory_fingerprint, model_fingerprint, run_settings
from ..training.trainer import GLMTrainer
from ..understanding.language_model import score_targets
from .corpus import ensure_corpus, open_corpus
from .dataset import BatchCollator, PretrainingDataset, held_out_examples, training_examples
from .objective import OBJECTIVES, BlankInfillingBuilder, sentence_end_table
from .windows import WindowSampler

__all__ = ["CorpusArguments", "PretrainingTrainer", "pretrain", "prepare_on_demand", "PRETRAINING_SETTINGS"]

PRETRAINING_SETTINGS = "pretraining_settings.json"  # beside the model: the objective's flags and the corpus
METRIC_LABELS = {f"loss_{objective}": f"{objective} loss" for objective in OBJECTIVES} | {"loss": "eval loss"}


@dataclass
class CorpusArguments:
    # What only reaches evaluation or the dump: not part of the run's settings record (run_record.py).
    free_flags: ClassVar[Tuple[str, ...]] = ("eval_corpus_dir", "eval_windows", "eval_before_training", "dump_examples",
                                             "dump_count")
    corpus_dir: Optional[str] = field(
        default=None, metadata={"help": "The prepared corpus to train on (tools/prepare_pretraining_data.py)."})
    eval_corpus_dir: Optional[str] = field(
        default=None, metadata={"help": "A prepared held-out corpus: evaluation reports its loss per objective "
                                        "(eval_loss_token, eval_loss_sentence, eval_loss_document)."})
    eval_windows: int = field(default=64, metadata={"help": "Held-out windows scored per objective at each evaluation."})
    eval_before_training: bool = field(default=False, metadata={"help": "Score the untrained model first."})
    dump_examples: Optional[str] = field(
        default=None, metadata={"help": "Write the first --dump_count examples training would draw to this JSON "
                                        "Lines file and exit without training."})
    dump_count: int = field(default=100, metadata={"help": "Examples written by --dump_examples."})


def samples_per_step(training_args) -> int:
    """Windows one optimizer step consumes over all processes."""
    return (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * max(1, training_args.dataset_world_size))


class PretrainingTrainer(GLMTrainer):
    """The shared GLM trainer reading the stream in order, and evaluating the held-out loss per objective."""

    def __init__(self, *args, held_out, mixture, pad_id, **kwargs):
        super().__init__(*args, **kwargs)
        self.held_out, self.mixture, self.pad_id = held_out, mixture, pad_id

    def steps_per_epoch(self) -> int:
        # An epoch of pretraining is a pass of windows over the corpus; the stream itself is as long as
        # the run (max_steps is always set), which PaddleNLP's train takes for one epoch.
        return max(1, math.ceil(self.train_dataset.samples_per_epoch / samples_per_step(self.args)))

    def _get_train_sampler(self):
        # In order: a sample's index is its place in the stream, and a resumed run is started at the
        # consumed samples (the Trainer sets them on PaddleNLP's sampler) instead of replaying the batches.
        return DistributedBatchSampler(
            self.train_dataset, batch_size=self.args.per_device_train_batch_size, shuffle=False,
            num_replicas=self.args.dataset_world_size, rank=self.args.dataset_rank,
            drop_last=self.args.dataloader_drop_last,
        )  # fmt: skip

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval", max_eval_iters=-1):
        rank, world = self.args.process_index, self.args.world_size
        mine = {objective: examples[rank::world] for objective, examples in self.held_out.items()}
        metrics = {}
        with console.progress_bar(sum(map(len, mine.values())), f"{metric_key_prefix}: held-out loss", "window",
                                  disable=self.args.disable_tqdm or rank != 0) as bar:
            for objective in OBJECTIVES:
                scored = score_targets(self.model, mine[objective], self.args.per_device_eval_batch_size, self.pad_id,
                                       progress=bar.update)
                sums = [sum(nll for nll, _, _ in scored), sum(count for _, count, _ in scored)]
                if world > 1:
                    gathered = []
                    paddle.distributed.all_gather_object(gathered, sums)
                    sums = [sum(part[0] for part in gathered), sum(part[1] for part in gathered)]
                metrics[f"{metric_key_prefix}_loss_{objective}"] = sums[0] / max(sums[1], 1)
        # What training minimises, in expectation over the objectives' shares of the batches.
        metrics[f"{metric_key_prefix}_loss"] = sum(
            share * metrics[f"{metric_key_prefix}_loss_{objective}"] for objective, share in self.mixture.items())
        return EvalLoopOutput(predictions=None, label_ids=None, num_samples=sum(map(len, self.held_out.values())),
                              metrics=metrics)


def pretrain(model_args, corpus_args, objective_args, training_args, callbacks=(), task_recipe=None, prepare=None):
    """The run (or, with --dump_examples, the examples it would draw); None when nothing was trained.
    `prepare(tokenizer)`, if given, makes corpora on demand (prepare_on_demand) once the flags are known to be
    good."""
    problem = objective_args.problem()
    if problem:
        raise UserError(problem)
    if corpus_args.eval_windows < 1 or corpus_args.dump_count < 1:
        raise UserError("--eval_windows and --dump_count must be at least 1")
    if not corpus_args.corpus_dir:
        raise UserError("--corpus_dir is required (prepare one with tools/prepare_pretraining_data.py)")
    tokenizer = model_tokenizer(model_args.model_name_or_path)
    limit = GLMConfig.from_pretrained(model_args.model_name_or_path).max_sequence_length
    if objective_args.seq_length > limit:
        raise UserError(f"--seq_length {objective_args.seq_length} exceeds the model's max_sequence_length {limit}: "
                        f"pass --seq_length {limit} or less")
    if prepare is not None:
        prepare(tokenizer)
    ids, sentence_end = special_token_ids(tokenizer), sentence_end_table(tokenizer)
    builder = BlankInfillingBuilder(objective_args, ids, sentence_end)
    corpus = checked_corpus(corpus_args.corpus_dir, tokenizer, model_args.model_name_or_path, objective_args.seq_length)
    windows = WindowSampler(corpus, objective_args.seq_length, ids, sentence_end, training_args.seed)
    collator = BatchCollator(builder, training_args.seed, ids.pad)
    stream = PretrainingDataset(windows, 0)
    if corpus_args.dump_examples:
        return dump_examples(corpus_args, stream, collator, training_args.per_device_train_batch_size)

    held_out = None
    if training_args.do_eval or corpus_args.eval_before_training:
        if not corpus_args.eval_corpus_dir:
            raise UserError("evaluation needs a held-out corpus: pass --eval_corpus_dir, or --do_train alone")
        eval_corpus = checked_corpus(corpus_args.eval_corpus_dir, tokenizer, model_args.model_name_or_path,
                                     objective_args.seq_length)
        eval_windows = WindowSampler(eval_corpus, objective_args.seq_length, ids, sentence_end, training_args.seed)
        held_out = held_out_examples(eval_windows, builder, training_args.seed, corpus_args.eval_windows)
    if training_args.max_steps <= 0:  # an epoch is one pass of windows over the corpus
        training_args.max_steps = math.ceil(training_args.num_train_epochs * stream.samples_per_epoch
                                            / samples_per_step(training_args))
    stream.length = training_args.max_steps * samples_per_step(training_args)

    dtype = resolve_amp(training_args)
    resume = last_checkpoint_to_resume(training_args, run_settings(
        (model_args, corpus_args, objective_args, training_args),
        inputs={"model_name_or_path": model_fingerprint(model_args.model_name_or_path),
                "corpus_dir": directory_fingerprint(corpus.path)},
    ))
    set_seed(training_args.seed)
    model, _ = load_for_training(model_args, dtype, {"seq_length": objective_args.seq_length}, task_recipe=task_recipe,
                                 label_smoothing=model_args.label_smoothing)
    trainer = PretrainingTrainer(
        model=model,
        args=training_args,
        train_dataset=stream if training_args.do_train else None,
        # The Trainer evaluates only with an eval_dataset; evaluation_loop scores `held_out` itself.
        eval_dataset=MapDataset([e.features() for examples in held_out.values() for e in examples]) if held_out else None,
        tokenizer=tokenizer,
        data_collator=collator,
        callbacks=list(callbacks),
        held_out=held_out,
        mixture=objective_args.mixture(),
        pad_id=ids.pad,
        lr_decay_ratio=model_args.lr_decay_ratio,
    )
    mixture = ", ".join(f"{objective} {share:g}" for objective, share in objective_args.mixture().items())
    settings = {"objective": asdict(objective_args), "corpus": corpus.metadata}
    train_and_evaluate(
        trainer, resume, half_precision=dtype is not None, eval_before_training=corpus_args.eval_before_training,
        extra_files={PRETRAINING_SETTINGS: settings},
        about={
            "model": console.describe_model(model_args, model),
            "corpus": f"{console.shown(corpus.path)}: {corpus.describe()}, {stream.samples_per_epoch:,} windows "
                      f"of {objective_args.seq_length} (an epoch)",
            "blanks": f"{mixture} of the batches",
            **({"held-out": f"{console.shown(corpus_args.eval_corpus_dir)}: {corpus_args.eval_windows} windows per "
                            f"objective"} if held_out else {}),
        },
        metric_labels=METRIC_LABELS,
    )
    return trainer


def prepare_on_demand(sources: Dict[str, str], text_key: str, tokenizer, corpus_args, training_args):
    """Corpora the run names that are built from a known file ({corpus dir: JSON Lines file}, the embedded
    default's): prepared with the model's tokenizer on first use, and again when the file changed. Nothing
    is prepared when another corpus the run names is not a prepared one: the run refuses it next."""
    named = [path for path in (corpus_args.corpus_dir, corpus_args.eval_corpus_dir) if path]
    for path in named:
        if path not in sources:
            try:
                open_corpus(path)
            except DataError:
                return
    wanted = [path for path in sources if path in named]
    if wanted and training_args.process_index == 0:
        for path in wanted:
            if ensure_corpus(path, [sources[path]], tokenizer, text_key=text_key):
                console.say(f"prepared {console.shown(path)} from {console.shown(sources[path])}")
    if wanted and training_args.world_size > 1:
        paddle.distributed.barrier()  # the other workers open it once it is there


def model_tokenizer(model_name_or_path: str):
    """The model's tokenizer, checked for GLM (a directory, or a PaddleNLP name)."""
    if os.path.isdir(model_name_or_path):
        return load_tokenizer(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    special_token_ids(tokenizer)
    return tokenizer


def checked_corpus(path: str, tokenizer, tokenizer_path: str, seq_length: int):
    corpus = open_corpus(path)
    corpus.check_tokenizer(tokenizer, tokenizer_path)
    if corpus.window_tokens < seq_length:
        raise DataError(f"{path} holds {corpus.window_tokens} tokens (with [CLS] and <|endoftext|>), fewer than one "
                        f"window of --seq_length {seq_length}")
    return corpus


def dump_examples(corpus_args, stream: PretrainingDataset, collator, batch_size: int) -> None:
    """The first --dump_count examples training would draw (one process, this batch size), as JSON Lines."""
    examples = training_examples(stream, collator, batch_size)
    rows = (next(examples).record() for _ in range(corpus_args.dump_count))
    write_jsonl_atomic(corpus_args.dump_examples, rows)
    console.say(f"wrote {corpus_args.dump_count} examples to {console.shown(corpus_args.dump_examples)}")
