"""Language-model evaluation of GLM as THUDM does it (tasks/language_model/dataset.py): perplexity over
windows of documents (LMDataset) and the LAMBADA-style last-word cloze (LambadaDataset).

Both are blank infilling: `[CLS] prompt [MASK]` (LAMBADA keeps `<|endoftext|>` after the mask), then
`<|startofpiece|> text[:-1]` predicting `text` at the mask's position, with the sep attention mask.
"""

import math
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import paddle
import paddle.nn.functional as F

from ..errors import DataError
from ..inputs import IGNORE_INDEX, GLMExample, collate_examples
from ..prefix import prefix_model
from ..tokenization import encode_text, special_token_ids

__all__ = [
    "lm_windows", "window_example", "lambada_example", "lm_examples", "lambada_examples", "score_targets", "lm_metrics",
]  # fmt: skip


def lm_windows(tokens: Sequence[int], seq_length: int, overlapping_eval: Optional[int] = None,
               unidirectional: bool = False) -> Iterator[Tuple[List[int], List[int], int]]:
    """THUDM's LMDataset windows of one document: (prompt, text, unscored), where the first `unscored`
    text tokens are context only. Windows hold seq_length - 1 tokens and advance by overlapping_eval
    (default: a whole window). The first window's prompt is its first token. A later window's prompt is
    its first len - overlap tokens (bidirectional context), or with `unidirectional` its first token
    only, the text then scored on its last `overlap` tokens. Every token but the document's first is
    scored exactly once (but, as in THUDM, a unidirectional window's first token when the overlap is a
    whole window). (THUDM scores the last `overlap` positions of a padded short final window in
    the unidirectional mode; here exactly the tokens no earlier window scored.)"""
    window = seq_length - 1
    overlap = max(1, overlapping_eval or window)
    count = math.ceil(max(len(tokens) - window, 0) / overlap) + 1
    for index in range(count):
        chunk = list(tokens[index * overlap : index * overlap + window])
        if index == 0 or unidirectional:
            prompt, text = chunk[:1], chunk[1:]
            unscored = 0 if index == 0 else max(0, window - overlap - 1)
        else:
            prompt, text, unscored = chunk[: window - overlap], chunk[window - overlap :], 0
        if len(text) > unscored:
            yield prompt, text, unscored


def _blank_example(prompt: List[int], text: List[int], unscored: int, ids, mask_id: int, keep_eos: bool) -> GLMExample:
    source = [ids.cls] + prompt + [mask_id] + ([ids.eos] if keep_eos else [])
    mask_position = len(prompt) + 1
    return GLMExample(
        input_ids=source + [ids.sop] + text[:-1],
        position_ids=[list(range(len(source))) + [mask_position] * len(text),
                      [0] * len(source) + list(range(1, len(text) + 1))],
        sep=len(source),
        labels=[IGNORE_INDEX] * len(source) + text,
        loss_mask=[0] * (len(source) + unscored) + [1] * (len(text) - unscored),
    )


def window_example(prompt, text, unscored, ids, mask_id) -> GLMExample:
    """`[CLS] prompt [MASK] <|startofpiece|> text[:-1]`, loss on the scored text tokens (no <|endoftext|>)."""
    return _blank_example(list(prompt), list(text), unscored, ids, mask_id, keep_eos=False)


def lambada_example(context: List[int], answer: List[int], ids, mask_id) -> GLMExample:
    """`[CLS] context [MASK] <|endoftext|> <|startofpiece|> answer[:-1]`, every answer token scored."""
    return _blank_example(list(context), list(answer), 0, ids, mask_id, keep_eos=True)


def lm_examples(tokenizer, lines: Iterable[str], seq_length: int, overlapping_eval: Optional[int] = None,
                unidirectional: bool = False, mask_token: str = "[MASK]") -> List[GLMExample]:
    """The LMDataset window examples of every line (one document each)."""
    ids = special_token_ids(tokenizer)
    mask_id = tokenizer.convert_tokens_to_ids(mask_token)
    examples = []
    for line in lines:
        tokens = tokenizer(line, add_special_tokens=False)["input_ids"]
        for prompt, text, unscored in lm_windows(tokens, seq_length, overlapping_eval, unidirectional):
            examples.append(window_example(prompt, text, unscored, ids, mask_id))
    return examples


