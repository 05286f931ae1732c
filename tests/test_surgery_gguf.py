"""`extract --gguf` / `prune --gguf`: the GGUF written next to the safetensors result.

- MoE results (qwen3moe, qwen2moe, llama + experts, olmoe): moepage loads the GGUF and its fp32 logits equal the
  safetensors result's (max abs < 1e-4); llama.cpp loads it and its greedy tokens equal moepage's.
- Dense results (qwen3, qwen2, llama for Mistral): llama.cpp's greedy tokens equal moepage's dense forward's.
- Tied embeddings on qwen2moe: llama.cpp requires output.weight, so it is written from the embedding.
llama.cpp checks skip with the reason when llama-cpp-python is not installed.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gguf_support import LlamaCppGreedy, make_gguf_source
from moepage.cli import main
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.sampling import SamplingParams
from moepage.surgery.pipeline import extract_model
from moepage.surgery.profile import TextSource, profile_engine
from moepage.surgery.profile_format import write_profile

PROMPT = "def main(argv):\n    for item in argv:\n        print(item)\n"
CALIBRATION = "import os\nimport sys\n\ndef add(a, b):\n    return a + b\n" * 6
MOE = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe"}
DENSE = {"qwen3_moe": ("qwen3", "Qwen3ForCausalLM"), "qwen2_moe": ("qwen2", "Qwen2ForCausalLM"),
         "mixtral": ("llama", "MistralForCausalLM")}


def profile_of(model_dir, out_path):
    engine = Engine.load(EngineConfig(str(model_dir)))
    try:
        write_profile(profile_engine(engine, {"code": [TextSource("code.py", CALIBRATION)]}, max_seq=64,
                                     max_tokens_per_domain=256), str(out_path))
    finally:
        engine.close()
    return str(out_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory, tokenizer_dir):
    """{family: {'moe': extract result, 'dense': extract --dense result}} with GGUFs."""
    root = tmp_path_factory.mktemp("surgery-gguf")
    out = {}
    for i, family in enumerate(MOE):
        src = make_gguf_source(root / family, family, tokenizer_dir, seed=20 + i)
        prof = profile_of(src, root / f"{family}-profile.json")
        out[family] = {"src": src, "moe": extract_model(str(src), prof, "code", 4, str(root / f"{family}-4e"),
                                                        gguf_type="auto")}
        if family in DENSE:
            out[family]["dense"] = extract_model(str(src), prof, "code", 2, str(root / f"{family}-dense"), dense=True,
                                                 gguf_type="auto")
    return out


def greedy_moepage(path: str, n: int = 16) -> tuple[list[int], list[int]]:
    engine = Engine.load(EngineConfig(path, dtype="float32"))
    try:
        ids = engine.tokenizer.encode(PROMPT)
        return ids, [s.token for s in engine.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))]
    finally:
        engine.close()


def greedy_dense(model_dir: str, ids: list[int], n: int = 16) -> tuple[list[int], torch.Tensor]:
    """moepage's dense scoring path (quality.scorer): greedy by full recompute, and the logits rows used."""
    from moepage.surgery.quality import scorer

    logits_all, _, close, _ = scorer(model_dir)
    seq, rows = list(ids), []
    try:
        for _ in range(n):
            row = logits_all(seq)[-1]
            rows.append(row)
            seq.append(int(row.argmax()))
    finally:
        close()
    return seq[len(ids):], torch.stack(rows)


def assert_same_greedy(ours: list[int], theirs: list[int], rows_ours: torch.Tensor, rows_theirs, what: str):
    """Same greedy tokens, and logits within 0.02 (llama.cpp keeps its KV cache in F16 even for an F32 file)."""
    gap = (rows_ours - torch.stack([torch.from_numpy(np.asarray(r)) for r in rows_theirs])).abs().max().item()
    assert ours == theirs, f"{what}: moepage {ours} vs llama.cpp {theirs} (logit gap {gap})"
    assert gap < 0.02, f"{what}: logits differ from llama.cpp's by {gap}"


@pytest.mark.parametrize("family", list(MOE))
def test_moe_gguf_logits_equal_the_safetensors_result(family, results):
    r = results[family]["moe"]
    path = f"{r['out']}/{r['gguf']['path']}"
    assert r["gguf"]["architecture"] == MOE[family]
    st = Engine.load(EngineConfig(r["out"], dtype="float32"))
    gg = Engine.load(EngineConfig(path, dtype="float32"))
    try:
        assert gg.ckpt.kind == "gguf" and gg.args.num_experts == 4 and gg.args.family == st.args.family
        ids = st.tokenizer.encode(PROMPT)
        assert gg.tokenizer.encode(PROMPT) == ids
        assert gg.tokenizer.decode(ids) == st.tokenizer.decode(ids)
        assert gg.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
            st.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        diff = (st.logits_all(ids) - gg.logits_all(ids)).abs().max().item()
        assert diff < 1e-4, f"{family}: max abs logit diff {diff}"
    finally:
        st.close(), gg.close()
    card = open(f"{r['out']}/README.md").read()
    assert r["gguf"]["path"] in card and r["gguf"]["path"] == f"{r['name']}.gguf"


