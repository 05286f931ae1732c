"""Tokenizer (tokenizers' tokenizer.json) and chat template (Jinja, rendered like transformers does, in a bounded
sandbox: moepage.engine.chat_template)."""
from __future__ import annotations

import os

import jinja2
from tokenizers import Tokenizer as HFTokenizer

from moepage.engine.chat_template import (  # noqa: F401 (re-exported: the server maps these to HTTP errors)
    ChatTemplateError, RenderLimits, TemplateStopped, TemplateTimeout, TemplateTooLarge, compile_template,
)
from moepage.paging.model_paths import read_model_json, resolve_model_file
from moepage.paging.pread import CheckpointError

MAX_TEMPLATE_BYTES = 4 << 20

# Special tokens that mark tool calls: kept in decoded text so the server's tool-call parsers can see them
# (Mistral's [TOOL_CALLS] is a special token; a plain skip_special_tokens decode would drop it), and Harmony's
# message markers (gpt-oss: server/harmony.py splits channels and tool calls on them).
TOOL_CALL_MARKERS = frozenset({"[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<tool_call>", "</tool_call>",
                               "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|call|>",
                               "<|return|>"})
GIL_FREE_CHARS = 2048  # texts (and id lists) longer than this are encoded (decoded) with the GIL released
PIECE_MIN_CHARS = 16384  # encode_within counts a long text in pieces of at least this many characters
PIECE_CHARS_PER_TOKEN = 8  # ... and of this many characters per token of the limit


class TokenLimitExceeded(ValueError):
    """The text has more than `limit` tokens; `counted` is exact, or a count of pieces (exact=False) when the text
    was given up on before tokenizing it whole."""

    def __init__(self, limit: int, counted: int, exact: bool):
        super().__init__(f"more than {limit} tokens" + ("" if exact else f" ({counted} counted in pieces)"))
        self.limit, self.counted, self.exact = limit, counted, exact


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _pieces(text: str, size: int):
    """text cut into pieces of about `size` characters, each cut just before a space where one is near."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            space = text.rfind(" ", start + size // 2, end)
            end = space if space > start else end
        yield text[start:end]
        start = end


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict, chat_template: str | None,
                 template_source: str = "the model's chat_template"):
        self.tk = tokenizer
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_token is not None
        self.bos_id = self.tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tk.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = chat_template
        self.template_source = template_source
        self.special_ids = {i for i, t in self._added().items() if t.special}
        self.hidden_ids = {i for i in self.special_ids if self.tk.id_to_token(i) not in TOOL_CALL_MARKERS}
        self._env = self._template = None
        if chat_template:
            self._env, self._template = compile_template(chat_template, template_source)

    def _added(self):
        return self.tk.get_added_tokens_decoder()

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj = resolve_model_file(path, "tokenizer.json", "tokenizer.json", must_exist=False)
        if tj is None:
            raise FileNotFoundError(f"{os.path.join(path, 'tokenizer.json')}: no tokenizer.json next to the model")
        tc = os.path.join(path, "tokenizer_config.json")
        config = read_model_json(path, "tokenizer_config.json", "tokenizer_config.json", must_exist=False) or {}
        if not isinstance(config, dict):
            raise CheckpointError(f"{tc}: tokenizer_config.json must be a JSON object")
        template = None
        jinja_file = resolve_model_file(path, "chat_template.jinja", "chat_template.jinja", must_exist=False)
        if jinja_file is not None:
            if os.path.getsize(jinja_file) > MAX_TEMPLATE_BYTES:
                raise CheckpointError(f"{jinja_file}: chat template is larger than {MAX_TEMPLATE_BYTES >> 20} MiB")
            with open(jinja_file, encoding="utf-8", errors="replace") as f:
                template = f.read()
            source = jinja_file
        else:
            template = config.get("chat_template")
            source = f"{tc}: chat_template"
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default") or next(iter(named.values()), None)
            if template is not None and not isinstance(template, str):
                raise CheckpointError(f"{tc}: chat_template must be a string or a list of named templates")
        try:
            tk = HFTokenizer.from_file(tj)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # tokenizers: Exception or pyo3's PanicException; the message may quote the file
            raise CheckpointError(f"{tj}: not a valid tokenizer.json (the tokenizers library cannot load it)") from None
        return cls(tk, config, template, source)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def _ids(self, text: str) -> list[int]:
        if len(text) > GIL_FREE_CHARS:  # encode holds the GIL throughout; encode_batch lets other threads run
            return self.tk.encode_batch([text], add_special_tokens=False)[0].ids
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._ids(text)
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def encode_within(self, text: str, limit: int, add_special_tokens: bool = True) -> list[int]:
        """encode(text), or TokenLimitExceeded when it has more than `limit` tokens. A long text is counted in
        pieces first and given up on once they hold more than twice the limit (a cut changes a few tokens at
        most), so the work and memory stay bounded by the limit, not by the text."""
        piece = max(PIECE_MIN_CHARS, PIECE_CHARS_PER_TOKEN * limit)
        if len(text) > piece:
            counted = 0
            for part in _pieces(text, piece):
                counted += len(self._ids(part))
                if counted > 2 * limit:
                    raise TokenLimitExceeded(limit, counted, exact=False)
        ids = self.encode(text, add_special_tokens)
        if len(ids) > limit:
            raise TokenLimitExceeded(limit, len(ids), exact=True)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; skip_special_tokens drops special tokens except the tool-call markers."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.hidden_ids]
        if len(ids) > GIL_FREE_CHARS:  # as in _ids: the batch call lets other threads run
            return self.tk.decode_batch([ids], skip_special_tokens=False)[0]
        return self.tk.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    limits: RenderLimits | None = None, **kwargs) -> str:
        """The chat template's text for messages; limits bound its time and size (TemplateTimeout, TemplateTooLarge,
        TemplateStopped)."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions with a raw prompt")
        try:
            return self._env.render(self._template, limits, messages=messages, tools=tools,
                                    add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                                    eos_token=self.eos_token or "", **kwargs)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, limits: RenderLimits | None = None,
                            **kwargs) -> list[int]:
        text = self.render_chat(messages, tools, add_generation_prompt, limits, **kwargs)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer, prompt_tail: list[int] | None = None, skip_special_tokens: bool = True):
        self.tk = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_tail or [])[-4:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tk.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tk.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        prefix = self.tk.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tk.decode(self.ids[self.prefix_offset :], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
