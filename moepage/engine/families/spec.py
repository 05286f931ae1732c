"""FamilySpec: everything moepage knows about one model family, in one typed record.

The loader, the splitter, the GGUF reader and exporter and the surgery tools read these records; no other module
keeps a table of families. A family module holds its name tables (canonical name -> checkpoint name), its
`model_args(config)` and, where llama.cpp has the architecture, its GGUF metadata mapping, then one FamilySpec.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from moepage.engine.families import common
from moepage.engine.model_args import ConfigError, ModelArgs


@dataclass(frozen=True)
class Layout:
    """Where a model type keeps its text model: the config key of the text config inside a multimodal wrapper
    (None: the config is the text config) and the prefix its decoder weights carry instead of `model.`."""

    text_config: str | None = None
    prefix: str = "model."


@dataclass(frozen=True)
class FamilySpec:
    name: str  # ModelArgs.family
    model_types: tuple[str, ...]  # config.json model_type values (a multimodal wrapper's included)
    model_args: Callable[[dict], ModelArgs]  # from the text config
    names: Mapping[str, str]  # canonical resident name (layers.{L}.q) -> checkpoint name, under the `model.` prefix
    expert_names: Mapping[str, str]  # gate | up | down -> checkpoint name of routed expert {E} of layer {L}
    mixers: tuple[str, ...] = ("full_attention",)  # the layer_types this family's layers may take
    layouts: Mapping[str, Layout] = field(default_factory=dict)  # model_type -> Layout; absent: Layout()
    dense_model_type: str | None = None  # the dense twin (extract --dense, GGUF export of a dense result)
    gguf_arch: str | None = None  # llama.cpp general.architecture
    gguf_norm_topk: bool = True  # llama.cpp's top-k renormalisation when a file has no expert_weights_norm
    gguf_norm_topk_fixed: bool = False  # llama.cpp's graph ignores expert_weights_norm for this architecture
    gguf_config: Callable[..., dict] | None = None  # (GGUFFields) -> this family's config.json keys
    gguf_names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(common.GGUF))
    gguf_expert_names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(common.GGUF_EXPERTS))
    gguf_tensor: Callable | None = None  # (GGUF name, tensor) -> tensor as the family's math takes it
    # (TensorIndex, expert names) -> the ExpertSource of an HF checkpoint whose experts are not stored one tensor per
    # expert (gpt-oss's fused [E, ...] tensors); None: SafetensorsExpertSource
    expert_source: Callable | None = None
    # (GGUFFile, expert names, MoE layers) -> the ExpertSource of a .gguf file when it is not GGUFExpertSource
    gguf_expert_source: Callable | None = None

    def layout(self, config: dict) -> Layout:
        return self.layouts.get(config.get("model_type"), Layout())

    def text_config(self, config: dict) -> dict:
        """The text model's config: config itself, or the one inside a multimodal wrapper (the wrapper's dtype and
        tie_word_embeddings win: transformers keeps them at the top)."""
        key = self.layout(config).text_config
        if key is None:
            return config
        text = config.get(key)
        if not isinstance(text, dict):
            raise ConfigError(f"{key} must be an object holding the text model's config")
        top = {k: config[k] for k in ("dtype", "torch_dtype", "tie_word_embeddings") if k in config}
        return {**text, **top}

    def args(self, config: dict) -> ModelArgs:
        return self.model_args(self.text_config(config))

    def checkpoint_names(self, config: dict) -> tuple[dict[str, str], dict[str, str]]:
        """(resident names, expert names) of this config's layout (its weight prefix applied)."""
        prefix = self.layout(config).prefix
        move = lambda n: prefix + n[len("model."):] if n.startswith("model.") else n  # noqa: E731
        return {c: move(n) for c, n in self.names.items()}, {p: move(n) for p, n in self.expert_names.items()}
