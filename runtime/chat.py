"""Multi-turn chat in the terminal. Each turn renders the whole conversation with the chat template;
the engine finds the cached prefix (all earlier turns) and prefills only the new user message.

Commands: /reset (forget the conversation), /exit (or Ctrl-D).
"""
from __future__ import annotations

import sys
from typing import Callable, TextIO

from runtime.engine import Engine
from runtime.sampling import SamplingParams


class ChatSession:
    def __init__(self, engine: Engine, system: str | None = None, sampling: SamplingParams | None = None,
                 max_new_tokens: int = 256, stop: tuple[str, ...] = ()):
        self.engine = engine
        self.system = system
        self.sampling = sampling or SamplingParams()
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.engine.reset()

    def send(self, text: str, on_piece: Callable[[str], None] | None = None) -> tuple[str, dict]:
        """Add a user turn, stream the reply through `on_piece`, return (reply, stats)."""
        self.messages.append({"role": "user", "content": text})
        stats: dict = {}
        pieces = []
        for piece in self.engine.stream(self.messages, self.max_new_tokens, self.sampling, self.stop, stats=stats):
            pieces.append(piece)
            if on_piece:
                on_piece(piece)
        reply = "".join(pieces)
        self.messages.append({"role": "assistant", "content": reply})
        return reply, stats


def run_chat(engine: Engine, session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
             show_stats: bool = False) -> int:
    interactive = stdin.isatty()
    if interactive:
        print("awq-edge chat: /reset to start over, /exit to quit", file=stdout)
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            session.reset()
            print("(conversation reset)", file=stdout)
            continue

        def emit(piece):
            stdout.write(piece)
            stdout.flush()

        _, stats = session.send(text, emit)
        stdout.write("\n")
        if show_stats:
            n = stats.get("decode_steps", 0)
            rate = n / stats["decode_s"] if stats.get("decode_s") else float("nan")
            print(f"[{stats['prefilled_tokens']} new prompt tokens of {stats['prompt_tokens']}, "
                  f"ttft {stats.get('ttft_s', 0) * 1e3:.0f} ms, {rate:.1f} tok/s]", file=stdout)
        stdout.flush()
    return 0
