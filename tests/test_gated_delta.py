"""Gated DeltaNet (moepage/kernels/gated_delta.py, moepage/engine/attention/gated_delta.py) against transformers'
own Qwen3.5-MoE and Qwen3-Next layers and torch reference rules, in fp32.

Shape legend: T tokens, H hidden, Hk key heads, Hv value heads, Dk, Dv head dims.
"""
from __future__ import annotations

import pytest
import torch

from moepage.engine.attention.gated_delta import (CHECKPOINT_SUFFIX, GatedDeltaNet, GatedDeltaShape,
                                                  resident_weight_names)
from moepage.kernels.gated_delta import causal_conv1d, chunk_gated_delta_rule, recurrent_gated_delta_rule

TOL = 1e-4
SIZES = dict(hidden_size=48, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
             linear_value_head_dim=8, linear_conv_kernel_dim=4, rms_norm_eps=1e-6)


def reference_layer(layout: str, seed: int = 0):
    """(transformers' GatedDeltaNet layer with random weights, its text config)."""
    if layout == "qwen3_5_moe":
        from transformers import Qwen3_5MoeTextConfig as Config
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet as Layer
    else:
        from transformers import Qwen3NextConfig as Config
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet as Layer
    cfg = Config(**SIZES, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], vocab_size=64,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(seed)
    layer = Layer(cfg, layer_idx=0).float().eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "A_log":
                p.copy_(torch.empty_like(p).uniform_(0.5, 3).log())
            elif name == "norm.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name == "dt_bias":
                p.copy_(torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return layer, cfg


def ours(layer, cfg, layout: str) -> GatedDeltaNet:
    sd = layer.state_dict()
    weights = {n: sd[CHECKPOINT_SUFFIX[n].removeprefix("linear_attn.")] for n in resident_weight_names(layout)}
    return GatedDeltaNet(GatedDeltaShape.from_config(cfg.to_dict()), weights, layout)


class Reference:
    """transformers' layer run as the model runs it: one cache across calls."""

    def __init__(self, layer, cfg):
        from transformers import DynamicCache

        self.layer, self.cache = layer, DynamicCache(config=cfg)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.layer(x[None], cache=self.cache)[0]


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str):
    diff = (a - b).abs().max().item()
    assert diff < TOL, f"{what}: max abs diff {diff:.2e} (|ref| max {b.abs().max().item():.2f})"


@pytest.mark.parametrize("layout", ["qwen3_5_moe", "qwen3_next"])
def test_prefill_64_then_8_decode_steps_match_transformers(layout):
    layer, cfg = reference_layer(layout)
    mixer, ref = ours(layer, cfg, layout), Reference(layer, cfg)
    x = torch.randn(72, SIZES["hidden_size"], generator=torch.Generator().manual_seed(1))
    state = mixer.new_state()
    assert_close(mixer.prefill(x[:64], state), ref(x[:64]), "prefill of 64 tokens")
    for t in range(64, 72):
        assert_close(mixer.decode(x[t : t + 1], state), ref(x[t : t + 1]), f"decode step {t - 63}")
    assert state.tokens == 72
    rec = ref.cache.layers[0].recurrent_states[0][0]
    assert_close(state.recurrent, rec, "recurrent state after 72 tokens")


@pytest.mark.parametrize("layout", ["qwen3_5_moe", "qwen3_next"])
@pytest.mark.parametrize("T", [1, 3, 37, 100])
def test_prompts_not_a_multiple_of_the_chunk_match_transformers(layout, T):
    layer, cfg = reference_layer(layout, seed=T)
    mixer, ref = ours(layer, cfg, layout), Reference(layer, cfg)
    x = torch.randn(T + 1, SIZES["hidden_size"], generator=torch.Generator().manual_seed(T))
    state = mixer.new_state()
    assert_close(mixer.prefill(x[:T], state), ref(x[:T]), f"prefill of {T} tokens")
    assert_close(mixer.decode(x[T:], state), ref(x[T:]), "the decode step after it")  # conv state of a short prompt


