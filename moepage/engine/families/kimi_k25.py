"""Kimi K2.5 / K2.6 (kimi_k25): a multimodal wrapper around Kimi K2's DeepSeek-V3 text model. The text config sits
under text_config (its model_type kimi_k2 or deepseek_v3), the decoder's weights under language_model.model.*, the
lm_head at language_model.lm_head.weight (the published layout, which transformers' kimi_k25 conversion maps to
model.language_model.* on load); vision_tower.* and mm_projector.* are never named, so never read or counted."""
from __future__ import annotations

from moepage.engine.families.deepseek_v3 import EXPERT_NAMES, NAMES as V3_NAMES
from moepage.engine.families.deepseek_v3 import model_args as v3_model_args
from moepage.engine.families.spec import FamilySpec, Layout
from moepage.engine.model_args import ModelArgs

MODEL_TYPES = ("kimi_k25",)
LAYOUTS = {"kimi_k25": Layout(text_config="text_config", prefix="language_model.model.")}
NAMES = {**V3_NAMES, "lm_head": "language_model.lm_head.weight"}


def model_args(config: dict) -> ModelArgs:
    return v3_model_args(config, "kimi_k25")


SPEC = FamilySpec(
    name="kimi_k25", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=("mla",), layouts=LAYOUTS,
)
