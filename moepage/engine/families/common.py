"""Weight-name tables shared by the Llama-style families (canonical name -> checkpoint name)."""
from __future__ import annotations

ATTENTION = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.{L}.attn_norm": "model.layers.{L}.input_layernorm.weight",
    "layers.{L}.ffn_norm": "model.layers.{L}.post_attention_layernorm.weight",
    "layers.{L}.q": "model.layers.{L}.self_attn.q_proj.weight",
    "layers.{L}.k": "model.layers.{L}.self_attn.k_proj.weight",
    "layers.{L}.v": "model.layers.{L}.self_attn.v_proj.weight",
    "layers.{L}.o": "model.layers.{L}.self_attn.o_proj.weight",
    "layers.{L}.q_bias": "model.layers.{L}.self_attn.q_proj.bias",
    "layers.{L}.k_bias": "model.layers.{L}.self_attn.k_proj.bias",
    "layers.{L}.v_bias": "model.layers.{L}.self_attn.v_proj.bias",
    "layers.{L}.o_bias": "model.layers.{L}.self_attn.o_proj.bias",
    "layers.{L}.q_norm": "model.layers.{L}.self_attn.q_norm.weight",
    "layers.{L}.k_norm": "model.layers.{L}.self_attn.k_norm.weight",
}

QWEN_MLP = {
    "layers.{L}.router": "model.layers.{L}.mlp.gate.weight",
    "layers.{L}.dense_gate": "model.layers.{L}.mlp.gate_proj.weight",
    "layers.{L}.dense_up": "model.layers.{L}.mlp.up_proj.weight",
    "layers.{L}.dense_down": "model.layers.{L}.mlp.down_proj.weight",
    "layers.{L}.shared_gate": "model.layers.{L}.mlp.shared_expert.gate_proj.weight",
    "layers.{L}.shared_up": "model.layers.{L}.mlp.shared_expert.up_proj.weight",
    "layers.{L}.shared_down": "model.layers.{L}.mlp.shared_expert.down_proj.weight",
    "layers.{L}.shared_expert_gate": "model.layers.{L}.mlp.shared_expert_gate.weight",
}

QWEN_EXPERTS = {
    "gate": "model.layers.{L}.mlp.experts.{E}.gate_proj.weight",
    "up": "model.layers.{L}.mlp.experts.{E}.up_proj.weight",
    "down": "model.layers.{L}.mlp.experts.{E}.down_proj.weight",
}

# llama.cpp GGUF names for the same canonical names (shared with the GGUF reader and exporter).
GGUF = {
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
    "layers.{L}.attn_norm": "blk.{L}.attn_norm.weight",
    "layers.{L}.ffn_norm": "blk.{L}.ffn_norm.weight",
    "layers.{L}.q": "blk.{L}.attn_q.weight",
    "layers.{L}.k": "blk.{L}.attn_k.weight",
    "layers.{L}.v": "blk.{L}.attn_v.weight",
    "layers.{L}.o": "blk.{L}.attn_output.weight",
    "layers.{L}.q_bias": "blk.{L}.attn_q.bias",
    "layers.{L}.k_bias": "blk.{L}.attn_k.bias",
    "layers.{L}.v_bias": "blk.{L}.attn_v.bias",
    "layers.{L}.o_bias": "blk.{L}.attn_output.bias",
    "layers.{L}.q_norm": "blk.{L}.attn_q_norm.weight",
    "layers.{L}.k_norm": "blk.{L}.attn_k_norm.weight",
    "layers.{L}.router": "blk.{L}.ffn_gate_inp.weight",
    "layers.{L}.dense_gate": "blk.{L}.ffn_gate.weight",
    "layers.{L}.dense_up": "blk.{L}.ffn_up.weight",
    "layers.{L}.dense_down": "blk.{L}.ffn_down.weight",
    "layers.{L}.shared_gate": "blk.{L}.ffn_gate_shexp.weight",
    "layers.{L}.shared_up": "blk.{L}.ffn_up_shexp.weight",
    "layers.{L}.shared_down": "blk.{L}.ffn_down_shexp.weight",
    "layers.{L}.shared_expert_gate": "blk.{L}.ffn_gate_inp_shexp.weight",
}
GGUF_EXPERTS = {
    "gate": "blk.{L}.ffn_gate_exps.weight",
    "up": "blk.{L}.ffn_up_exps.weight",
    "down": "blk.{L}.ffn_down_exps.weight",
}
