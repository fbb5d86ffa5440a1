"""The generation task's helpers: its trainer (evaluation by decoding the dev set) and its metrics
(Chinese ROUGE-1/2/L and BLEU-4 on jieba words), as PaddleNLP's llm/glm/utils.py holds them."""

import os
import unicodedata
from typing import Dict, List

import paddle

from glm.cli.console import progress_bar
from glm.files import write_jsonl_atomic
from glm.generation import GLMGenerator, default_banned_ids, generate_answers
from glm.training.trainer import GLMTrainer

__all__ = ["GenerationTrainer", "generation_metrics"]


class GenerationTrainer(GLMTrainer):
    """The shared GLM trainer, plus evaluation by generation (beam search, Chinese ROUGE and BLEU)."""

    def __init__(self, *args, builder, generation_config, eval_rows, **kwargs):
        super().__init__(*args, **kwargs)
        self.builder = builder
        self.generation_config = generation_config
        self.eval_rows = eval_rows  # (sources, references, rows) for evaluation by generation

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval", max_eval_iters=-1):
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix, max_eval_iters
        )
        if self.eval_rows is not None:
            metrics = self.generate_and_score(metric_key_prefix)
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
        return output

    def generate_and_score(self, prefix: str):
        """Decode the dev sources (each rank a share), gather, score; the main process writes predictions."""
        sources, references, rows = self.eval_rows
        rank, world = self.args.process_index, self.args.world_size
        mine = list(range(rank, len(sources), world))
        generator = GLMGenerator(self.model, self.builder.ids, default_banned_ids(self.model.config, self.tokenizer))
        quiet = self.args.disable_tqdm or rank != 0
        with progress_bar(len(mine), f"{prefix}: generating", "row", disable=quiet) as bar:
            answers = generate_answers(
                generator, self.builder, [sources[i] for i in mine], self.generation_config,
                self.args.per_device_eval_batch_size, progress=bar.update,
            )
        predictions = {i: answer[0][0] for i, answer in zip(mine, answers)}
        if world > 1:
            gathered = []
            paddle.distributed.all_gather_object(gathered, predictions)
            predictions = {i: text for part in gathered for i, text in part.items()}
        ordered = [predictions[i] for i in range(len(sources))]
        if self.args.should_save:
            write_jsonl_atomic(
                os.path.join(self.args.output_dir, f"{prefix}_predictions.jsonl"),
                (dict(row, prediction=text) for row, text in zip(rows, ordered)),
            )
        return generation_metrics(ordered, references)


def _segment(text: str) -> List[str]:
    import jieba

    # The GLM tokenizer normalises with NFKC (，becomes ,): compare texts in that form on both sides.
    return [word for word in jieba.cut(unicodedata.normalize("NFKC", text)) if word.strip()]


def generation_metrics(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """ROUGE-1/2/L (mean sentence F1) and corpus BLEU-4 on jieba words, in percent.

    Scored on words, not token ids (the anchor scores sentencepiece ids). An empty prediction scores 0.
    """
    import jieba
    from paddlenlp.metrics import BLEU
    from rouge import Rouge

    jieba.setLogLevel(60)  # jieba prints its dictionary loading to stderr otherwise
    rouge, bleu = Rouge(), BLEU(n_size=4)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        hypothesis_words, reference_words = _segment(prediction), _segment(reference)
        bleu.add_inst(hypothesis_words, [reference_words])
        if not hypothesis_words or not reference_words:
            continue
        scores = rouge.get_scores(" ".join(hypothesis_words), " ".join(reference_words))[0]
        totals["rouge1"] += scores["rouge-1"]["f"]
        totals["rouge2"] += scores["rouge-2"]["f"]
        totals["rougeL"] += scores["rouge-l"]["f"]
    count = max(len(predictions), 1)
    metrics = {name: round(100 * value / count, 4) for name, value in totals.items()}
    # PaddleNLP's BLEU divides by the hypothesis length: all predictions empty (a diverged model) score 0.
    scorable = any(_segment(prediction) for prediction in predictions)
    metrics["bleu4"] = round(100 * bleu.score(), 4) if scorable else 0.0
    return metrics
