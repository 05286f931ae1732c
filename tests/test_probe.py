"""Probe: deterministic JSON, routing accuracy/separation on a named-trained toy MoE, the PNG, the CLI verbs."""
from __future__ import annotations

import json

import pytest
import torch

from moepage.cli import main
from moepage.surgery.probe import ProbeConfig, probe, write_routing_png
from moepage.surgery.train import TrainConfig, train
from test_train import Quiet, tiny_dense, tiny_moe, toy_corpus

CFG = ProbeConfig(tokens_per_domain=256, seq_len=64, named=True)


@pytest.fixture(scope="module")
def named_moe(tmp_path_factory):
    model = tiny_moe()
    cfg = TrainConfig(mode="named", steps=20, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, router_coef=1.0,
                      save_every=100, log_every=10)
    train(model, toy_corpus(), cfg, str(tmp_path_factory.mktemp("named")), progress=Quiet())
    return model


def test_probe_output_is_deterministic(named_moe):
    first = json.dumps(probe(named_moe, toy_corpus(), CFG), sort_keys=True)
    second = json.dumps(probe(named_moe, toy_corpus(), CFG), sort_keys=True)
    assert first == second


def test_probe_reports_named_routing(named_moe):
    r = probe(named_moe, toy_corpus(), CFG)
    assert set(r["perplexity"]) == {"a", "b", "mean"}
    assert all(1.0 < v < 1e4 for v in r["perplexity"].values())
    assert r["routing_accuracy"]["mean"] > 0.9
    assert r["routing_accuracy"]["a"]["mean"] > 0.9 and r["routing_accuracy"]["b"]["mean"] > 0.9
    assert len(r["separation"]) == 2 and min(r["separation"]) > 0.8  # disjoint domains -> disjoint experts
    for domain in ("a", "b"):
        for row in r["routing_share"][domain]:
            assert sum(row) == pytest.approx(1.0, abs=1e-5)


def test_probe_dense_has_perplexity_only():
    r = probe(tiny_dense(), toy_corpus(), ProbeConfig(tokens_per_domain=128, seq_len=64))
    assert "routing_share" not in r and r["perplexity"]["a"] > 1.0


def test_routing_png(named_moe, tmp_path):
    pytest.importorskip("matplotlib")
    path = write_routing_png(probe(named_moe, toy_corpus(), CFG), str(tmp_path / "routing.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_probe_and_upcycle_cli(tmp_path, capsys):
    dense = tiny_dense()
    dense.save_pretrained(str(tmp_path / "dense"))
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "2", "--top-k", "1",
                 "--drop", "0.3"]) == 0
    toy_corpus().save(str(tmp_path / "corpus.npz"))
    args = ["probe", str(tmp_path / "moe"), "--corpus", str(tmp_path / "corpus.npz"), "--named", "--tokens", "128",
            "--seq-len", "32", "--json", str(tmp_path / "p.json")]
    assert main(args) == 0
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["layers"] == [0, 1] and "routing_accuracy" in r
    assert main(["train", str(tmp_path / "moe"), str(tmp_path / "run"), "--corpus", str(tmp_path / "corpus.npz"),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--log-every", "1"]) == 0
    assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "train_state.pt").exists()
    capsys.readouterr()
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe")]) == 2  # non-empty output dir
    assert "not empty" in capsys.readouterr().err
    with torch.no_grad():
        assert torch.isfinite(dense(torch.tensor([[1, 2, 3]])).logits).all()
