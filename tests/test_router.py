"""The Router against transformers' own router modules (bit for bit, ties included) and against plain per-token
references written here; SparseMoE routes every path through it.

Shape legend: T tokens, H hidden, E experts, K experts per token, G expert groups.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepage.engine.moe import SparseMoE, prepare_expert
from moepage.engine.router import Router
from moepage.kernels import native
from moepage.kernels.experts import swiglu
from moepage.kernels.routing import RoutingConfig
from moepage.paging.cache import ExpertCache
from moepage.paging.sources import ExpertWeights

bf16_kernels = native.load("bf16_decode")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@st.composite
def router_inputs(draw, max_k: int = 8):
    """(x [T, H], weight [E, H], K, dtype); tied draws use a few exact values so many logits are equal."""
    T, H = draw(st.integers(1, 6)), draw(st.sampled_from([8, 32]))
    E = draw(st.sampled_from([4, 8, 16, 32]))
    K = draw(st.integers(1, min(E, max_k)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):  # ties
        x = torch.randint(-2, 3, (T, H), generator=g).float()
        w = torch.randint(-2, 3, (E, H), generator=g).float() / 4
    else:
        x = torch.randn(T, H, generator=g)
        w = torch.randn(E, H, generator=g) * draw(st.floats(0.01, 1.0))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    return x.to(dtype), w.to(dtype), K, g


def transformers_router(cls_path: str, weight: torch.Tensor, **config):
    """transformers' router module `cls_path` built from a bare config, holding `weight`."""
    import importlib

    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(f"transformers.models.{module}"), name)
    E, H = weight.shape
    ref = cls(SimpleNamespace(hidden_size=H, num_experts=E, num_local_experts=E, **config))
    with torch.no_grad():
        ref.weight.data = weight.clone()
    return ref


SOFTMAX_FAMILIES = {
    # name: (transformers router, extra config, our RoutingConfig kwargs)
    "qwen3_moe": ("qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter", {"norm_topk_prob": False}, {}),
    "qwen3_moe_norm": ("qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter", {"norm_topk_prob": True},
                       {"norm_topk_prob": True}),
    "olmoe": ("olmoe.modeling_olmoe.OlmoeTopKRouter", {"norm_topk_prob": False}, {}),
    "qwen3_next": ("qwen3_next.modeling_qwen3_next.Qwen3NextTopKRouter", {"norm_topk_prob": True},
                   {"norm_topk_prob": True}),
    "qwen3_5_moe": ("qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeTopKRouter", {}, {"norm_topk_prob": True}),
    "mixtral": ("mixtral.modeling_mixtral.MixtralTopKRouter", {},
                {"norm_topk_prob": True, "weights_in_logits_dtype": False}),
}


@settings(max_examples=40, deadline=None)
@given(router_inputs(), st.sampled_from(sorted(SOFTMAX_FAMILIES)))
def test_softmax_routers_equal_transformers_bit_for_bit(data, family):
    x, w, K, _ = data
    path, extra, ours = SOFTMAX_FAMILIES[family]
    ref = transformers_router(path, w, num_experts_per_tok=K, **extra)
    with torch.no_grad():
        logits, want_w, want_i = ref(x)
    router = Router(w, RoutingConfig(top_k=K, **ours))
    got_w, got_i = router(x)
    assert torch.equal(router.logits(x), logits)
    assert torch.equal(got_i, want_i) and got_w.dtype == want_w.dtype and torch.equal(got_w, want_w)
    assert router.selects_like_kernel and router.kernel_weight is w


