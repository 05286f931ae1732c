"""The supported model families: one FamilySpec each (families/spec.py), found by config.json's model_type or a
GGUF file's general.architecture."""
from __future__ import annotations

from moepage.engine.families import (
    deepseek_v2, deepseek_v3, gemma4, glm4_moe, glm4_moe_lite, gpt_oss, kimi_k25, mixtral, olmoe, qwen2_moe,
    qwen3_5_moe, qwen3_moe, qwen3_next,
)
from moepage.engine.families.spec import FamilySpec, Layout  # noqa: F401
from moepage.engine.model_args import ConfigError

SPECS: tuple[FamilySpec, ...] = tuple(m.SPEC for m in (qwen3_moe, qwen2_moe, mixtral, olmoe, qwen3_5_moe, qwen3_next,
                                                         gpt_oss, glm4_moe, deepseek_v2, deepseek_v3, glm4_moe_lite,
                                                         kimi_k25, gemma4))
FAMILIES: dict[str, FamilySpec] = {t: s for s in SPECS for t in s.model_types}
GGUF_FAMILIES: dict[str, FamilySpec] = {s.gguf_arch: s for s in SPECS if s.gguf_arch}


def family_for(model_type) -> FamilySpec:
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    shown = repr(model_type) if isinstance(model_type, str) and len(model_type) <= 64 else "(not a known name)"
    raise ConfigError(f"model_type: unsupported architecture {shown}; supported: {', '.join(sorted(FAMILIES))}")


def family_for_gguf(arch) -> FamilySpec | None:
    return GGUF_FAMILIES.get(arch) if isinstance(arch, str) else None


def dense_twin_of(model_type) -> FamilySpec | None:
    """The family whose dense twin model_type is (llama: Mixtral's, as llama.cpp files Mixtral under llama)."""
    if model_type == "llama":
        return FAMILIES["mixtral"]
    return next((s for s in SPECS if s.dense_model_type == model_type), None)
