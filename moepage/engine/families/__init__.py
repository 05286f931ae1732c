"""One module per model family: ModelArgs from config.json and the weight-name tables.

The tables map moepage's canonical names to the names in published checkpoints; the loader,
the splitter and the surgery tools all read them from here.
"""
from __future__ import annotations

from types import ModuleType

from moepage.engine.families import mixtral, olmoe, qwen2_moe, qwen3_moe
from moepage.engine.model_args import ConfigError

FAMILIES: dict[str, ModuleType] = {}
for _module in (qwen3_moe, qwen2_moe, mixtral, olmoe):
    for _model_type in _module.MODEL_TYPES:
        FAMILIES[_model_type] = _module


def family_for(model_type) -> ModuleType:
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    shown = repr(model_type) if isinstance(model_type, str) and len(model_type) <= 64 else "(not a known name)"
    raise ConfigError(f"model_type: unsupported architecture {shown}; supported: {', '.join(sorted(FAMILIES))}")
