"""Requests to token ids: chat messages through the model's template, completion prompts, fill-in-the-middle."""
from __future__ import annotations

import json

from moepage.engine.tokenizer import (
    ChatTemplateError, RenderLimits, TemplateStopped, TemplateTimeout, TemplateTooLarge, TokenLimitExceeded, Tokenizer,
)
from moepage.server.errors import APIError, bad_request, context_overflow
from moepage.server.protocol import ChatMessage, Tool

# (prefix, suffix, middle) token spellings, Qwen2.5-Coder/Qwen3-Coder first, then StarCoder/DeepSeek-Coder.
FIM_TOKEN_SETS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)


def require_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer; send token ids in `prompt`", code="no_tokenizer")
    return tokenizer


def _text_of(content, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"content part type {part.type!r} is not supported: this model reads text only",
                              param=f"messages[{index}].content[{j}]", code="unsupported_content")
        parts.append(part.text)
    return "".join(parts)


def _arguments(raw):
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, dict) else raw


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        msg = {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content, i)}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out


def tool_dicts(tools: list[Tool] | None) -> list[dict] | None:
    if not tools:
        return None
    return [t.model_dump(exclude_none=True) for t in tools]


def encode_bounded(tk: Tokenizer, text: str, ctx_size: int | None, what: str, add_special_tokens: bool = True):
    """tk.encode(text), refusing (400 context_length_exceeded) a text with no room in the context, found without
    tokenizing all of a text far too long for it."""
    if ctx_size is None:
        return tk.encode(text, add_special_tokens)
    try:
        return tk.encode_within(text, ctx_size - 1, add_special_tokens)
    except TokenLimitExceeded as e:
        raise context_overflow(ctx_size, e.counted if e.exact else f"more than {e.limit}", what) from None


def chat_prompt_ids(tokenizer: Tokenizer | None, messages: list[ChatMessage], tools: list[Tool] | None = None,
                    add_generation_prompt: bool = True, template_kwargs: dict | None = None,
                    limits: RenderLimits | None = None, ctx_size: int | None = None) -> list[int]:
    """Token ids of messages through the chat template (rendering bounded by limits; prompts with no room in
    ctx_size refused). CPU work: run it off the event loop."""
    tk = require_tokenizer(tokenizer)
    reserved = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "limits"}
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in reserved}
    try:
        text = tk.render_chat(template_messages(messages), tools=tool_dicts(tools),
                              add_generation_prompt=add_generation_prompt, limits=limits, **kwargs)
    except TemplateTimeout as e:
        raise APIError(500, f"{e}; fix the template, or raise --template-timeout", code="chat_template_timeout") \
            from None
    except TemplateStopped as e:
        raise APIError(503, str(e), code="shutting_down") from None
    except TemplateTooLarge as e:
        raise bad_request(f"{e}, more than the context of {ctx_size} tokens can hold", param="messages",
                          code="context_length_exceeded") from None
    except ChatTemplateError as e:
        raise bad_request(str(e), param="messages", code="chat_template_error") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as e:
        raise bad_request(f"the chat template could not render these messages: {type(e).__name__}: {e}",
                          param="messages", code="chat_template_error") from None
    return encode_bounded(tk, text, ctx_size, "messages", add_special_tokens=False)


def fim_tokens(tokenizer: Tokenizer) -> tuple[int, int, int] | None:
    for names in FIM_TOKEN_SETS:
        ids = [tokenizer.token_to_id(n) for n in names]
        if all(i is not None for i in ids):
            return tuple(ids)
    return None


def completion_prompts(tokenizer: Tokenizer | None, prompt, suffix: str | None, vocab_size: int,
                       ctx_size: int | None = None) -> list[list[int]]:
    """Each prompt of the request as token ids (a string, strings, ids, or lists of ids); text with no room in
    ctx_size refused. CPU work: run it off the event loop."""
    if isinstance(prompt, str):
        raw = [prompt]
    elif prompt and isinstance(prompt[0], int):
        raw = [prompt]
    else:
        raw = list(prompt)
    out = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            ids = _text_prompt(require_tokenizer(tokenizer), p, suffix, ctx_size)
        else:
            bad = next((t for t in p if t >= vocab_size), None)
            if bad is not None:
                raise bad_request(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param="prompt")
            if suffix is not None:
                raise bad_request("suffix needs a text prompt, not token ids", param="suffix")
            ids = list(p)
        if not ids:
            raise bad_request("the prompt is empty", param="prompt" if len(raw) == 1 else f"prompt[{i}]")
        out.append(ids)
    return out


def _text_prompt(tk: Tokenizer, prompt: str, suffix: str | None, ctx_size: int | None) -> list[int]:
    if suffix is None:
        return encode_bounded(tk, prompt, ctx_size, "prompt")
    fim = fim_tokens(tk)
    if fim is None:
        names = ", ".join(s[0] for s in FIM_TOKEN_SETS)
        raise bad_request(
            f"this model's tokenizer has no fill-in-the-middle tokens (looked for {names} and their suffix/middle "
            f"partners), so `suffix` is not supported; send the prompt without it",
            param="suffix", code="fim_not_supported",
        )
    pre, suf, mid = fim
    prefix_ids = [tk.bos_id] if tk.add_bos and tk.bos_id is not None else []
    return prefix_ids + [pre] + encode_bounded(tk, prompt, ctx_size, "prompt", False) + [suf] + \
        encode_bounded(tk, suffix, ctx_size, "suffix", False) + [mid]
