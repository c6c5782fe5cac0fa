"""Answer text jobs shared by generation, the terminal chat and the web app: stop strings and history."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StopText:
    """Streamed text cut at the first of ``stops``; an end that could begin one is held back until decided.
    With ``strip`` (an answer's own ends), leading spaces are dropped and trailing ones held back. A piece
    costs work in proportion to itself and the stop strings, not to the text so far (it runs once per token)."""

    def __init__(self, stops: Sequence[str] = (), strip: bool = False):
        self.stops, self.strip = tuple(stops), strip
        self.longest = max(map(len, self.stops), default=0)
        self.text, self.emitted, self.done = "", 0, False

    def feed(self, piece: str) -> str:
        """The text that can be sent now that ``piece`` arrived ("" if none); ``done`` once a stop string came."""
        start = max(0, len(self.text) - self.longest + 1)  # where a stop string that this piece ends can begin
        self.text += piece
        if self.strip and self.emitted == 0:
            self.text, start = self.text.lstrip(), 0
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.done = self.text[:min(hits)], True
            return ""
        safe = len(self.text) - _held(self.text, self.stops)
        if self.strip:  # what was sent ends in a non-space: only the unsent part can end in spaces
            safe = self.emitted + len(self.text[self.emitted:safe].rstrip())
        out, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return out

    def rest(self) -> str:
        """What was held back and belongs to the text, once the stream is over (or cut)."""
        return (self.text.rstrip() if self.strip else self.text)[self.emitted:]


class AnswerText:
    """A streamed answer cut at the template's stop strings (its ends stripped), then at a request's own
    ``stop`` strings (the text before one kept as it is, as OpenAI's API does)."""

    def __init__(self, template_stops: Sequence[str], stop: Sequence[str] = ()):
        self.answer, self.request = StopText(template_stops, strip=True), StopText(stop)

    @property
    def done(self) -> bool:
        """Whether a stop string ended the answer."""
        return self.answer.done or self.request.done

    def feed(self, piece: str) -> str:
        """The text that can be sent now that ``piece`` arrived ("" if none)."""
        return self.request.feed(self.answer.feed(piece))

    def rest(self) -> str:
        """What was held back and belongs to the answer, once the stream is over."""
        tail = "" if self.request.done else self.request.feed(self.answer.rest())
        return tail + self.request.rest()


def _held(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop string."""
    held = 0
    for stop in filter(None, stops):
        # the leftmost place in the last len(stop) characters where the rest of text begins stop
        at = text.find(stop[0], max(0, len(text) - len(stop)))
        while at != -1 and not stop.startswith(text[at:]):
            at = text.find(stop[0], at + 1)
        held = max(held, len(text) - at if at != -1 else 0)
    return held


def fit_history(messages: list[dict], length: Callable[[list[dict]], int], budget: int) -> tuple[list[dict], int]:
    """The latest ``messages`` whose prompt takes at most ``budget`` tokens, and its ``length``: the oldest
    exchange (a user turn and its answer) goes first; a leading system turn and the last message always stay,
    so the length can still be over ``budget`` (the caller refuses that)."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    while (tokens := length(head + turns)) > budget and len(turns) > 1:
        turns = turns[2:] if len(turns) > 2 else turns[1:]
    return head + turns, tokens
