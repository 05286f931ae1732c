"""Tokenizer (tokenizers' tokenizer.json) and chat template (Jinja, rendered like transformers does)."""
from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


# Special tokens that mark tool calls: kept in decoded text so the server's tool-call parsers can see them
# (Mistral's [TOOL_CALLS] is a special token; a plain skip_special_tokens decode would drop it).
TOOL_CALL_MARKERS = frozenset({"[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<tool_call>", "</tool_call>"})


class ChatTemplateError(ValueError):
    pass


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise ChatTemplateError(message)


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict, chat_template: str | None):
        self.tk = tokenizer
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_token is not None
        self.bos_id = self.tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tk.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = chat_template
        self.special_ids = {i for i, t in self._added().items() if t.special}
        self.hidden_ids = {i for i in self.special_ids if self.tk.id_to_token(i) not in TOOL_CALL_MARKERS}
        self._template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(chat_template)
            except jinja2.TemplateError as e:
                raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None

    def _added(self):
        return self.tk.get_added_tokens_decoder()

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{tj}: no tokenizer.json next to the model")
        config = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(tc):
            with open(tc) as f:
                config = json.load(f)
        template = None
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_file):
            with open(jinja_file) as f:
                template = f.read()
        else:
            template = config.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template}
                template = named.get("default") or next(iter(named.values()), None)
        return cls(HFTokenizer.from_file(tj), config, template)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; skip_special_tokens drops special tokens except the tool-call markers."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.hidden_ids]
        return self.tk.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    **kwargs) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions with a raw prompt")
        try:
            return self._template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, **kwargs) -> list[int]:
        text = self.render_chat(messages, tools, add_generation_prompt, **kwargs)
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