@pytest.mark.parametrize("layout", ["qwen3_5_moe", "qwen3_next"])
@pytest.mark.parametrize("a,b", [(64, 36), (23, 50), (1, 5)])
def test_prefill_continued_across_calls_equals_one_prefill(layout, a, b):
    """prefill(a + b) == prefill(a), then prefill over b continuing the state; and both are transformers'."""
    layer, cfg = reference_layer(layout)
    mixer, ref = ours(layer, cfg, layout), Reference(layer, cfg)
    x = torch.randn(a + b, SIZES["hidden_size"], generator=torch.Generator().manual_seed(a * b))
    whole_state, split_state = mixer.new_state(), mixer.new_state()
    whole = mixer.prefill(x, whole_state)
    split = torch.cat([mixer.prefill(x[:a], split_state), mixer.prefill(x[a:], split_state)])
    assert_close(split, whole, "prefill in two calls")
    assert_close(split_state.recurrent, whole_state.recurrent, "recurrent state")
    assert_close(split_state.conv, whole_state.conv, "conv state")
    assert_close(split, torch.cat([ref(x[:a]), ref(x[a:])]), "against transformers in two calls")


def test_state_bytes_and_snapshot_restore_are_exact():
    layer, cfg = reference_layer("qwen3_5_moe")
    mixer = ours(layer, cfg, "qwen3_5_moe")
    g = torch.Generator().manual_seed(2)
    prompt, more = torch.randn(20, 48, generator=g), torch.randn(6, 48, generator=g)
    state = mixer.new_state()
    mixer.prefill(prompt, state)
    conv_channels = 2 * 2 * 16 + 4 * 8  # 2 Hk Dk + Hv Dv
    assert state.nbytes == mixer.shape.state_nbytes(torch.float32) == (3 * conv_channels + 4 * 16 * 8) * 4
    bf16_state = mixer.new_state(torch.bfloat16)
    assert bf16_state.nbytes == mixer.shape.state_nbytes(torch.bfloat16) == 3 * conv_channels * 2 + 4 * 16 * 8 * 4
    snap = state.snapshot()
    first = [mixer.decode(more[t : t + 1], state) for t in range(6)]
    state.restore(snap)
    assert state.tokens == 20
    again = [mixer.decode(more[t : t + 1], state) for t in range(6)]
    assert all(torch.equal(u, v) for u, v in zip(first, again))  # a restored state repeats its tokens bit for bit
    state.restore(snap)
    assert torch.equal(mixer.prefill(more, state), mixer.prefill(more, snap.snapshot()))


