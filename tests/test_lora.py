"""LoRA: adapters trained by `moepage train --lora` load in transformers + PEFT with the same logits, and moepage
serves them (merged at load and at page-in, experts paged under a small cache) with PEFT's logits and greedy tokens;
PEFT-written adapters serve too; a bad adapter is a clear error."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import prompt_ids, reference_model
from moepage.cli import main
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.lora_merge import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
from moepage.engine.moe import PreparedExpert
from moepage.engine.sampling import SamplingParams
from moepage.paging.safetensors_file import CheckpointError
from moepage.surgery.lora import LoraDecoder, LoraSpec, save_adapter
from moepage.surgery.train import TrainConfig, train
from moepage.surgery.trainable_model import TrainableDecoder
from test_train import Quiet, toy_corpus

peft = pytest.importorskip("peft")


def peft_model(base_dir, adapter_dir):
    """transformers (the reference) + PEFT with the adapter, fp32, eval mode."""
    from peft import PeftModel

    if json.loads((base_dir / "config.json").read_text())["model_type"] == "qwen2_moe":
        # PEFT 0.21 converts v4-style per-expert adapters to transformers v5's fused experts for the models that map
        # onto qwen2_moe's layout, but misses qwen2_moe itself; register it as PEFT registers mixtral.
        from peft.utils import transformers_weight_conversion as conversion

        conversion._MODEL_TO_CONVERSION_PATTERN.setdefault("qwen2_moe", "qwen2_moe")
    return PeftModel.from_pretrained(reference_model(base_dir), str(adapter_dir)).eval()


def small_cache_engine(path, adapter, experts: int):
    each = PreparedExpert.nbytes_for(64, 32, torch.float32)
    return Engine.load(EngineConfig(model=str(path), dtype="float32", lora=str(adapter),
                                    expert_cache_bytes=experts * each, preload=False))


def train_adapter(path, out, steps=4):
    """A LoRA on q, v and every routed expert, trained by the real trainer until B is non-zero."""
    model = LoraDecoder(TrainableDecoder.from_pretrained(str(path)), LoraSpec(rank=4, alpha=8))
    corpus = toy_corpus()
    cfg = TrainConfig(mode="lm", steps=steps, batch_size=2, seq_len=16, lr=2e-2, warmup_steps=0, log_every=steps)
    train(model, corpus, cfg, str(out / "run"), progress=Quiet())
    save_adapter(model, str(out), base_model=str(path))
    return model


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_trained_adapter_matches_transformers_peft_paged(checkpoints, tmp_path, family):
    path = checkpoints(family)
    model = train_adapter(path, tmp_path)
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    expert_b = [t for k, t in tensors.items() if ".mlp.experts." in k and "lora_B" in k]
    assert expert_b and all(t.abs().max() > 0 for t in expert_b)  # training moved every expert it routed to
    ids = prompt_ids(24, 390)
    ref = peft_model(path, tmp_path)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
        base = ref.get_base_model()
        with ref.disable_adapter():
            plain = base(torch.tensor([ids])).logits[0]
        ours = model(torch.tensor([ids])).logits[0]
    assert (theirs - plain).abs().max() > 1e-2  # the adapter changes the answer
    assert (ours - theirs).abs().max() < 1e-4
    engine = small_cache_engine(path, tmp_path, experts=2)  # 2 of 16 experts: every layer pages
    try:
        assert (engine.logits_all(ids) - theirs).abs().max() < 1e-4
        greedy = [s.token for s in engine.generate(ids, SamplingParams(max_tokens=8, temperature=0.0,
                                                                         ignore_eos=True))]
        stats = engine.cache.stats.snapshot()
        assert stats["misses"] > 0 and stats["evictions"] > 0  # paged, not resident
    finally:
        engine.close()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):  # the reference's greedy continuation, one full forward per token
            seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
    assert greedy == seq[len(ids):]


def test_cli_train_lora_merge_and_serve_flag(checkpoints, tmp_path):
    """`train --lora --merge`: the adapter, and a merged checkpoint with the engine's --lora logits."""
    path = checkpoints("qwen2_moe")
    toy_corpus().save(str(tmp_path / "toy.npz"))
    out = tmp_path / "out"
    assert main(["train", str(path), str(out), "--lora", "--rank", "2", "--target", "q_proj,k_proj,o_proj,experts",
                 "--corpus", str(tmp_path / "toy.npz"), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--lr", "0.02", "--warmup", "0", "--merge"]) == 0
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "rank 2" in (out / "README.md").read_text() and "merged" in (out / "merged" / "README.md").read_text()
    ids = prompt_ids(16, 390)
    with_lora = Engine.load(EngineConfig(model=str(path), dtype="float32", lora=str(out)))
    merged = Engine.load(EngineConfig(model=str(out / "merged"), dtype="float32"))
    plain = Engine.load(EngineConfig(model=str(path), dtype="float32"))
    try:
        a, b, c = (e.logits_all(ids) for e in (with_lora, merged, plain))
        assert (a - b).abs().max() < 1e-4 and (a - c).abs().max() > 1e-3
    finally:
        for e in (with_lora, merged, plain):
            e.close()
    assert main(["train", str(path), str(tmp_path / "x"), "--merge", "--corpus", str(tmp_path / "toy.npz")]) == 2


def test_peft_written_adapter_serves(checkpoints, tmp_path):
    """An adapter PEFT itself wrote (attention projections, random B) gives PEFT's logits through moepage."""
    from peft import LoraConfig, get_peft_model

    path = checkpoints("qwen3_moe")
    torch.manual_seed(0)
    ref = get_peft_model(reference_model(path), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj",
                                                                                                "v_proj", "o_proj"],
                                                           init_lora_weights=False)).eval()
    ref.save_pretrained(str(tmp_path))
    ids = prompt_ids(20, 390)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    engine = small_cache_engine(path, tmp_path, experts=3)
    try:
        assert (engine.logits_all(ids) - theirs).abs().max() < 1e-4
    finally:
        engine.close()


