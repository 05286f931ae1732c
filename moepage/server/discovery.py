"""What clients probe before they talk: the served context on /v1/models (OpenAI, vLLM and llama-server spellings)
and llama-server's GET /props (n_ctx, total_slots, chat_template_caps, default_generation_settings, ...)."""
from __future__ import annotations

import re

from moepage import __version__
from moepage.engine.engine import Engine
from moepage.server.protocol import ModelCard
from moepage.server.settings import ServerSettings


def template_caps(template: str | None) -> dict[str, bool]:
    """llama-server's chat_template_caps, read from what the template's source refers to."""
    t = template or ""
    has = lambda pattern: re.search(pattern, t) is not None  # noqa: E731
    tool_calls = has(r"\btool_calls\b")
    return {
        "supports_tools": has(r"\btools\b"),
        "supports_tool_calls": tool_calls,
        "supports_tool_responses": has(r"""['"]tool['"]""") or has(r"\btool_response"),
        "supports_system_role": has(r"""['"]system['"]"""),
        "supports_parallel_tool_calls": tool_calls and has(r"for\s+\w+\s+in\s+[\w.]*tool_calls"),
        "supports_tool_call_id": has(r"\btool_call_id\b"),
        "supports_thinking": has(r"<think>") or has(r"\benable_thinking\b"),
        "supports_enable_thinking": has(r"\benable_thinking\b"),
        "supports_preserve_reasoning": has(r"\breasoning_content\b"),
    }


def model_card(engine: Engine, settings: ServerSettings, created: int) -> ModelCard:
    a = engine.args
    return ModelCard(id=settings.model_id, created=created, max_model_len=engine.ctx_size,
                     context_length=engine.ctx_size,
                     meta={"n_ctx": engine.ctx_size, "n_ctx_train": a.max_position_embeddings,
                           "n_vocab": a.vocab_size, "n_embd": a.hidden_size})


def props(engine: Engine, settings: ServerSettings) -> dict:
    """GET /props as llama-server answers it (model_path is the served id: no local paths go out)."""
    tk = engine.tokenizer
    template = tk.chat_template if tk is not None else None
    n_ctx = engine.ctx_size
    return {
        "default_generation_settings": {
            "id": 0, "n_ctx": n_ctx, "is_processing": False,
            "params": {"n_predict": -1, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                       "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                       "cache_prompt": engine.prompt_cache is not None},
        },
        "n_ctx": n_ctx,
        "n_ctx_train": engine.args.max_position_embeddings,
        "total_slots": len(engine.slots),
        "model_alias": settings.model_id,
        "model_path": settings.model_id,
        "modalities": {"vision": False, "audio": False},
        "endpoint_slots": False, "endpoint_props": True, "endpoint_metrics": True,
        "chat_template": template or "",
        "chat_template_caps": template_caps(template),
        "bos_token": (tk.bos_token or "") if tk is not None else "",
        "eos_token": (tk.eos_token or "") if tk is not None else "",
        "build_info": f"moepage {__version__}",
        "is_sleeping": False,
    }


def context_warning(requested: int | None, trained: int) -> str | None:
    """A start-up warning when --ctx-size asks for more positions than the model was trained on."""
    if requested is None or requested <= trained:
        return None
    return (f"warning: --ctx-size {requested} is above the model's max_position_embeddings {trained}: positions past "
            f"{trained} were never trained and output there degrades")
