"""Elastic serving modes: exact by default, shared-only / restricted / fewer experts match the trainer's math,
cache-aware routing prefers resident experts."""
from __future__ import annotations

import pytest
import torch

from moepage.engine.engine import Engine, EngineConfig
from moepage.kernels.routing import RoutingConfig, route
from moepage.surgery.elastic import ElasticConfig, ElasticRouting, apply_elastic, named_experts, restrict_to_domain
from moepage.surgery.trainable_model import TrainableDecoder
from test_train import Quiet, tiny_moe, toy_corpus

IDS = list(range(5, 45))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from moepage.surgery.train import TrainConfig, train

    d = tmp_path_factory.mktemp("elastic")
    model = tiny_moe(top_k=2)
    train(model, toy_corpus(), TrainConfig(mode="named", steps=2, batch_size=2, seq_len=16, log_every=1),
          str(d / "run"), progress=Quiet())
    model.save_pretrained(str(d / "model"))
    return d / "model"


def served_logits(path, cfg: ElasticConfig):
    engine = Engine.load(EngineConfig(model=str(path), dtype="float32"))
    try:
        apply_elastic(engine, cfg)
        return engine.logits_all(IDS), engine.model.cache.used_bytes
    finally:
        engine.close()


def trainer_logits(path, cfg: ElasticConfig):
    model = TrainableDecoder.from_pretrained(str(path))
    a = model.args
    override = None if cfg.is_default else ElasticRouting(cfg, a.routing, a.num_experts)
    with torch.no_grad():
        return model(torch.tensor([IDS]), routing_override=override).logits[0]


def test_default_is_exact(moe_dir):
    exact, _ = served_logits(moe_dir, ElasticConfig())
    assert torch.equal(exact, served_logits(moe_dir, ElasticConfig(experts_per_token=2))[0]) or \
        (exact - served_logits(moe_dir, ElasticConfig(experts_per_token=2))[0]).abs().max() < 1e-6
    assert (exact - trainer_logits(moe_dir, ElasticConfig())).abs().max().item() < 1e-4


@pytest.mark.parametrize("cfg", [ElasticConfig(shared_only=True), ElasticConfig(restrict_to=(1,)),
                                 ElasticConfig(experts_per_token=1)])
def test_modes_match_trainer_and_load_fewer_experts(moe_dir, cfg):
    served, used = served_logits(moe_dir, cfg)
    exact, used_full = served_logits(moe_dir, ElasticConfig())
    assert (served - trainer_logits(moe_dir, cfg)).abs().max().item() < 1e-4
    assert not torch.allclose(served, exact)
    if cfg.shared_only:
        assert used == 0
    if cfg.restrict_to:
        assert 0 < used < used_full


def test_restrict_to_domain_reads_named_experts(moe_dir):
    assert named_experts(str(moe_dir)) == {"a": 0, "b": 1}
    assert restrict_to_domain(str(moe_dir), "b") == (1,)
    with pytest.raises(ValueError, match="named experts are a, b"):
        restrict_to_domain(str(moe_dir), "code")


def test_cache_aware_routing_prefers_resident_experts():
    routing = RoutingConfig(top_k=1, norm_topk_prob=True)
    logits = torch.tensor([[2.0, 1.9, -3.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    resident = {(0, 1)}
    hook = ElasticRouting(ElasticConfig(cache_margin=0.1), routing, 4, is_resident=lambda l, e: (l, e) in resident)
    _, idx = hook(0, logits)
    assert idx[:, 0].tolist() == [1, 1]  # expert 1 is within 0.1 of expert 0 in row 0, and resident
    exact = ElasticRouting(ElasticConfig(cache_margin=0.0), routing, 4, is_resident=lambda l, e: False)
    assert torch.equal(exact(0, logits)[1], route(logits, routing)[1])


def test_bad_elastic_options():
    routing = RoutingConfig(top_k=2)
    with pytest.raises(ValueError, match="experts-per-token"):
        ElasticRouting(ElasticConfig(experts_per_token=9), routing, 4)
    with pytest.raises(ValueError, match="not in 0..3"):
        ElasticRouting(ElasticConfig(restrict_to=(7,)), routing, 4)
