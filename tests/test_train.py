"""Training: the trainer computes what moepage serves, one step lowers the loss, named routing learns,
resume is exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import prompt_ids
from moepage.engine.engine import Engine, EngineConfig
from moepage.surgery.corpus import DomainCorpus
from moepage.surgery.dense_init import DenseSpec, init_dense
from moepage.surgery.train import (
    Batch, Progress, TrainConfig, compute_losses, distill_loss, load_balance_loss, make_optimizer, sample_batch, train,
)
from moepage.surgery.trainable_model import TrainableDecoder
from moepage.surgery.upcycle import UpcycleConfig, moe_config, upcycle_tensors

VOCAB = 128


def toy_corpus(seed: int = 0) -> DomainCorpus:
    """Two domains with disjoint token ranges: a = 0..59, b = 60..119, each a noisy repeating pattern."""
    g = np.random.default_rng(seed)

    def stream(lo, n):
        base = np.tile(np.arange(lo, lo + 12), n // 12 + 1)[:n]
        noise = g.integers(lo, lo + 60, n)
        return np.where(g.random(n) < 0.3, noise, base).astype(np.int32)

    return DomainCorpus(["a", "b"], {"a": stream(0, 4000), "b": stream(60, 4000)},
                        {"a": stream(0, 600), "b": stream(60, 600)}, {"domains": ["a", "b"]})


def tiny_dense(seed: int = 0, model_type: str = "qwen2") -> TrainableDecoder:
    return init_dense(DenseSpec(model_type=model_type, vocab_size=VOCAB, hidden=32, layers=2, heads=2, kv_heads=1,
                                intermediate=48, max_position=256, tie_word_embeddings=False, seed=seed),
                      eos_token_id=1)


def tiny_moe(seed: int = 0, top_k: int = 1) -> TrainableDecoder:
    dense = tiny_dense(seed)
    cfg = UpcycleConfig(experts=2, shared=1, top_k=top_k, drop=0.3, seed=seed)
    return TrainableDecoder(moe_config(dense.config, cfg), upcycle_tensors(dense.config, dense.canonical_state(), cfg))


class Quiet(Progress):
    def __init__(self):
        super().__init__(0)

    def show(self, *a, **k):
        pass


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_trainable_model_matches_engine(checkpoints, family):
    path = checkpoints(family)
    model = TrainableDecoder.from_pretrained(str(path))
    ids = prompt_ids(20, 390)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    engine = Engine.load(EngineConfig(model=str(path), dtype="float32"))
    try:
        served = engine.logits_all(ids)
    finally:
        engine.close()
    assert (ours - served).abs().max().item() < 1e-4


def test_saved_moe_loads_in_engine_with_same_logits(tmp_path):
    model = tiny_moe(top_k=2)
    model.save_pretrained(str(tmp_path))
    ids = list(range(3, 40))
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    engine = Engine.load(EngineConfig(model=str(tmp_path), dtype="float32"))
    try:
        assert (engine.logits_all(ids) - ours).abs().max().item() < 1e-4
    finally:
        engine.close()


@pytest.mark.parametrize("make", [tiny_dense, tiny_moe])
def test_one_step_lowers_loss_on_a_fixed_batch(make):
    torch.manual_seed(0)
    model = make()
    mode = "named" if model.args.moe_layers else "lm"
    cfg = TrainConfig(mode=mode, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=0)
    batch = sample_batch(toy_corpus(), ["a", "b"], cfg, step=0)
    opt = make_optimizer(model, cfg)
    before = compute_losses(model, batch, cfg)
    before["loss"].backward()
    opt.step()
    with torch.no_grad():
        after = compute_losses(model, batch, cfg)
    assert after["loss"].item() < before["loss"].item()
    assert after["lm"].item() < before["lm"].item()


def test_named_router_loss_drives_routing_accuracy_up(tmp_path):
    model = tiny_moe()
    corpus = toy_corpus()
    cfg = TrainConfig(mode="named", steps=25, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, router_coef=1.0,
                      save_every=100, log_every=5)
    probe_cfg = TrainConfig(**{**cfg.__dict__, "batch_size": 8, "seed": 99})
    held = sample_batch(corpus, ["a", "b"], probe_cfg, step=0, split="heldout")
    with torch.no_grad():
        before = compute_losses(model, held, cfg)["route_acc"].item()
    train(model, corpus, cfg, str(tmp_path), progress=Quiet())
    with torch.no_grad():
        after = compute_losses(model, held, cfg)["route_acc"].item()
    assert after > 0.95 and after > before + 0.2, (before, after)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(mode="named", steps=6, batch_size=2, seq_len=16, lr=5e-3, warmup_steps=2, save_every=3,
                      log_every=3, distill_coef=0.5, distill_topk=8)
    corpus = toy_corpus()
    straight = tiny_moe()
    train(straight, corpus, cfg, str(tmp_path / "a"), teacher=tiny_dense(seed=5), progress=Quiet())
    first = tiny_moe()
    train(first, corpus, cfg, str(tmp_path / "b"), teacher=tiny_dense(seed=5), stop_after=3, progress=Quiet())
    resumed = tiny_moe()  # a fresh process: same init, state comes from train_state.pt
    result = train(resumed, corpus, cfg, str(tmp_path / "b"), teacher=tiny_dense(seed=5), progress=Quiet())
    assert result["step"] == 6
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name
    assert (tmp_path / "b" / "teacher_topk" / "step-0000005.pt").exists()


def test_resume_refuses_changed_options(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, save_every=1, log_every=1)
    train(tiny_dense(), toy_corpus(), cfg, str(tmp_path), progress=Quiet())
    with pytest.raises(ValueError, match="lr"):
        train(tiny_dense(), toy_corpus(), TrainConfig(**{**cfg.__dict__, "lr": 0.5, "steps": 4}), str(tmp_path),
              progress=Quiet())


def test_progress_line_reports_tokens_per_second_and_loss(tmp_path, capsys):
    import sys

    train(tiny_dense(), toy_corpus(), TrainConfig(steps=2, batch_size=2, seq_len=16, log_every=1), str(tmp_path),
          progress=Progress(2, stream=sys.stdout))
    out = capsys.readouterr().out
    assert "tok/s" in out and "loss" in out and "step 2/2" in out
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == 2


def test_losses():
    logits = torch.randn(2, 5, 11)
    values, indices = logits.topk(11, dim=-1)
    assert distill_loss(logits, values, indices, 1.0).item() == pytest.approx(0.0, abs=1e-5)
    assert distill_loss(torch.zeros_like(logits), values, indices, 1.0).item() > 0.1
    uniform = torch.zeros(8, 4)
    spread = torch.arange(8)[:, None] % 4
    assert load_balance_loss(uniform, spread, 4).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 1, dtype=torch.long)
    assert load_balance_loss(torch.tensor([[5.0, 0, 0, 0]] * 8), collapsed, 4).item() > 3.0


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--mode"):
        train(tiny_dense(), toy_corpus(), TrainConfig(mode="magic"), str(tmp_path))
    with pytest.raises(ValueError, match="not in the corpus"):
        train(tiny_dense(), toy_corpus(), TrainConfig(domains=["klingon"]), str(tmp_path))
    model = tiny_moe()
    three = DomainCorpus(["a", "b", "c"], {d: np.arange(200, dtype=np.int32) % 100 for d in "abc"},
                         {d: np.arange(50, dtype=np.int32) for d in "abc"}, {})
    with pytest.raises(ValueError, match="one routed expert per domain"):
        batch = sample_batch(three, ["a", "b", "c"], TrainConfig(mode="named", batch_size=3, seq_len=8), 0)
        compute_losses(model, batch, TrainConfig(mode="named"))
    assert isinstance(Batch(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long)), Batch)