@settings(max_examples=40, deadline=None)
@given(router_inputs())
def test_gpt_oss_topk_then_softmax_with_router_bias(data):
    x, w, K, g = data
    bias = (torch.randint(-2, 3, (w.shape[0],), generator=g).float() / 2).to(w.dtype)
    ref = transformers_router("gpt_oss.modeling_gpt_oss.GptOssTopKRouter", w, num_experts_per_tok=K)
    with torch.no_grad():
        ref.bias.data = bias.clone()
        logits, want_w, want_i = ref(x)
    router = Router(w, RoutingConfig(top_k=K, scoring="topk_softmax"), bias=bias)
    got_w, got_i = router(x)
    assert torch.equal(router.logits(x), logits)
    assert torch.equal(got_i, want_i) and got_w.dtype == want_w.dtype and torch.equal(got_w, want_w)
    assert torch.allclose(got_w.float().sum(-1), torch.ones(x.shape[0]), atol=2e-2)
    assert router.kernel_weight is None and not router.selects_like_kernel  # the kernel's logits have no bias


@st.composite
def grouped_config(draw, E: int):
    groups = draw(st.sampled_from([n for n in (1, 2, 4, 8) if E % n == 0 and E // n >= 2]))
    return dict(n_group=groups, topk_group=draw(st.integers(1, groups)), norm_topk_prob=draw(st.booleans()),
                routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))


SIGMOID_ROUTERS = {"deepseek_v3": "deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter",
                   "glm4_moe": "glm4_moe.modeling_glm4_moe.Glm4MoeTopkRouter"}


def check_sigmoid_router(family: str, x: torch.Tensor, w: torch.Tensor, K: int, groups: dict, correction):
    ref = transformers_router(SIGMOID_ROUTERS[family], w.float(), num_experts_per_tok=K, **groups)
    with torch.no_grad():
        ref.e_score_correction_bias.copy_(correction)
        logits, want_w, want_i = ref(x)
    router = Router(w, RoutingConfig(top_k=K, scoring="sigmoid_group_topk", logits_in_float32=True, **groups),
                    correction_bias=correction)
    got_w, got_i = router(x)
    assert torch.equal(router.logits(x), logits)
    assert torch.equal(got_i, want_i) and got_w.dtype == want_w.dtype and torch.equal(got_w, want_w)
    assert router.kernel_weight is None and not router.selects_like_kernel


@settings(max_examples=60, deadline=None)
@given(router_inputs(), st.data(), st.sampled_from(sorted(SIGMOID_ROUTERS)))
def test_sigmoid_group_routers_equal_transformers(data, draw, family):
    x, w, K, g = data
    E = w.shape[0]
    tied = draw.draw(st.booleans())
    correction = (torch.randint(-1, 2, (E,), generator=g).float() / 8 if tied else torch.randn(E, generator=g) / 10)
    check_sigmoid_router(family, x, w, K, draw.draw(grouped_config(E)), correction)


@pytest.mark.parametrize("family", sorted(SIGMOID_ROUTERS))
def test_sigmoid_groups_holding_fewer_experts_than_top_k(family):
    """One kept group of 2 experts, top-5: three picks come from the masked (-inf) scores, as in transformers."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(4, 16, generator=g), torch.randn(8, 16, generator=g)
    groups = dict(n_group=4, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)
    check_sigmoid_router(family, x, w, 5, groups, torch.randn(8, generator=g) / 10)


@settings(max_examples=40, deadline=None)
@given(router_inputs())
def test_gemma4_per_expert_scale(data):
    """Gemma 4's router scales each chosen expert's renormalised weight; its logits come from the router's own
    input norm, taken here from its projection."""
    x, w, K, g = data
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    E, H = w.shape
    ref = Gemma4TextRouter(SimpleNamespace(hidden_size=H, num_experts=E, top_k_experts=K, rms_norm_eps=1e-6)).to(w.dtype)
    scale = (torch.rand(E, generator=g) + 0.5).to(w.dtype)
    seen = {}
    with torch.no_grad():
        ref.proj.weight.data = w.clone()
        ref.per_expert_scale.data = scale.clone()
        ref.proj.register_forward_hook(lambda m, i, out: seen.setdefault("logits", out))
        _, want_w, want_i = ref(x)
    router = Router(w, RoutingConfig(top_k=K, norm_topk_prob=True, weights_in_logits_dtype=False), expert_scale=scale)
    got_w, got_i = router.select(seen["logits"])
    assert torch.equal(got_i, want_i) and got_w.dtype == want_w.dtype and torch.equal(got_w, want_w)
    assert not router.selects_like_kernel


def plain_reference(logits: torch.Tensor, cfg: RoutingConfig, correction: torch.Tensor | None):
    """Per token, in Python floats: the chosen experts' choice scores (as a sorted list) and {expert: weight}."""
    import math

    rows = []
    for row in logits.double().tolist():
        E = len(row)
        if cfg.scoring == "softmax_topk":
            m = max(row)
            z = sum(math.exp(v - m) for v in row)
            choice = [math.exp(v - m) / z for v in row]
        else:
            choice = [1 / (1 + math.exp(-v)) for v in row]
        score = list(choice)
        if correction is not None:
            choice = [c + b for c, b in zip(choice, correction.double().tolist())]
        if cfg.n_group > 1:
            size = E // cfg.n_group
            group = [sum(sorted(choice[i * size:(i + 1) * size])[-2:]) for i in range(cfg.n_group)]
            kept = sorted(range(cfg.n_group), key=lambda i: -group[i])[: cfg.topk_group]
            choice = [c if e // size in kept else -math.inf for e, c in enumerate(choice)]
        picked = sorted(range(E), key=lambda e: -choice[e])[: cfg.top_k]
        weights = {e: score[e] for e in picked}
        if cfg.scoring == "topk_softmax":
            m = max(row[e] for e in picked)
            z = sum(math.exp(row[e] - m) for e in picked)
            weights = {e: math.exp(row[e] - m) / z for e in picked}
        elif cfg.norm_topk_prob:
            s = sum(weights.values())
            weights = {e: v / s for e, v in weights.items()}
        weights = {e: v * cfg.routed_scaling_factor for e, v in weights.items()}
        rows.append((sorted(choice[e] for e in picked), weights, choice))
    return rows


@settings(max_examples=80, deadline=None)
@given(router_inputs(), st.sampled_from(["softmax_topk", "topk_softmax", "sigmoid_group_topk"]), st.data())
def test_router_against_a_plain_reference(data, scoring, draw):
    """The K chosen scores are the K best (ties: any of the equal ones), weights follow the chosen experts."""
    x, w, K, g = data
    x, w = x.float(), w.float()
    groups = draw.draw(grouped_config(w.shape[0])) if scoring == "sigmoid_group_topk" else {}
    cfg = RoutingConfig(top_k=K, scoring=scoring, **groups)
    correction = torch.randn(w.shape[0], generator=g) / 10 if groups else None
    router = Router(w, cfg, correction_bias=correction)
    logits = router.logits(x)
    got_w, got_i = router.select(logits)
    for t, (best, weights, choice) in enumerate(plain_reference(logits, cfg, correction)):
        picked = got_i[t].tolist()
        assert len(set(picked)) == K
        assert sorted(choice[e] for e in picked) == pytest.approx(best, abs=1e-6)
        finite = [e for e in picked if e in weights]
        if len(finite) == K:  # the same experts (no tie at the boundary): the same weights
            assert got_w[t].tolist() == pytest.approx([weights[e] for e in picked], abs=1e-5)


@pytest.mark.skipif(bf16_kernels is None, reason="the bf16 C++ kernels need AVX512-BF16 and a compiler")
@settings(max_examples=40, deadline=None)
@given(router_inputs(), st.booleans(), st.booleans())
def test_kernel_softmax_topk_equals_the_router(data, norm, in_dtype):
    """The fused decode kernel routes in C++ wherever Router.selects_like_kernel: it must pick what the Router
    picks, ties included."""
    x, w, K, _ = data
    router = Router(w.bfloat16(), RoutingConfig(top_k=K, norm_topk_prob=norm, weights_in_logits_dtype=in_dtype))
    logits = router.logits(x[:1].bfloat16())
    got_w, got_i = router.select(logits)
    experts, weights = bf16_kernels.route_softmax_topk(logits, K, norm, in_dtype)
    order = got_i[0].argsort()
    assert experts == got_i[0, order].tolist() and torch.equal(weights, got_w[0, order])


def test_router_config_errors_name_the_field():
    w = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="top_k 7 must be between 1 and the 6 experts"):
        Router(w, RoutingConfig(top_k=7))
    with pytest.raises(ValueError, match="do not split into 4 groups"):
        Router(w, RoutingConfig(top_k=2, scoring="sigmoid_group_topk", n_group=4, topk_group=1))
    with pytest.raises(ValueError, match="topk_group"):
        RoutingConfig(top_k=2, scoring="sigmoid_group_topk", n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="only defined for sigmoid_group_topk"):
        RoutingConfig(top_k=2, n_group=2)
    with pytest.raises(ValueError, match="unknown routing scoring 'nope'"):
        RoutingConfig(top_k=2, scoring="nope")
    with pytest.raises(ValueError, match="correction bias needs sigmoid_group_topk"):
        Router(w, RoutingConfig(top_k=2), correction_bias=torch.zeros(6))
    with pytest.raises(ValueError, match=r"router expert_scale must be \[experts\]"):
        Router(w, RoutingConfig(top_k=2), expert_scale=torch.zeros(5))


def moe_block(router: Router, H: int, I: int, g: torch.Generator, layer: int = 0):
    """A SparseMoE over random fp32 experts, all resident; (block, {expert: (gate, up, down)})."""
    E = router.num_experts
    experts = {e: tuple(torch.randn(*s, generator=g) / 4 for s in ((I, H), (I, H), (H, I))) for e in range(E)}
    cache = ExpertCache(load=lambda l, e: prepare_expert(ExpertWeights(*experts[e]), torch.float32, "cpu"),
                        nbytes_of=lambda l: 3 * H * I * 4 + 4096, budget_bytes=E * (3 * H * I * 4 + 4096) * 4)
    return SparseMoE(layer, router, None, cache), experts


ROUTERS = {
    "qwen3_5": lambda E, g: Router(torch.randn(E, 16, generator=g), RoutingConfig(top_k=3, norm_topk_prob=True)),
    "gpt_oss": lambda E, g: Router(torch.randn(E, 16, generator=g), RoutingConfig(top_k=2, scoring="topk_softmax"),
                                   bias=torch.randn(E, generator=g)),
    "deepseek_v3": lambda E, g: Router(
        torch.randn(E, 16, generator=g), RoutingConfig(top_k=6, scoring="sigmoid_group_topk", n_group=4, topk_group=2,
                                                       norm_topk_prob=True, routed_scaling_factor=2.5,
                                                       logits_in_float32=True),
        correction_bias=torch.randn(E, generator=g) / 10),
    "gemma4": lambda E, g: Router(torch.randn(E, 16, generator=g),
                                  RoutingConfig(top_k=2, norm_topk_prob=True, weights_in_logits_dtype=False),
                                  expert_scale=torch.rand(E, generator=g) + 0.5),
}


@pytest.mark.parametrize("variant", sorted(ROUTERS))
def test_sparse_moe_prefill_decode_and_pregating_route_through_the_router(variant):
    g = torch.Generator().manual_seed(3)
    H, I, E, T = 16, 8, 16, 5
    first, experts = moe_block(ROUTERS[variant](E, g), H, I, g)
    second, _ = moe_block(ROUTERS[variant](E, g), H, I, g, layer=1)
    first.next = second
    x = torch.randn(T, H, generator=g)
    weights, indices = first.gate(x)
    want = torch.stack([sum(weights[t, k] * swiglu(x[t : t + 1], *experts[e])[0]
                            for k, e in enumerate(indices[t].tolist())) for t in range(T)])
    assert torch.allclose(first(x), want, atol=1e-5)  # prefill
    for t in range(T):
        assert torch.allclose(first(x[t : t + 1]), want[t : t + 1], atol=1e-5)  # decode
        assert second._guess == set(second.gate(x[t : t + 1])[1][0].tolist())  # pre-gating asked the next Router
    assert not first.routes_in_kernel or variant == "qwen3_5"
    assert (first.router is None) == (variant in ("gpt_oss", "deepseek_v3"))
    for block in (first, second):
        block.cache.close()