def test_dense_model_lora_matches_peft(tmp_path, tokenizer_dir):
    """An extracted --dense model (Qwen2): `experts` adapts its MLP; PEFT agrees."""
    from transformers import Qwen2Config

    from conftest import save_random_checkpoint

    info = json.loads((tokenizer_dir / "info.json").read_text())
    cfg = Qwen2Config(vocab_size=info["vocab_size"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                      eos_token_id=info["eos_token_id"], tie_word_embeddings=False)
    path = save_random_checkpoint(cfg, tmp_path / "dense", tokenizer_dir)
    model = LoraDecoder(TrainableDecoder.from_pretrained(str(path)), LoraSpec(rank=3, targets=("v_proj", "experts")))
    with torch.no_grad():
        for b in model.lora_b.values():
            b.normal_(0, 0.1)
    save_adapter(model, str(tmp_path / "ad"), base_model=str(path))
    assert set(json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())["target_modules"]) == \
        {"v_proj", "gate_proj", "up_proj", "down_proj"}
    ids = prompt_ids(20, 390)
    ref = peft_model(path, tmp_path / "ad")
    with torch.no_grad():
        assert (model(torch.tensor([ids])).logits[0] - ref(torch.tensor([ids])).logits[0]).abs().max() < 1e-4


def _write(dir_, config: dict, tensors: dict):
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dir_ / ADAPTER_WEIGHTS))
    return dir_


def test_bad_adapters_are_clear_errors(checkpoints, tmp_path):
    path = checkpoints("qwen3_moe")
    good = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    ok = {f"{q}.lora_A.weight": torch.zeros(2, 64), f"{q}.lora_B.weight": torch.zeros(64, 2)}
    assert read_adapter(str(_write(tmp_path / "ok", good, ok))).factors
    cases = {
        "dora": ({**good, "use_dora": True}, ok, "use_dora"),
        "prefix": ({**good, "peft_type": "PREFIX_TUNING"}, ok, "only LORA"),
        "fused": ({**good, "target_parameters": ["mlp.experts.gate_up_proj"]}, ok, "target_parameters"),
        "half": (good, {f"{q}.lora_A.weight": torch.zeros(2, 64)}, "lora_A only"),
        "shape": (good, {**ok, f"{q}.lora_B.weight": torch.zeros(64, 3)}, "are not"),
        "width": (good, {f"{q}.lora_A.weight": torch.zeros(2, 65), f"{q}.lora_B.weight": torch.zeros(64, 2)},
                  "the model's weight is"),
        "other": (good, {k.replace("layers.0", "layers.9"): v for k, v in ok.items()}, "does not have"),
        "embed": (good, {"base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(2, 64),
                         "base_model.model.model.embed_tokens.lora_B.weight": torch.zeros(390, 2)}, "not supported"),
        "nan": (good, {**ok, f"{q}.lora_A.weight": torch.full((2, 64), float("nan"))}, "non-finite"),
        "stray": (good, {**ok, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, "not a LoRA factor"),
    }
    for name, (config, tensors, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            Engine.load(EngineConfig(model=str(path), dtype="float32", lora=str(_write(tmp_path / name, config,
                                                                                        tensors))))
    with pytest.raises(CheckpointError, match="no such LoRA adapter"):
        Engine.load(EngineConfig(model=str(path), lora=str(tmp_path / "absent")))
