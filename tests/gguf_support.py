"""GGUF test support: tiny checkpoints converted with llama.cpp's own tools, and llama.cpp's greedy tokens.

llama.cpp's `convert_hf_to_gguf.py` ships in the llama-cpp-python sdist (not in its wheel). It is found at
$MOEPAGE_LLAMA_CPP_SRC (the sdist's `vendor/llama.cpp` directory, or the sdist .tar.gz itself, which is then
extracted once per session), else in a few usual places; tests that need it skip with the reason otherwise.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from conftest import family_config, save_random_checkpoint

LLAMA_CPP_VERSION = "0.3.36"
CANDIDATES = [
    "/tmp/lcp/llama_cpp_python-{v}/vendor/llama.cpp",
    "/tmp/lcp/llama_cpp_python-{v}.tar.gz",
    "~/.cache/moepage/llama_cpp_python-{v}/vendor/llama.cpp",
    "~/.cache/moepage/llama_cpp_python-{v}.tar.gz",
]

# Shapes K-quants accept (rows a multiple of 256), small enough for a 2-core CI.
GGUF_SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
EXPERT_FFN = 256


def llama_cpp_module():
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        pytest.skip(f"llama-cpp-python is not installed ({e}); `pip install llama-cpp-python=={LLAMA_CPP_VERSION}`")
    return llama_cpp


def _extract(tarball: str, dest_root: str) -> str:
    """The sdist's vendor/llama.cpp converter files (script, conversion/, gguf-py/) extracted under dest_root."""
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers()
                   if "/vendor/llama.cpp/" in m.name and (m.name.endswith("convert_hf_to_gguf.py")
                                                          or "/vendor/llama.cpp/conversion/" in m.name
                                                          or "/vendor/llama.cpp/gguf-py/" in m.name)]
        tar.extractall(dest_root, members=members, filter="data")
    found = glob.glob(os.path.join(dest_root, "*", "vendor", "llama.cpp", "convert_hf_to_gguf.py"))
    if not found:
        raise FileNotFoundError(f"{tarball}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
    return os.path.dirname(found[0])


def find_converter(tmp_root: str) -> str:
    """Directory holding convert_hf_to_gguf.py (+ conversion/, gguf-py/); pytest.skip if none."""
    env = os.environ.get("MOEPAGE_LLAMA_CPP_SRC")
    paths = [env] if env else []
    paths += [os.path.expanduser(c.format(v=LLAMA_CPP_VERSION)) for c in CANDIDATES]
    for p in paths:
        if os.path.isdir(p) and os.path.exists(os.path.join(p, "convert_hf_to_gguf.py")):
            return p
        if os.path.isfile(p) and p.endswith(".tar.gz"):
            return _extract(p, tmp_root)
    pytest.skip(
        "llama.cpp's convert_hf_to_gguf.py not found: set MOEPAGE_LLAMA_CPP_SRC to the llama-cpp-python sdist's "
        f"vendor/llama.cpp directory or to the sdist itself (`pip download --no-deps --no-binary :all: "
        f"llama-cpp-python=={LLAMA_CPP_VERSION}`)"
    )


# The converter recognises BPE pre-tokenizers by hashing the token ids of a test string, so a locally trained
# vocabulary is "not recognized" even though its pre-tokenizer is exactly GPT-2's byte-level regex. The wrapper
# falls back to "gpt-2" for an unknown hash, which is what llama.cpp's GPT-2 pre-tokenizer implements.
CONVERT_WRAPPER = textwrap.dedent("""
    import json, runpy, sys
    src = sys.argv[1]
    sys.path.insert(0, src)
    sys.path.insert(1, src + "/gguf-py")
    import conversion.base as base
    original = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    for hf_dir, out, outtype in json.loads(sys.argv[2]):
        sys.argv = [src + "/convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", outtype]
        runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
""")


def convert(converter_dir: str, jobs: list[tuple[str, str, str]]) -> None:
    """Run convert_hf_to_gguf for each (hf_dir, out_path, outtype) in one Python process."""
    cmd = [sys.executable, "-c", CONVERT_WRAPPER, converter_dir, json.dumps([[str(a), str(b), c] for a, b, c in jobs])]
    env = dict(os.environ, NO_LOCAL_GGUF="1")  # the wrapper already put the vendored gguf-py first
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed ({r.returncode}):\n{r.stderr[-4000:]}")


def quantize(src: str, dst: str, ftype_name: str) -> str:
    """llama.cpp's own quantizer (llama_model_quantize), e.g. ftype_name 'LLAMA_FTYPE_MOSTLY_Q4_K_M'."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype_name}) returned {rc}")
    return dst


def make_gguf_source(out_dir, family: str, tokenizer_dir, seed: int = 0, **over):
    """A tiny HF checkpoint with K-quant friendly shapes and every layer sparse (llama.cpp's MoE graphs
    have no dense layers), written as float32 safetensors."""
    info = json.loads((tokenizer_dir / "info.json").read_text())
    cfg = family_config(family, info["vocab_size"], info["eos_token_id"], **{**GGUF_SHAPE, **over})
    if family == "qwen3_moe":
        cfg.head_dim = 64
        cfg.moe_intermediate_size = EXPERT_FFN
        cfg.mlp_only_layers = []
    elif family == "qwen2_moe":
        cfg.moe_intermediate_size = EXPERT_FFN
        cfg.shared_expert_intermediate_size = EXPERT_FFN
        cfg.mlp_only_layers = []
    else:  # mixtral, olmoe
        cfg.intermediate_size = EXPERT_FFN
    if family == "olmoe":  # llama.cpp's olmoe graph normalises k over all heads: no GQA (as in OLMoE itself)
        cfg.num_key_value_heads = cfg.num_attention_heads
    return save_random_checkpoint(cfg, out_dir, tokenizer_dir, seed)


class LlamaCppGreedy:
    """llama.cpp's own greedy continuation (and logits) for a token prompt, fp32 CPU, 2 threads."""

    def __init__(self, path: str, n_ctx: int = 256):
        llama_cpp = llama_cpp_module()
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=2, n_batch=n_ctx, logits_all=True,
                                   verbose=False, seed=0)

    def generate(self, ids: list[int], n: int) -> tuple[list[int], list]:
        """n greedy tokens after ids, and the logits row (numpy [V]) that chose each of them."""
        self.llm.reset()
        self.llm.eval(ids)
        out, rows = [], []
        for _ in range(n):
            row = self.llm.scores[self.llm.n_tokens - 1].copy()
            tok = int(row.argmax())
            out.append(tok)
            rows.append(row)
            self.llm.eval([tok])
        return out, rows

    def close(self):
        self.llm.close()
