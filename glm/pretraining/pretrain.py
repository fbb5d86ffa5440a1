"""A pretraining run on the task skeleton (glm.training.task): the corpus and flags checked before anything
is written, --dump_examples, the sequential stream, and evaluation by held-out loss per objective.

Everything that can be refused is refused before --output_dir is touched: a directory that is not a
prepared corpus, a tokenizer other than the corpus's, a --seq_length above the model's maximum, objective
flags out of range, a corpus smaller than one window.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Dict, Optional, Tuple

import paddle
from paddlenlp.datasets import MapDataset
from paddlenlp.trainer.trainer_utils import EvalLoopOutput
from paddlenlp.utils.batch_sampler import DistributedBatchSampler

from ..bounds import COUNT, check_flag, check_lengths
from ..checkpoint import load_checkpoint_tokenizer
from ..cli import console
from ..configuration import GLMConfig
from ..errors import DataError, UserError
from ..files import write_jsonl_atomic
from ..generation_settings import GENERATION_SETTINGS, GenerationArguments
from ..tokenization import GLMSpecialIds, special_token_ids
from ..training.run_record import directory_fingerprint, model_fingerprint
from ..training.task import Task, TaskData, run_task
from ..training.trainer import GLMTrainer
from ..understanding.language_model import score_targets
from .corpus import PretrainingCorpus, ensure_corpus, open_corpus
from .dataset import BatchCollator, PretrainingDataset, held_out_examples, training_examples
from .objective import OBJECTIVES, BlankInfillingBuilder, sentence_end_table
from .windows import WindowSampler

__all__ = ["CorpusArguments", "PretrainingTrainer", "PretrainingTask", "pretrain", "prepare_on_demand", "PRETRAINING_SETTINGS"]

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


@dataclass
class Stream:
    """What pretraining reads, opened and checked: the corpus, its stream of windows, the collator that
    builds their examples, the model's tokenizer and special ids."""

    corpus: PretrainingCorpus
    stream: PretrainingDataset
    collator: BatchCollator
    builder: BlankInfillingBuilder
    tokenizer: object
    ids: GLMSpecialIds
    sentence_end: object


def planned_row_tokens(objective_args) -> Tuple[int, int]:
    """(tokens, scored tokens) of a training example at its longest, over the objectives in the mix (an
    upper bound: the longest example's length, the most scored tokens). A span becomes a blank in part A
    and `<|startofpiece|> span` in part B: an example is its window plus one token per span; a document
    span may take nearly the whole window; token spans are 3 tokens long on average."""
    length, mix = objective_args.seq_length, objective_args.mixture()
    shapes = []  # (tokens, scored) per objective
    if mix["document"] > 0:
        shapes.append((length + 2, length))
    if mix["sentence"] > 0:
        covered = math.ceil(objective_args.gap_sentence_ratio * length)
        shapes.append((length + 8, covered + 8))  # a handful of sentences
    if mix["token"] > 0:
        spans = math.ceil(objective_args.bert_ratio * length / 3)
        shapes.append((length + spans, math.ceil(objective_args.bert_ratio * length) + spans))
    return max(tokens for tokens, _ in shapes), max(scored for _, scored in shapes)


def open_stream(model_args, corpus_args, objective_args, training_args, prepare=None) -> Stream:
    """Every flag and the corpus checked (nothing is written), corpora made on demand (`prepare(tokenizer)`,
    prepare_on_demand, once the flags are known to be good), and the stream of training windows."""
    problem = objective_args.problem()
    if problem:
        raise UserError(problem)
    for name in ("eval_windows", "dump_count"):
        check_flag(name, getattr(corpus_args, name), COUNT)
    if not corpus_args.corpus_dir:
        raise UserError("--corpus_dir is required (prepare one with tools/prepare_pretraining_data.py)")
    tokenizer = load_checkpoint_tokenizer(model_args.model_name_or_path)
    limit = GLMConfig.from_pretrained(model_args.model_name_or_path).max_sequence_length
    check_lengths({"seq_length": objective_args.seq_length}, limit)
    if prepare is not None:
        prepare(tokenizer)
    ids, sentence_end = special_token_ids(tokenizer), sentence_end_table(tokenizer)
    builder = BlankInfillingBuilder(objective_args, ids, sentence_end)
    corpus = checked_corpus(corpus_args.corpus_dir, tokenizer, model_args.model_name_or_path, objective_args.seq_length)
    windows = WindowSampler(corpus, objective_args.seq_length, ids, sentence_end, training_args.seed)
    collator = BatchCollator(builder, training_args.seed, ids.pad)
    return Stream(corpus, PretrainingDataset(windows, 0), collator, builder, tokenizer, ids, sentence_end)


