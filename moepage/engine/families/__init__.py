"""One module per model family: ModelArgs from config.json and the weight-name tables.

The tables map moepage's canonical names to the names in published checkpoints; the loader,
the splitter and the surgery tools all read them from here.
"""
from __future__ import annotations

from types import ModuleType

from moepage.engine.families import mixtral, olmoe, qwen2_moe, qwen3_moe

FAMILIES: dict[str, ModuleType] = {}
for _module in (qwen3_moe, qwen2_moe, mixtral, olmoe):
    for _model_type in _module.MODEL_TYPES:
        FAMILIES[_model_type] = _module


def family_for(model_type: str) -> ModuleType:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None
