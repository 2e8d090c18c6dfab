"""Tokenizer, chat template and streaming detokenizer, with `tokenizers` and `jinja2` only.

The chat template is rendered in a jinja2 sandbox set up like transformers' `apply_chat_template`
(trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`, a non-escaping `tojson`),
so the same template gives the same prompt string on the board as on the workstation.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from runtime.errors import UserError

REPLACEMENT = "\ufffd"  # what a byte-level decoder emits for an incomplete UTF-8 sequence


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...} in older tokenizer_config files
        return value.get("content")
    return value


def compile_chat_template(template: str):
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise UserError(f"chat templates need jinja2 ({e})") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template does not parse: {e}") from None


class Tokenizer:
    def __init__(self, tokenizer_json: Path, config: dict[str, Any] | None = None,
                 chat_template: str | None = None, eos_token_ids: Iterable[int] = ()):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as e:
            raise UserError(f"the runtime needs the `tokenizers` package ({e})") from None
        tokenizer_json = Path(tokenizer_json)
        try:
            self.tok = _HFTokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises its own Exception type on a bad file
            raise UserError(f"{tokenizer_json}: cannot load the tokenizer ({e})") from None
        self.config = config or {}
        self.special = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.eos_token_ids = set(int(i) for i in eos_token_ids)
        if not self.eos_token_ids and self.special["eos_token"] is not None:
            i = self.tok.token_to_id(self.special["eos_token"])
            if i is not None:
                self.eos_token_ids.add(i)
        self.chat_template = chat_template or self.config.get("chat_template")
        self._template = None

    @classmethod
    def from_artifact(cls, folder: Path, info: dict[str, Any]) -> "Tokenizer":
        """`info` is the manifest's `tokenizer` entry: files, chat_template, bos_token_id, eos_token_ids."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: missing (the artifact carries no tokenizer)")
        config_path = folder / "tokenizer_config.json"
        config = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{config_path}: not valid JSON ({e})") from None
        eos = info.get("eos_token_ids") or []
        if isinstance(eos, int):
            eos = [eos]
        return cls(path, config, info.get("chat_template"), eos)

    # -- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    # -- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        if not self.chat_template:
            raise UserError("the artifact has no chat template (manifest tokenizer.chat_template)")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        variables = {k: v for k, v in self.special.items() if v is not None}
        variables.update(kwargs)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except Exception as e:  # jinja2.TemplateError and the template's own raise_exception
            raise UserError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # the rendered template already holds its special tokens; adding them again would double BOS
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns a stream of token ids into text pieces, never emitting half of a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character (an emoji spans up to four
    tokens); decoding such a prefix yields U+FFFD. Text is held back until the decoded window no
    longer ends in U+FFFD. Decoding a small window (from a few tokens back) rather than each token alone
    keeps the spaces and merges that depend on the neighbours right.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens already turned into emitted text

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prev = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(prev) and not text.endswith(REPLACEMENT):
            piece = text[len(prev):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """What is left at the end (an incomplete character is emitted as U+FFFD rather than dropped)."""
        prev = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(prev):] if len(text) > len(prev) else ""


class StopStrings:
    """Finds stop strings in streamed text, holding back any tail that might be the start of one."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit: str | None = None

    def feed(self, piece: str) -> str:
        """Return the text safe to emit now; after a stop string is seen, `hit` is set and nothing more comes."""
        if self.hit is not None:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        first = None
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.hit = first[1]
            out, self.pending = self.pending[:first[0]], ""
            return out
        keep = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if s.startswith(self.pending[-k:]):
                    keep = max(keep, k)
                    break
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit is not None else self.pending), ""
        return out