def test_rules_match_transformers_reference_functions():
    """The chunked and recurrent rules against transformers' torch functions, from a non-zero state, Hv = 3 Hk."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m

    g = torch.Generator().manual_seed(4)
    T, Hk, Hv, Dk, Dv = 70, 2, 6, 16, 8
    q, k = torch.randn(T, Hk, Dk, generator=g), torch.randn(T, Hk, Dk, generator=g)
    v = torch.randn(T, Hv, Dv, generator=g)
    decay = -torch.rand(T, Hv, generator=g) * 2
    beta = torch.rand(T, Hv, generator=g)
    s0 = torch.randn(Hv, Dk, Dv, generator=g)
    kw = dict(initial_state=s0[None], output_final_state=True, use_qk_l2norm_in_kernel=True)
    want_out, want_s = m.torch_chunk_gated_delta_rule(q[None], k[None], v[None], decay[None], beta[None], **kw)
    got_out, got_s = chunk_gated_delta_rule(q, k, v, decay, beta, s0)
    assert_close(got_out, want_out[0], "chunked rule")
    assert_close(got_s, want_s[0], "chunked rule state")
    want_out, want_s = m.torch_recurrent_gated_delta_rule(q[None], k[None], v[None], decay[None], beta[None], **kw)
    got_out, got_s = recurrent_gated_delta_rule(q, k, v, decay, beta, s0)
    assert_close(got_out, want_out[0], "recurrent rule")
    assert_close(got_s, want_s[0], "recurrent rule state")


def test_causal_conv1d_carries_its_state():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(11, 5, generator=g), torch.randn(5, 4, generator=g)
    whole, state = causal_conv1d(x, w, torch.zeros(3, 5))
    parts, s = [], torch.zeros(3, 5)
    for t in range(11):
        y, s = causal_conv1d(x[t : t + 1], w, s)
        parts.append(y)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6) and torch.equal(s, state)
    padded = torch.cat([torch.zeros(3, 5), x])
    by_hand = torch.stack([(padded[t : t + 4].t() * w).sum(-1) for t in range(11)])
    assert torch.allclose(whole, torch.nn.functional.silu(by_hand), atol=1e-6)


def test_bad_weights_and_config_are_named():
    layer, cfg = reference_layer("qwen3_next")
    sd = layer.state_dict()
    weights = {n: sd[CHECKPOINT_SUFFIX[n].removeprefix("linear_attn.")] for n in resident_weight_names("qwen3_next")}
    shape = GatedDeltaShape.from_config(cfg.to_dict())
    with pytest.raises(ValueError, match=r"linear_attn.in_proj_ba: shape \(7, 48\), expected \(8, 48\)"):
        GatedDeltaNet(shape, {**weights, "in_proj_ba": torch.zeros(7, 48)}, "qwen3_next")
    with pytest.raises(ValueError, match="missing Gated DeltaNet weight in_proj_qkv"):
        GatedDeltaNet(shape, weights, "qwen3_5_moe")
    with pytest.raises(ValueError, match="unknown Gated DeltaNet layout 'mamba'"):
        resident_weight_names("mamba")
    with pytest.raises(ValueError, match="missing linear_num_key_heads"):
        GatedDeltaShape.from_config({"hidden_size": 8})
    with pytest.raises(ValueError, match="not a multiple of linear_num_key_heads"):
        GatedDeltaShape(48, 3, 4, 16, 8)


@pytest.mark.parametrize("layout", ["qwen3_5_moe", "qwen3_next"])
def test_bf16_prefill_and_decode_follow_transformers_rounding(layout):
    """bf16 weights and activations, fp32 states: transformers' casts, up to the C++ matvec's rare 1-ulp rounding."""
    layer, cfg = reference_layer(layout)
    layer = layer.bfloat16()
    mixer, ref = ours(layer, cfg, layout), Reference(layer, cfg)
    x = torch.randn(68, SIZES["hidden_size"], generator=torch.Generator().manual_seed(6)).bfloat16()
    state = mixer.new_state()
    assert state.conv.dtype == torch.bfloat16 and state.recurrent.dtype == torch.float32
    pairs = [(mixer.prefill(x[:64], state), ref(x[:64]))]
    pairs += [(mixer.decode(x[t : t + 1], state), ref(x[t : t + 1])) for t in range(64, 68)]
    for got, want in pairs:
        assert got.dtype == torch.bfloat16
        assert (got.float() - want.float()).abs().max().item() <= 4 * want.float().abs().max().item() * 2**-8
        assert (got != want).float().mean().item() < 0.05


@pytest.mark.parametrize("layout", ["qwen3_5_moe", "qwen3_next"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_aligned_continuation_is_bit_exact(layout, dtype):
    """A prompt cache re-using a prefix cut at a multiple of the chunk gets the fresh prefill's bits (where the
    projections' matmuls give each row the same result whatever the row count, as here)."""
    layer, cfg = reference_layer(layout)
    mixer = ours(layer.to(dtype), cfg, layout)
    x = torch.randn(128 + 9, SIZES["hidden_size"], generator=torch.Generator().manual_seed(8)).to(dtype)
    fresh, reused = mixer.new_state(), mixer.new_state()
    whole = mixer.prefill(x[:128], fresh)
    mixer.prefill(x[:64], reused)
    cached = reused.snapshot()
    reused.restore(cached)
    assert torch.equal(mixer.prefill(x[64:128], reused), whole[64:])
    assert torch.equal(reused.recurrent, fresh.recurrent) and torch.equal(reused.conv, fresh.conv)
    assert torch.equal(mixer.prefill(x[128:], reused), mixer.prefill(x[128:], fresh))