def decoding_settings(objective_args) -> dict:
    """What predict_generation.py and server.py take by default from a pretrained checkpoint, so that it
    decodes as it is: sources as long as the windows it learned from, answers of at most a window (and
    at most predict's default of 160), no minimum length (a blank's answer ends when the model ends it,
    as pretraining taught), and the document objective's [gMASK] appended to a source without a blank
    when that objective was trained ([MASK] otherwise)."""
    generation = dict(asdict(GenerationArguments()), min_tgt_length=0)
    seq_length = objective_args.seq_length
    mask_token = "[gMASK]" if objective_args.mixture()["document"] > 0 else "[MASK]"
    return dict(generation, src_length=seq_length, tgt_length=min(seq_length, 160), mask_token=mask_token)


class PretrainingTask(Task):
    """Blank-infilling pretraining on the task skeleton: the stream in order, the held-out loss per objective."""

    trainer_class = PretrainingTrainer
    metric_labels = METRIC_LABELS

    def __init__(self, model_args, corpus_args, objective_args, training_args, stream: Stream,
                 given_flags=frozenset(), default_recipe=None):
        super().__init__(model_args, training_args, given_flags)
        self.corpus_args, self.objective_args, self.default_recipe = corpus_args, objective_args, default_recipe
        self.opened, self.held_out = stream, None

    def prepare(self):
        corpus_args, objective_args, training_args, opened = (self.corpus_args, self.objective_args, self.training_args,
                                                              self.opened)  # fmt: skip
        if training_args.do_eval or corpus_args.eval_before_training:
            if not corpus_args.eval_corpus_dir:
                raise UserError("evaluation needs a held-out corpus: pass --eval_corpus_dir, or --do_train alone")
            eval_corpus = checked_corpus(corpus_args.eval_corpus_dir, opened.tokenizer, self.model_args.model_name_or_path,
                                         objective_args.seq_length)
            eval_windows = WindowSampler(eval_corpus, objective_args.seq_length, opened.ids, opened.sentence_end,
                                         training_args.seed)
            self.held_out = held_out_examples(eval_windows, opened.builder, training_args.seed, corpus_args.eval_windows)
        if training_args.max_steps <= 0:  # an epoch is one pass of windows over the corpus
            training_args.max_steps = math.ceil(training_args.num_train_epochs * opened.stream.samples_per_epoch
                                                / samples_per_step(training_args))
        opened.stream.length = training_args.max_steps * samples_per_step(training_args)

    def recorded_arguments(self):
        return (self.corpus_args, self.objective_args)

    def inputs(self):
        return {"model_name_or_path": model_fingerprint(self.model_args.model_name_or_path),
                "corpus_dir": directory_fingerprint(self.opened.corpus.path)}

    def lengths(self):
        return {"seq_length": self.objective_args.seq_length}

    def config_overrides(self):
        return {"label_smoothing": self.model_args.label_smoothing}

    def eval_before_training(self):
        return self.corpus_args.eval_before_training

    def row_tokens(self):
        return planned_row_tokens(self.objective_args)

    def data(self, tokenizer) -> TaskData:
        corpus, stream, held_out = self.opened.corpus, self.opened.stream, self.held_out
        mixture = ", ".join(f"{objective} {share:g}" for objective, share in self.objective_args.mixture().items())
        about = {
            "corpus": f"{console.shown(corpus.path)}: {corpus.describe()}, {stream.samples_per_epoch:,} windows "
                      f"of {self.objective_args.seq_length} (an epoch)",
            "blanks": f"{mixture} of the batches",
        }
        if held_out:
            about["held-out"] = f"{console.shown(self.corpus_args.eval_corpus_dir)}: {self.corpus_args.eval_windows} " \
                                "windows per objective"
        return TaskData(
            stream if self.training_args.do_train else None,
            # The Trainer evaluates only with an eval_dataset; evaluation_loop scores `held_out` itself.
            MapDataset([e.features() for examples in held_out.values() for e in examples]) if held_out else None,
            self.opened.collator,
            trainer_arguments=dict(held_out=held_out, mixture=self.objective_args.mixture(), pad_id=self.opened.ids.pad),
            about=about,
            extra_files={PRETRAINING_SETTINGS: {"objective": asdict(self.objective_args), "corpus": corpus.metadata},
                         GENERATION_SETTINGS: decoding_settings(self.objective_args)},
        )


def pretrain(model_args, corpus_args, objective_args, training_args, callbacks=(), task_recipe=None, prepare=None,
             given_flags=frozenset()):
    """The run (or, with --dump_examples, the examples it would draw); None when nothing was trained.
    `prepare(tokenizer)`, if given, makes corpora on demand (prepare_on_demand) once the flags are known to be
    good; `given_flags`, the flags the user typed."""
    stream = open_stream(model_args, corpus_args, objective_args, training_args, prepare)
    if corpus_args.dump_examples:
        return dump_examples(corpus_args, stream.stream, stream.collator, training_args.per_device_train_batch_size)
    task = PretrainingTask(model_args, corpus_args, objective_args, training_args, stream, given_flags, task_recipe)
    return run_task(task, callbacks)


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
