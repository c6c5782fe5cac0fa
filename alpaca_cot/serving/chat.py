"""Terminal chat and streaming output shared by generate.py and server.py."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import closing
from typing import TextIO

from alpaca_cot.data.templates import record_from_messages
from alpaca_cot.errors import UserError
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.generation.text import fit_history


class ChatSession:
    """One conversation: its turns, kept within the context window, answered by streaming."""

    def __init__(self, generator: Generator, params: SamplingParams, context_window: int | None = None,
                 system: str | None = None):
        self.generator = generator
        self.params = params
        self.context_window = int(context_window or generator.context_window())
        if self.context_window <= params.max_new_tokens:
            raise UserError(f"--max_new_tokens {params.max_new_tokens} leaves no room for a prompt in a "
                            f"context window of {self.context_window} tokens; lower it")
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []  # user and assistant messages, alternating

    def clear(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.turns = []

    def _prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.generator.prompt_ids(record_from_messages(messages)))

    def prompt_budget(self) -> int:
        """Tokens the prompt may take: the context window less room for the answer."""
        return self.context_window - self.params.max_new_tokens

    def ask(self, text: str) -> int:
        """Add a user message, dropping the oldest exchanges until the prompt fits; returns how many were dropped.

        Raises UserError, and keeps the history as it was, when the message alone cannot fit.
        """
        asked = [*self.system, *self.turns, {"role": "user", "content": text}]
        kept, length = fit_history(asked, self._prompt_tokens, self.prompt_budget())
        if length > self.prompt_budget():
            raise UserError(f"This message makes a {length}-token prompt; with --max_new_tokens "
                            f"{self.params.max_new_tokens} only {self.prompt_budget()} tokens fit the "
                            f"{self.context_window}-token context window. Send a shorter message.")
        self.turns = kept[len(self.system):]
        return (len(asked) - len(kept)) // 2

    def answer(self, stop_event: threading.Event | None = None) -> Iterator[str]:
        """Stream the answer to the last message; it joins the history, even when stopped early."""
        pieces: list[str] = []
        try:
            for piece in self.generator.stream(record_from_messages(self.system + self.turns), self.params, stop_event):
                pieces.append(piece)
                yield piece
        finally:
            self.turns.append({"role": "assistant", "content": "".join(pieces).strip()})


def print_stream(pieces: Iterable[str], out: TextIO = sys.stdout) -> str:
    """Write text pieces as they come (flushed); returns the whole text."""
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    out.write("\n")
    out.flush()
    return "".join(text)


def print_answer(label: str, pieces: Iterator[str]) -> None:
    """Print ``label`` and the streamed answer; Ctrl-C stops it (its generation too) and says so."""
    print(label, end="", flush=True)
    try:
        with closing(pieces):
            print_stream(pieces)
    except KeyboardInterrupt:
        print(" [stopped]", flush=True)


def read_line(prompt: str) -> str | None:
    """A line from the terminal; None at end of input (Ctrl-D). Ctrl-C discards the line, as in a shell."""
    while True:
        try:
            return input(prompt)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print()


def answer_loop(generator: Generator, params: SamplingParams) -> None:
    """The original generate.py loop: read an instruction, stream its response; Ctrl-D quits."""
    print("Type an instruction and press Enter. Ctrl-C stops a response; Ctrl-D quits.", flush=True)
    while True:
        instruction = read_line("\nInstruction: ")
        if instruction is None:
            return
        if not instruction.strip():
            continue
        print_answer("Response: ", generator.stream({"instruction": instruction, "input": ""}, params))


CHAT_HELP = ("Type a message and press Enter. 'clear' empties the history; 'stop' or Ctrl-D quits; "
             "Ctrl-C stops an answer.")


def chat_loop(session: ChatSession) -> None:
    """The original server.py loop: multi-turn chat with 'clear' and 'stop'; Ctrl-C stops an answer."""
    print(CHAT_HELP, flush=True)
    while True:
        text = read_line("\nUser: ")
        command = "stop" if text is None else text.strip()
        if command == "stop":
            return
        if command == "clear":
            session.clear()
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")  # clear the screen, as the original did
            print(f"History cleared. {CHAT_HELP}", flush=True)
            continue
        if not command:
            continue
        try:
            dropped = session.ask(text)
        except UserError as e:
            print(e, flush=True)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest exchange{'s' if dropped > 1 else ''} to fit the "
                  f"{session.context_window}-token context window)", flush=True)
        print_answer("Assistant: ", session.answer())
