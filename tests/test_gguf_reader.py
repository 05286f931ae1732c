"""The GGUF reader on synthetic files: expert slices read with pread, clear errors on bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from moepage.engine.checkpoint import open_checkpoint  # noqa: E402
from moepage.paging.gguf_file import GGUFFile  # noqa: E402
from moepage.paging.safetensors_file import CheckpointError  # noqa: E402

H, I, E, V = 256, 256, 4, 16  # hidden, expert FFN, experts, vocab


def write_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, str]], meta: dict | None = None):
    """tensors: name -> (float32 values in torch shape, GGML type name); quantized with gguf-py."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for name, (values, kind) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        if kind in ("Q2_K", "Q8_K"):  # gguf-py cannot quantize these: random bytes of the right size
            nbytes = values.size // 256 * {"Q2_K": 84, "Q8_K": 292}[kind]
            raw = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
            w.add_tensor(name, raw.reshape(*values.shape[:-1], -1), raw_dtype=qtype)
        elif kind in ("F32", "F16"):
            w.add_tensor(name, values.astype(np.float32 if kind == "F32" else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def tiny_qwen3moe(path, expert_type: str = "Q8_0"):
    rng = np.random.default_rng(1)
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.1  # noqa: E731
    tensors = {"token_embd.weight": (r(V, H), "F32"), "output_norm.weight": (r(H) + 1, "F32"),
               "output.weight": (r(V, H), "Q8_0")}
    for L in range(2):
        b = f"blk.{L}."
        tensors.update({
            b + "attn_norm.weight": (r(H), "F32"), b + "ffn_norm.weight": (r(H), "F32"),
            b + "attn_q.weight": (r(H, H), "F16"), b + "attn_k.weight": (r(H // 2, H), "F16"),
            b + "attn_v.weight": (r(H // 2, H), "F16"), b + "attn_output.weight": (r(H, H), "F16"),
            b + "attn_q_norm.weight": (r(64), "F32"), b + "attn_k_norm.weight": (r(64), "F32"),
            b + "ffn_gate_inp.weight": (r(E, H), "F32"),
            b + "ffn_gate_exps.weight": (r(E, I, H), expert_type), b + "ffn_up_exps.weight": (r(E, I, H), expert_type),
            b + "ffn_down_exps.weight": (r(E, H, I), "Q8_0"),
        })
    meta = {"qwen3moe.block_count": 2, "qwen3moe.embedding_length": H, "qwen3moe.attention.head_count": 4,
            "qwen3moe.attention.head_count_kv": 2, "qwen3moe.attention.key_length": 64, "qwen3moe.expert_count": E,
            "qwen3moe.expert_used_count": 2, "qwen3moe.expert_feed_forward_length": I,
            "qwen3moe.context_length": 128, "qwen3moe.rope.freq_base": 10000.0,
            "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6}
    return write_gguf(path, "qwen3moe", tensors, meta), tensors


def test_expert_slices_are_contiguous_and_dequantize_like_the_whole_tensor(tmp_path):
    path, tensors = tiny_qwen3moe(tmp_path / "m.gguf")
    ckpt = open_checkpoint(path)
    assert ckpt.kind == "gguf" and ckpt.args.num_experts == E and ckpt.experts.quantized
    f = GGUFFile(path)
    whole = f.read("blk.1.ffn_gate_exps.weight")  # [E, I, H]
    assert tuple(whole.shape) == (E, I, H)
    for e in range(E):
        q = ckpt.experts.read_quantized(1, e)
        assert q.gate.type.name == "Q8_0" and q.gate.shape == (I, H)
        assert torch.equal(q.gate.dequantize(), whole[e])
        assert torch.equal(ckpt.experts.read(1, e).gate, whole[e])
    assert ckpt.experts.stored_nbytes(1) == 3 * (I * H // 32 * 34)
    ref = gguf.quants.dequantize(gguf.quants.quantize(tensors["blk.1.ffn_gate_exps.weight"][0], gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(whole.numpy(), ref)
    f.close()


def test_resident_tensors_keep_float_types(tmp_path):
    path, tensors = tiny_qwen3moe(tmp_path / "m.gguf")
    ckpt = open_checkpoint(path)
    q = ckpt.read_tensor("blk.0.attn_q.weight")
    assert q.dtype == torch.float16 and torch.equal(q, torch.from_numpy(tensors["blk.0.attn_q.weight"][0]).half())
    assert torch.equal(ckpt.read_tensor("token_embd.weight"), torch.from_numpy(tensors["token_embd.weight"][0]))


def test_wrong_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUX" + bytes(100))
    with pytest.raises(CheckpointError, match="bad.gguf: not a GGUF file"):
        open_checkpoint(str(p))


def test_truncated_file_names_the_file(tmp_path):
    path, _ = tiny_qwen3moe(tmp_path / "t.gguf")
    data = open(path, "rb").read()
    for cut in (len(data) - 100, 200):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(CheckpointError, match="t.gguf: .*truncated"):
            open_checkpoint(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": (np.zeros((V, H), np.float32), "F32")})
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gpt2'"):
        open_checkpoint(path)


def test_unsupported_expert_quant_type_names_type_and_tensor(tmp_path):
    path, _ = tiny_qwen3moe(tmp_path / "q8k.gguf", expert_type="Q8_K")  # an activation-only type: no matvec exists
    with pytest.raises(CheckpointError, match="unsupported quant type Q8_K in tensor 'blk.0.ffn_gate_exps.weight'"):
        open_checkpoint(path)


def test_q2_k_experts_open_where_ggml_computes_them(tmp_path):
    from moepage.kernels.ggml_cpu import backend

    if backend() is None:
        pytest.skip("ggml's CPU library (libggml-python) is unavailable: torch decodes no Q2_K")
    path, _ = tiny_qwen3moe(tmp_path / "q2.gguf", expert_type="Q2_K")
    q = open_checkpoint(path).experts.read_quantized(0, 1)
    assert q.gate.type.name == "Q2_K" and q.gate.dequantize().shape == (I, H)


def test_unsupported_tokenizer_model_is_reported(tmp_path):
    from moepage.engine.gguf_tokenizer import tokenizer_from_gguf

    with pytest.raises(CheckpointError, match="x.gguf: GGUF tokenizer model 'llama' is not supported yet"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")


def test_missing_tokenizer_is_reported(tmp_path):
    from moepage.engine.engine import Engine, EngineConfig

    path, _ = tiny_qwen3moe(tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="m.gguf: the GGUF file has no tokenizer metadata"):
        open_checkpoint(path).load_tokenizer()
    engine = Engine.load(EngineConfig(path, dtype="float32"))  # no tokenizer: the engine still runs on ids
    assert engine.tokenizer is None and engine.logits_all([1, 2, 3]).shape == (3, V)
    engine.close()
