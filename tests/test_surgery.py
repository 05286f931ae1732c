"""Surgery on generated checkpoints: profile recovers planted routing, extract keeps exactly the chosen
experts, --dense reproduces a model whose routing is forced, prune fits a global budget.

Routing is planted through the weights: hidden dimension 0 carries a per-token sign (embedding column 0),
nothing else writes to it (row 0 of every o_proj / down_proj is zero), and router column 0 sends positive
tokens to one expert set and negative tokens to another.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_checkpoint, prompt_ids, reference_model
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.families import family_for
from moepage.engine.weight_names import expert_names, to_checkpoint
from moepage.surgery.pipeline import extract_model, prune_model
from moepage.surgery.profile import TextSource, profile_engine
from moepage.surgery.profile_format import load_profile, write_profile

ALPHA = ("12+345=357;9*8=72;100-1=99;64/8=8;7+7=14;300-12=288;" * 3)
BETA = ("the quick brown fox jumps over the lazy dog and the cat sleeps in the warm sun all day " * 3).strip()
ALPHA_EXPERTS, BETA_EXPERTS = [1, 6], [3, 4]


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def plant_routing(path, family: str, token_sign: torch.Tensor, pos_experts, neg_experts=(), force: bool = False,
                  marker: float = 4.0, strength: float = 10.0):
    """Rewrite a saved checkpoint so routing follows token_sign [V] (see the module docstring).

    force=True: every other expert gets router row -strength*e_0 and pos_experts get zero rows, so with all
    tokens positive the routing is exactly pos_experts with equal weights; the shared expert gate is zeroed
    (sigmoid 0 = 0.5 for every token).
    """
    cfg = json.loads((path / "config.json").read_text())
    fam = family_for(cfg["model_type"])
    args = fam.model_args(cfg)
    w = _weights(path)
    w[fam.names["embed"]][:, 0] = marker * token_sign.to(w[fam.names["embed"]].dtype)
    writes_residual = [to_checkpoint(fam.names, f"layers.{i}.o") for i in range(args.num_layers)]
    for i in range(args.num_layers):
        for part in ("dense_down", "shared_down"):
            name = fam.names.get(f"layers.{{L}}.{part}", "").format(L=i)
            if name in w:
                writes_residual.append(name)
        if args.sparse_layers[i]:
            writes_residual += [expert_names(fam.expert_names, i, e)["down"] for e in range(args.num_experts)]
            router = w[to_checkpoint(fam.names, f"layers.{i}.router")]
            if force:
                router.zero_()
                router[:, 0] = -strength
                router[list(pos_experts)] = 0.0
                gate = fam.names.get("layers.{L}.shared_expert_gate", "").format(L=i)
                if gate in w:
                    w[gate].zero_()
            else:
                router[list(pos_experts), 0] += strength
                router[list(neg_experts), 0] -= strength
    for name in writes_residual:
        w[name][0] = 0.0
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def token_signs(engine_tokenizer, vocab: int, positive: str, negative: str = "") -> torch.Tensor:
    pos, neg = set(engine_tokenizer.encode(positive)), set(engine_tokenizer.encode(negative))
    assert not pos & neg, "planted domains must not share tokens"
    sign = torch.zeros(vocab)
    sign[list(pos)] = 1.0
    sign[list(neg)] = -1.0
    return sign


def run_profile(path, domains: dict[str, str], max_seq: int = 64) -> dict:
    engine = Engine.load(EngineConfig(str(path)))
    try:
        return profile_engine(engine, {n: [TextSource(f"{n}.txt", t)] for n, t in domains.items()}, max_seq=max_seq,
                              max_tokens_per_domain=256)
    finally:
        engine.close()


def saved_profile(tmp_path, path, domains) -> str:
    out = tmp_path / "profile.json"
    write_profile(run_profile(path, domains), str(out))
    return str(out)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer_dir):
    """A Qwen3-MoE checkpoint where digit text routes to ALPHA_EXPERTS and letter text to BETA_EXPERTS."""
    from moepage.engine.tokenizer import Tokenizer

    path = make_checkpoint(tmp_path_factory.mktemp("planted"), "qwen3_moe", tokenizer_dir, seed=3)
    tok = Tokenizer.from_dir(str(path))
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    return plant_routing(path, "qwen3_moe", token_signs(tok, vocab, ALPHA, BETA), ALPHA_EXPERTS, BETA_EXPERTS)


# ---- profile ----------------------------------------------------------------------------------------

def test_profile_recovers_planted_domains_and_is_deterministic(planted, tmp_path):
    profile = run_profile(planted, {"alpha": ALPHA, "beta": BETA})
    layers = profile["model"]["moe_layers"]
    assert layers == [0, 2]  # layer 1 is dense (mlp_only_layers)
    for name, planted_set in (("alpha", ALPHA_EXPERTS), ("beta", BETA_EXPERTS)):
        d = profile["domains"][name]
        for row in range(len(layers)):
            top = sorted(range(8), key=lambda e: -d["saliency"][row][e])[:2]
            assert sorted(top) == planted_set, (name, row, d["saliency"][row])
            assert sum(d["count"][row][e] for e in planted_set) == 2 * d["tokens"]  # every token, both slots
        assert d["tokens"] > 20 and d["nll"] > 0
    assert all(s > 0.99 for s in profile["specialization"])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_profile(profile, str(a))
    write_profile(run_profile(planted, {"alpha": ALPHA, "beta": BETA}), str(b))
    assert a.read_bytes() == b.read_bytes()
    load_profile(str(a))  # validates


def test_profile_heatmap_png(planted, tmp_path):
    pytest.importorskip("matplotlib")
    from moepage.surgery.heatmap import write_heatmap

    profile = run_profile(planted, {"alpha": ALPHA, "beta": BETA})
    png = write_heatmap(profile, str(tmp_path / "heat.png"))
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_secretary_learns_planted_domains_from_profile(planted):
    from moepage.paging.secretary import Secretary

    sec = Secretary.from_profile(run_profile(planted, {"alpha": ALPHA, "beta": BETA}))
    assert sec.predict("17+25=42;6*7=42;")[0] == "alpha"
    assert sec.predict("a lazy cat and a quick dog in the sun")[0] == "beta"
    hot = sec.experts_for("alpha", 4)
    assert sorted(hot) == [(0, 1), (0, 6), (2, 1), (2, 6)]


# ---- extract -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_extract_all_experts_is_identical(family, checkpoints, tmp_path):
    src = checkpoints(family)
    prof = saved_profile(tmp_path, src, {"prose": BETA})
    out = extract_model(str(src), prof, "prose", 8, str(tmp_path / "all"))["out"]
    ids = prompt_ids(24, json.loads((src / "config.json").read_text())["vocab_size"])
    with torch.no_grad():
        ref = reference_model(src)(torch.tensor([ids])).logits[0]
        got = reference_model(out)(torch.tensor([ids])).logits[0]
    assert torch.equal(ref, got)
    engine = Engine.load(EngineConfig(out))
    assert (engine.logits_all(ids) - ref).abs().max().item() < 1e-4
    engine.close()


def test_extract_writes_shards_with_an_index(checkpoints, tmp_path):
    src = checkpoints("qwen3_moe")
    prof = saved_profile(tmp_path, src, {"prose": BETA})
    out = extract_model(str(src), prof, "prose", 8, str(tmp_path / "sharded"), max_shard_bytes=150_000)["out"]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = prompt_ids(16, json.loads((src / "config.json").read_text())["vocab_size"])
    with torch.no_grad():
        assert torch.equal(reference_model(src)(torch.tensor([ids])).logits, reference_model(out)(torch.tensor([ids])).logits)


def test_extract_keeps_exactly_the_chosen_experts(planted, tmp_path):
    prof = saved_profile(tmp_path, planted, {"alpha": ALPHA, "beta": BETA})
    r = extract_model(str(planted), prof, "alpha", 3, str(tmp_path / "out"))
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == 3 and cfg["num_experts_per_tok"] == 2
    assert r["name"] == f"{planted.name}-alpha-3e"
    src, dst = open_checkpoint(str(planted)), open_checkpoint(str(out))
    fam = src.family
    for layer in (0, 2):
        kept = r["kept"][str(layer)]
        assert len(kept) == 3 and set(ALPHA_EXPERTS) <= set(kept)
        router = to_checkpoint(fam.names, f"layers.{layer}.router")
        assert torch.equal(dst.read_tensor(router), src.read_tensor(router)[kept])
        for new, old in enumerate(kept):
            a, b = dst.experts.read(layer, new), src.experts.read(layer, old)
            assert all(torch.equal(getattr(a, p), getattr(b, p)) for p in ("gate", "up", "down"))
        with pytest.raises(Exception):
            dst.experts.read(layer, 3)
    model = reference_model(out)  # transformers loads it
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    readme = (out / "README.md").read_text()
    assert "alpha-3e" in readme and "saliency" in readme and (out / "tokenizer.json").exists()
    r1 = extract_model(str(planted), prof, "alpha", 1, str(tmp_path / "one"))
    assert r1["top_k"] == 1 and json.loads((tmp_path / "one" / "config.json").read_text())["num_experts_per_tok"] == 1


def test_extract_bad_input_errors(planted, tmp_path, checkpoints):
    prof = saved_profile(tmp_path, planted, {"alpha": ALPHA})
    with pytest.raises(ValueError, match="unknown domain 'code'"):
        extract_model(str(planted), prof, "code", 2, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="between 1 and the model's 8"):
        extract_model(str(planted), prof, "alpha", 9, str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="profile file not found"):
        extract_model(str(planted), str(tmp_path / "nope.json"), "alpha", 2, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="profile was made on a model"):
        extract_model(str(checkpoints("mixtral")), prof, "alpha", 2, str(tmp_path / "x"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        extract_model(str(planted), prof, "alpha", 2, str(tmp_path / "full"))


# ---- dense -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,arch", [("qwen3_moe", "Qwen3ForCausalLM"), ("qwen2_moe", "Qwen2ForCausalLM"),
                                         ("mixtral", "MistralForCausalLM")])
def test_dense_reproduces_forced_routing(family, arch, tmp_path, tokenizer_dir):
    kept = [2, 5]
    path = make_checkpoint(tmp_path / "forced", family, tokenizer_dir, seed=4)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    plant_routing(path, family, torch.ones(vocab), kept, force=True)
    prof = saved_profile(tmp_path, path, {"mix": ALPHA + BETA})
    r = extract_model(str(path), prof, "mix", 2, str(tmp_path / "dense"), dense=True)
    assert r["kept"] == {str(layer): kept for layer in open_checkpoint(str(path)).args.moe_layers}
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert cfg["architectures"] == [arch] and "num_experts_per_tok" not in cfg
    ids = prompt_ids(32, vocab, seed=5)
    dense = reference_model(tmp_path / "dense")
    assert type(dense).__name__ == arch
    with torch.no_grad():
        want = reference_model(path)(torch.tensor([ids])).logits[0]
        got = dense(torch.tensor([ids])).logits[0]
    assert (want - got).abs().max().item() < 1e-4
    assert r["name"].endswith("-mix-2e-dense")


def test_dense_olmoe_is_a_clear_error(checkpoints, tmp_path):
    src = checkpoints("olmoe")
    prof = saved_profile(tmp_path, src, {"prose": BETA})
    with pytest.raises(ValueError, match="--dense is not supported for olmoe.*post-norm"):
        extract_model(str(src), prof, "prose", 2, str(tmp_path / "d"), dense=True)
    assert not (tmp_path / "d").exists()


# ---- prune -------------------------------------------------------------------------------------------

def test_prune_global_budget(planted, tmp_path):
    prof = saved_profile(tmp_path, planted, {"alpha": ALPHA, "beta": BETA})
    r = prune_model(str(planted), prof, str(tmp_path / "half"), ratio=0.5)
    assert r["experts_per_layer"] == 4
    for layer in ("0", "2"):
        assert r["kept"][layer] == sorted(ALPHA_EXPERTS + BETA_EXPERTS)  # the calibration mix's salient experts
    assert sum(r["free_allocation"].values()) == 8
    assert json.loads((tmp_path / "half" / "config.json").read_text())["num_local_experts"] == 4
    reference_model(tmp_path / "half")
    size = sum(f.stat().st_size for f in (tmp_path / "half").glob("*.safetensors"))
    r2 = prune_model(str(planted), prof, str(tmp_path / "sized"), max_bytes=size + 100)
    assert r2["experts_per_layer"] == 4
    with pytest.raises(ValueError, match="exactly one budget"):
        prune_model(str(planted), prof, str(tmp_path / "x"), ratio=0.5, keep=2)
    with pytest.raises(ValueError, match="too small"):
        prune_model(str(planted), prof, str(tmp_path / "x"), max_bytes=1000)


# ---- ranking criterion ---------------------------------------------------------------------------------

def test_default_criterion_weighs_frequency_unit():
    """The demo-model case from the audit: 2042 tokens to expert 0, 2 to expert 2 (with larger outputs)."""
    from moepage.surgery.selection import DEFAULT_CRITERION, global_budget_per_layer, top_experts_per_layer

    stats = {"count": [[2042, 0, 2, 0]], "mass": [[2000.0, 0.0, 1.9, 0.0]], "saliency": [[3.0, 0.0, 40.0, 0.0]]}
    assert DEFAULT_CRITERION == "activation"
    assert top_experts_per_layer(stats, [3], 1) == {3: [0]}
    assert top_experts_per_layer(stats, [3], 1, "saliency") == {3: [2]}  # REAP per routed token, kept by name
    assert top_experts_per_layer(stats, [3], 1, "reap") == {3: [2]}
    assert top_experts_per_layer(stats, [3], 1, "count") == {3: [0]}
    assert global_budget_per_layer({k: v * 2 for k, v in stats.items()}, [0, 1], 3) == {0: 2, 1: 1}
    with pytest.raises(ValueError, match="unknown criterion"):
        top_experts_per_layer(stats, [3], 1, "loudest")


def test_rare_loud_expert_does_not_beat_a_busy_one_by_default(tmp_path, tokenizer_dir, capsys):
    """A real model: alpha text routes to experts {1, 6}; a single letter word in it reaches expert 3, whose
    outputs are made 25x larger. `extract --keep 1` with the default criterion keeps a busy expert;
    REAP (per routed token) keeps the rare loud one."""
    from moepage.cli import main
    from moepage.engine.tokenizer import Tokenizer

    path = make_checkpoint(tmp_path / "loud", "qwen3_moe", tokenizer_dir, seed=7)
    tok = Tokenizer.from_dir(str(path))
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    plant_routing(path, "qwen3_moe", token_signs(tok, vocab, ALPHA, BETA), ALPHA_EXPERTS, BETA_EXPERTS)
    w = _weights(path)
    fam = family_for("qwen3_moe")
    for layer in (0, 2):
        w[expert_names(fam.expert_names, layer, 3)["down"]] *= 25.0  # row 0 stays zero: routing is unchanged
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    text = tmp_path / "alpha.txt"
    text.write_text(ALPHA + " fox " + ALPHA)
    prof = tmp_path / "p.json"
    assert main(["profile", str(path), "--domain", f"alpha={text}", "-o", str(prof), "--no-heatmap"]) == 0
    d = json.loads(prof.read_text())["domains"]["alpha"]
    for row in range(2):
        count, sal = d["count"][row], d["saliency"][row]
        assert 0 < count[3] * 10 < min(count[1], count[6]), count  # expert 3 is rare ...
        assert sal[3] > 2 * max(s for e, s in enumerate(sal) if e != 3), sal  # ... and the loudest
    assert main(["extract", str(path), str(tmp_path / "default"), "--profile", str(prof), "--domain", "alpha",
                 "--keep", "1"]) == 0
    kept = json.loads((tmp_path / "default" / "moepage_surgery.json").read_text())
    assert kept["criterion"] == "activation"
    assert all(v[0] in ALPHA_EXPERTS for v in kept["kept"].values()), kept["kept"]
    assert "Router-weighted activation mass" in (tmp_path / "default" / "README.md").read_text().replace("router-", "Router-")
    assert main(["extract", str(path), str(tmp_path / "reap"), "--profile", str(prof), "--domain", "alpha",
                 "--keep", "1", "--criterion", "saliency"]) == 0
    kept = json.loads((tmp_path / "reap" / "moepage_surgery.json").read_text())
    assert kept["kept"] == {"0": [3], "2": [3]}
    assert "selection count" in (tmp_path / "reap" / "README.md").read_text()


def test_profile_reads_gzipped_text(tmp_path):
    """Calibration text under /usr/share/doc is often README.gz: profile must score its text, not its bytes."""
    import gzip

    from moepage.surgery.profile import read_sources

    (tmp_path / "plain.txt").write_text("hello prose\n")
    with gzip.open(tmp_path / "README.gz", "wt", encoding="utf-8") as f:
        f.write("compressed prose text\n")
    got = read_sources([str(tmp_path / "README.gz"), str(tmp_path / "plain.txt")], "prose")
    assert [s.text for s in got] == ["compressed prose text\n", "hello prose\n"]