@pytest.mark.parametrize("family", list(MOE))
def test_moe_gguf_greedy_equals_llama_cpp(family, results):
    r = results[family]["moe"]
    path = f"{r['out']}/{r['gguf']['path']}"
    llm = LlamaCppGreedy(path)  # skips with the reason when llama-cpp-python is missing
    ids, ours = greedy_moepage(path)
    try:
        theirs, rows = llm.generate(ids, len(ours))
    finally:
        llm.close()
    engine = Engine.load(EngineConfig(path, dtype="float32"))
    rows_ours = engine.logits_all(ids + ours)[len(ids) - 1 : len(ids) - 1 + len(ours)]
    engine.close()
    assert_same_greedy(ours, theirs, rows_ours, rows, family)


@pytest.mark.parametrize("family", list(DENSE))
def test_dense_gguf_greedy_equals_llama_cpp(family, results):
    r = results[family]["dense"]
    arch, hf_arch = DENSE[family]
    assert r["gguf"]["architecture"] == arch and r["architecture"] == hf_arch
    path = f"{r['out']}/{r['gguf']['path']}"
    llm = LlamaCppGreedy(path)
    from moepage.engine.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(r["out"]).encode(PROMPT)
    ours, rows_ours = greedy_dense(r["out"], ids)
    try:
        theirs, rows = llm.generate(ids, len(ours))
    finally:
        llm.close()
    assert_same_greedy(ours, theirs, rows_ours, rows, f"{family} dense")


def test_dense_gguf_tensors_round_trip(results):
    """Without llama.cpp: every tensor of a dense GGUF reads back equal to the safetensors (q/k un-permuted)."""
    import gguf
    from safetensors.torch import load_file

    from moepage.engine.families import common
    from moepage.engine.gguf_checkpoint import unpermute_qk
    from moepage.engine.weight_names import to_checkpoint

    for family in ("qwen3_moe", "mixtral"):
        r = results[family]["dense"]
        st = load_file(f"{r['out']}/model.safetensors")
        cfg = json.loads(open(f"{r['out']}/config.json").read())
        reader = gguf.GGUFReader(f"{r['out']}/{r['gguf']['path']}")
        assert reader.fields["general.architecture"].contents() == DENSE[family][0]
        table = {**common.ATTENTION, **common.QWEN_MLP}
        back = {to_checkpoint(common.GGUF, c): to_checkpoint(table, c)
                for c in [k.replace("{L}", str(i)) for k in table for i in range(cfg["num_hidden_layers"])]
                + ["embed", "norm", "lm_head"]}
        assert len(reader.tensors) == len(st)
        for t in reader.tensors:
            x = torch.from_numpy(np.array(t.data)).reshape(st[back[t.name]].shape)
            if DENSE[family][0] == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg["num_attention_heads"] if "attn_q" in t.name else cfg["num_key_value_heads"]
                x = unpermute_qk(x, heads)
            assert torch.equal(x, st[back[t.name]].float()), t.name


def test_tied_qwen2moe_gets_output_weight_and_prune_gguf(tmp_path, tokenizer_dir, capsys):
    """llama.cpp's qwen2moe has no fallback to the embedding: output.weight is written from it (prune --gguf)."""
    import gguf

    src = make_gguf_source(tmp_path / "tied", "qwen2_moe", tokenizer_dir, seed=31, tie_word_embeddings=True)
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"] is True
    prof = profile_of(src, tmp_path / "p.json")
    out = tmp_path / "pruned"
    assert main(["prune", str(src), str(out), "--profile", prof, "--ratio", "0.5", "--gguf"]) == 0
    assert ".gguf (GGUF qwen2moe" in capsys.readouterr().out
    path = next(out.glob("*.gguf"))
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert np.array_equal(tensors["output.weight"], tensors["token_embd.weight"])
    st = Engine.load(EngineConfig(str(out), dtype="float32"))
    gg = Engine.load(EngineConfig(str(path), dtype="float32"))
    ids = st.tokenizer.encode(PROMPT)
    assert (st.logits_all(ids) - gg.logits_all(ids)).abs().max().item() < 1e-4
    st.close(), gg.close()
    llm = LlamaCppGreedy(str(path))
    ids, ours = greedy_moepage(str(path))
    try:
        theirs, _ = llm.generate(ids, len(ours))
    finally:
        llm.close()
    assert ours == theirs


def test_gguf_with_dense_layers_and_bf16_loads_in_moepage(checkpoints, tmp_path):
    """The conftest Qwen2-MoE has a dense layer (mlp_only_layers): moepage still serves the GGUF (llama.cpp would
    not: the note says so); bf16 tensors round-trip exactly."""
    src = checkpoints("qwen2_moe", "bfloat16")
    prof = profile_of(src, tmp_path / "p.json")
    r = extract_model(str(src), prof, "code", 3, str(tmp_path / "x"), gguf_type="auto")
    assert any("are dense" in n for n in r["gguf"]["notes"])
    st = Engine.load(EngineConfig(r["out"], dtype="float32"))
    gg = Engine.load(EngineConfig(f"{r['out']}/{r['gguf']['path']}", dtype="float32"))
    ids = st.tokenizer.encode(PROMPT)
    assert (st.logits_all(ids) - gg.logits_all(ids)).abs().max().item() < 1e-4
    st.close(), gg.close()
    with pytest.raises(ValueError, match="unknown GGUF type"):
        extract_model(str(src), prof, "code", 3, str(tmp_path / "y"), gguf_type="q3")


def test_no_gguf_without_the_flag(checkpoints, tmp_path):
    src = checkpoints("qwen3_moe")
    prof = profile_of(src, tmp_path / "p.json")
    r = extract_model(str(src), prof, "code", 8, str(tmp_path / "x"))
    assert r["gguf"] is None and not list((tmp_path / "x").glob("*.gguf"))
