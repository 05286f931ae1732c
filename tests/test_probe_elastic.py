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
    engine = Engine.load(EngineConfig(model=str(path), dtype="float32", preload=False))
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


# ---- the flags on `moepage serve` / `moepage generate` ---------------------------------------------------

def expected_tokens(path, cfg: ElasticConfig, ids: list[int], n: int) -> list[int]:
    from moepage.engine.sampling import SamplingParams

    engine = Engine.load(EngineConfig(model=str(path)))
    try:
        apply_elastic(engine, cfg)
        return [s.token for s in engine.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))]
    finally:
        engine.close()


def printed_tokens(err: str) -> list[int]:
    line = next(x for x in err.splitlines() if x.startswith("tokens:"))
    return [int(t) for t in line.split()[1:]]


def test_generate_cli_elastic_flags(moe_dir, capsys):
    from moepage.cli import main

    base = ["generate", "--model", str(moe_dir), "--prompt-ids", "5,6,7,8,9", "--max-tokens", "6", "--ignore-eos"]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "routing: exact" in err and "APPROXIMATE" not in err
    exact = printed_tokens(err)
    assert exact == expected_tokens(moe_dir, ElasticConfig(), [5, 6, 7, 8, 9], 6)
    for flags, cfg, words in (
        (["--shared-only"], ElasticConfig(shared_only=True), "shared-only"),
        (["--experts-per-token", "2"], ElasticConfig(experts_per_token=2), "k=2"),
        (["--restrict-to-domain", "b"], ElasticConfig(restrict_to=(1,)), "domain 'b' (named expert)"),
        (["--cache-aware-margin", "0.3"], ElasticConfig(cache_margin=0.3), "cache-aware margin 0.3"),
    ):
        assert main(base + flags) == 0, flags
        err = capsys.readouterr().err
        assert "routing: APPROXIMATE" in err and words in err, err
        assert printed_tokens(err) == expected_tokens(moe_dir, cfg, [5, 6, 7, 8, 9], 6), flags


def test_elastic_flag_errors(moe_dir, tmp_path, capsys):
    from moepage.cli import main

    base = ["generate", "--model", str(moe_dir), "--prompt-ids", "5,6", "--max-tokens", "1"]
    assert main(base + ["--shared-only", "--experts-per-token", "1"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert main(base + ["--restrict-to-domain", "code"]) == 2
    assert "needs --profile P" in capsys.readouterr().err
    assert main(base + ["--profile", str(tmp_path / "nope.json"), "--restrict-to-domain", "a"]) == 2
    assert "profile file not found" in capsys.readouterr().err
    assert main(base + ["--experts-per-token", "5"]) == 2
    assert "between 1 and 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--cache-aware-margin", "-1"])


def test_restrict_to_domain_from_a_profile(moe_dir, tmp_path):
    """With --profile, each layer keeps the domain's most used experts (extract's ranking), per layer."""
    import argparse

    from moepage.commands.elastic_args import install_elastic
    from moepage.surgery.profile_format import FORMAT, VERSION, write_profile

    engine = Engine.load(EngineConfig(model=str(moe_dir), preload=False))  # as serve does with --restrict-to-domain
    layers = list(engine.args.moe_layers)
    assert layers == [0, 1]
    stats = {"tokens": 100, "count": [[10, 90], [80, 20]], "mass": [[5.0, 60.0], [50.0, 8.0]],
             "mean_norm": [[1.0, 1.0], [1.0, 1.0]], "saliency": [[5.0, 1.0], [1.0, 1.0]],
             "avg_gate": [[0.05, 0.6], [0.5, 0.08]], "shared_gate": None, "nll": 1.0, "sources": []}
    profile = {"format": FORMAT, "version": VERSION, "domains": {"x": stats}, "specialization": [None, None],
               "model": {"name": "tiny", "family": "qwen2_moe", "num_experts": 2, "top_k": 1, "moe_layers": layers},
               "settings": {}}
    write_profile(profile, str(tmp_path / "p.json"))
    args = argparse.Namespace(experts_per_token=None, shared_only=False, restrict_to_domain="x",
                              profile=str(tmp_path / "p.json"), restrict_experts=1, cache_aware_margin=None)
    try:
        cfg, line = install_elastic(engine, args)
        assert cfg.restrict_to == {0: (1,), 1: (0,)}  # saliency x count: 90 > 50 in layer 0 (REAP alone: 0)
        assert "APPROXIMATE" in line and "L0: 1; L1: 0" in line
        assert all(b.elastic is not None and b.elastic.cfg == cfg for b in engine.model.moe_blocks)
        ids = list(range(5, 30))
        engine.logits_all(ids)
        assert engine.model.cache.resident_keys <= {(0, 1), (1, 0)}
    finally:
        engine.close()


def test_serve_installs_elastic_routing_at_load(moe_dir, monkeypatch, capsys):
    """`moepage serve MODEL --shared-only`: the engine handed to the app routes shared-only, the startup log
    says so and the server settings carry the mode; one generation equals the shared-only reference."""
    from moepage.cli import main
    from moepage.engine.sampling import SamplingParams

    seen = {}

    def fake_create_app(engine, settings):
        seen["settings"] = settings
        seen["tokens"] = [s.token for s in engine.generate([5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0,
                                                                                    ignore_eos=True))]
        seen["hooks"] = [b.elastic for b in engine.model.moe_blocks]
        return object()

    monkeypatch.setattr("moepage.server.app.create_app", fake_create_app)
    monkeypatch.setattr("uvicorn.Server.run", lambda *a, **k: None)
    assert main(["serve", str(moe_dir), "--shared-only", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "routing: APPROXIMATE (shared-only)" in err
    assert seen["settings"].routing == "shared-only"
    assert all(h is not None and h.cfg.shared_only for h in seen["hooks"])
    assert seen["tokens"] == expected_tokens(moe_dir, ElasticConfig(shared_only=True), [5, 6, 7], 5)
    assert main(["serve", str(moe_dir), "--port", "0"]) == 0
    assert "routing: exact" in capsys.readouterr().err
    assert seen["settings"].routing == "exact" and all(h is None for h in seen["hooks"])