def lambada_examples(tokenizer, numbered_lines: Iterable[Tuple[int, str]], seq_length: int, name: str,
                     mask_token: str = "[MASK]", word_separator: str = "") -> Tuple[List[dict], List[GLMExample]]:
    """Per line of space-separated words (numbered for errors in file `name`): its row ({"line",
    "answer"}) and its example, the context `words[:-1]` joined by `word_separator`, the answer the last."""
    ids = special_token_ids(tokenizer)
    mask_id = tokenizer.convert_tokens_to_ids(mask_token)
    rows, examples = [], []
    for number, line in numbered_lines:
        words = line.split()
        if len(words) < 2:
            raise DataError(f"{name}:{number}: needs a context and a last word")
        context = tokenizer(word_separator.join(words[:-1]), add_special_tokens=False)["input_ids"]
        # As THUDM: the answer tokenized on its own, after the separator (" last" in English), but as the text
        # goes on (no sentencepiece "▁" before a Chinese word the line continues with: glm.tokenization.encode_text).
        answer = encode_text(tokenizer, word_separator + words[-1], continuation=True)
        if not answer:
            raise DataError(f"{name}:{number}: the last word has no tokens")
        # [CLS] context [MASK] <|endoftext|> must fit; a long context keeps its end, next to the answer.
        context = context[max(0, len(context) - (seq_length - 3)) :]
        rows.append({"line": number, "answer": words[-1]})
        examples.append(lambada_example(context, answer, ids, mask_id))
    return rows, examples


@paddle.no_grad()
def score_targets(model, examples: List[GLMExample], batch_size: int, pad_id: int,
                  progress: Optional[Callable[[int], None]] = None) -> List[Tuple[float, int, bool]]:
    """Per example: (summed negative log-likelihood of its scored tokens, their count, whether every one
    is the argmax at its position). The LM head runs on the scored positions only; the log-softmax is
    taken as cross_entropy (Paddle's CPU log_softmax is ~100x slower)."""
    model.eval()
    prefixed, glm_model = prefix_model(model), getattr(model, "model", model)  # a peft model wraps the GLM
    results = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: paddle.to_tensor(v) for k, v in collate_examples([e.features() for e in chunk], pad_id).items()}
        cache, mask = prefixed.backbone_inputs(len(chunk), batch["attention_mask"]) if prefixed else (None, batch["attention_mask"])
        hidden_states = glm_model.glm(batch["input_ids"], batch["position_ids"], mask, cache=cache, return_dict=False)[0]
        length = hidden_states.shape[1]
        positions = paddle.nonzero(batch["loss_mask"].reshape([-1])).reshape([-1])
        hidden = paddle.gather(hidden_states.reshape([-1, hidden_states.shape[-1]]), positions)
        logits = glm_model.lm_logits(hidden).astype("float32")
        labels = paddle.gather(batch["labels"].reshape([-1]), positions)
        nll = F.cross_entropy(logits, labels.unsqueeze(-1), reduction="none").reshape([-1]).numpy()
        hits = (logits.argmax(axis=-1) == labels).numpy()
        owners = positions.numpy() // length
        for row in range(len(chunk)):
            mine = owners == row
            results.append((float(nll[mine].sum(dtype="float64")), int(mine.sum()), bool(hits[mine].all())))
        if progress:
            progress(len(chunk))
    return results


def lm_metrics(results: List[Tuple[float, int, bool]]):
    """`loss` (mean token negative log-likelihood), `perplexity` = exp(loss), `tokens` scored."""
    tokens = sum(count for _, count, _ in results)
    loss = sum(total for total, _, _ in results) / max(tokens, 1)
    return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss, "tokens": tokens}
