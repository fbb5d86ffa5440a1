"""Answer tokens to the text a client receives, piece by piece, so that the pieces joined are exactly the
text of the whole answer (what predict_generation.py writes), cut at the client's stop strings."""

from typing import Callable, List, Optional, Sequence

__all__ = ["AnswerText", "ChoiceText"]


class AnswerText:
    """One answer (one blank, one copy) as its tokens arrive.

    The final text is `decode(tokens).strip()`, as generate_answers makes it. A piece is sent only when the
    text decoded so far extends what was sent: a token that ends inside a multi-byte character decodes to
    U+FFFD until the character completes, and trailing white space may still be stripped, so both wait."""

    def __init__(self, decode: Callable[[List[int]], str]):
        self.decode = decode
        self.tokens: List[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self.decode(self.tokens).strip()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def finish(self, tokens: Sequence[int]) -> str:
        """The rest of the final answer `tokens` (what generate returned for this blank and copy)."""
        text = self.decode(list(tokens)).strip()
        if not text.startswith(self.sent):  # never seen with GLM's tokenizer; tests/test_serving_text.py checks
            raise RuntimeError(f"streamed text {self.sent!r} is not a prefix of the answer {text!r}")
        return text[len(self.sent):]


class ChoiceText:
    """The text of one choice: the answer alone (one blank) or, with `segments` (the literal text around
    two or more blanks), the text with its blanks filled, as predict's `filled`. Cut before the first of
    `stops`; a tail that could begin a stop string is held back until it cannot."""

    def __init__(self, segments: Optional[List[str]] = None, stops: Sequence[str] = ()):
        self.segments = segments
        self.stops = [stop for stop in stops if stop]
        self.text = ""
        self.sent = 0
        self.stopped = False  # a stop string was met: nothing more is added

    def begin(self) -> str:
        return self._add(self.segments[0]) if self.segments else ""

    def answer(self, piece: str) -> str:
        return self._add(piece)

    def end_blank(self, blank: int, rest: str) -> str:
        """`rest` of blank `blank`'s answer, then the literal text up to the next blank (filled text)."""
        piece = self._add(rest)
        if self.segments:
            piece += self._add(self.segments[blank + 1])
        return piece

    def finish(self) -> str:
        """What was held back: the choice is complete."""
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece

    def _add(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        self.text += piece
        found = [index for index in (self.text.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True
            return self.finish()
        held = max([k for stop in self.stops for k in range(1, len(stop)) if self.text.endswith(stop[:k])], default=0)
        end = max(self.sent, len(self.text) - held)
        piece, self.sent = self.text[self.sent:end], end
        return piece
