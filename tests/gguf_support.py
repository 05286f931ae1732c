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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from peers import llama_no_repack  # noqa: E402

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
    for hf_dir, out, outtype, extra in json.loads(sys.argv[2]):
        sys.argv = [src + "/convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", outtype, *extra]
        runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
""")


def convert(converter_dir: str, jobs: list[tuple[str, str, str]], extra: tuple[str, ...] = (),
            timeout: float | None = 600) -> None:
    """Run convert_hf_to_gguf for each (hf_dir, out_path, outtype) in one Python process, with the extra arguments
    (e.g. --no-mtp) on each."""
    jobs = json.dumps([[str(a), str(b), c, list(extra)] for a, b, c in jobs])
    env = dict(os.environ, NO_LOCAL_GGUF="1")  # the wrapper already put the vendored gguf-py first
    r = subprocess.run([sys.executable, "-c", CONVERT_WRAPPER, converter_dir, jobs], capture_output=True, text=True,
                       env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed ({r.returncode}):\n{r.stderr[-4000:]}")


def convert_one(converter_dir: str, hf_dir, out_path, outtype: str = "f16", extra: tuple[str, ...] = ()) -> str:
    convert(converter_dir, [(hf_dir, out_path, outtype)], extra)
    return str(out_path)


def hf_and_gguf(tmp_path_factory, name: str, make_hf, convert_with=convert_one) -> tuple:
    """(make_hf(root): a tiny HF checkpoint under a new temporary root, its f16 GGUF written by
    convert_with(converter, hf, out) with llama.cpp's converter); skips without llama-cpp-python or the converter."""
    llama_cpp_module()
    root = tmp_path_factory.mktemp(name)
    converter = find_converter(str(root / "src"))
    hf = make_hf(root)
    return hf, convert_with(converter, hf, root / "model-f16.gguf")


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
    """llama.cpp's own greedy continuation (and logits) for a token prompt, fp32 CPU, 2 threads, on its plain CPU
    buffers (`--no-repack`): the reference is the same on every CPU, and on AMX CPUs llama.cpp built native puts
    weights in AMX buffers whose backend aborts on some graphs (`GGML_ASSERT(*cur_backend_id != -1)`, DeepSeek)."""

    def __init__(self, path: str, n_ctx: int = 256):
        llama_cpp = llama_cpp_module()
        default = llama_no_repack(llama_cpp.llama_cpp)
        try:
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=2, n_batch=n_ctx, logits_all=True,
                                       verbose=False, seed=0)
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = default

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


# llama.cpp multiplies F16 weights by activations rounded to f16, so a router whose k-th and (k+1)-th logits are
# closer than this can pick a different expert there than a float32 reference does; from that token on the two
# caches hold different values. Measured: the tiny Mixtral's layer-0 router at its 45th token has top-2 margin 0.0017,
# and llama.cpp's logits move by 3.7 exactly there (and only there: before it they agree within 0.007).
ROUTER_TIE = 0.01


def router_margins(model, ids: list[int], top_k: int, probabilities: bool = False):
    """[T] per position, the smallest gap over layers between the k-th and (k+1)-th router logits of model
    (transformers, output_router_logits; probabilities: its routers give probabilities, compared as log-probabilities,
    as Gemma 4's)."""
    import torch

    with torch.no_grad():
        router = model(input_ids=torch.tensor([ids]), output_router_logits=True).router_logits
    scores = [r.reshape(len(ids), -1).float() for r in router]
    top = torch.stack([(s.log() if probabilities else s).topk(top_k + 1, dim=-1).values for s in scores])  # [L, T, k+1]
    return (top[..., top_k - 1] - top[..., top_k]).min(0).values


def first_tie(margins, tie: float = ROUTER_TIE) -> int:
    """The first position whose router margin is under tie, or the number of positions."""
    tied = (margins < tie).nonzero()
    return int(tied[0]) if len(tied) else len(margins)


def first_router_tie(hf_dir: str, ids: list[int], top_k: int, model=None) -> int:
    """The first position where some layer's router (model, else transformers' float32 model of hf_dir) has its k-th
    and (k+1)-th logits within ROUTER_TIE, or len(ids)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = model or AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return first_tie(router_margins(model, ids, top_k))


def check_greedy_against_llama_cpp(engine, path: str, ids: list[int], first_tie_at, n: int = 32,
                                   max_gap: float = 0.05, min_tokens: int = 8, lazy: bool = False):
    """engine (the GGUF at path, loaded): its n greedy tokens after ids against llama.cpp's own. Logits (teacher-forced
    on llama.cpp's tokens) within max_gap of llama.cpp's, compared up to the first router near-tie
    (first_tie_at(ids + llama.cpp's tokens), a position: from there f16 rounding may pick another expert and the two
    continuations part for a reason that is not a bug), which must come at least min_tokens in; a token that differs
    there only where llama.cpp's own top two are within 3x the gap. lazy: when all n tokens are equal and every logit
    within max_gap, no tie is looked for (all n compared). Returns (moepage's tokens, the number compared)."""
    import torch

    from family_support import greedy

    ours = greedy(engine, ids, n)
    llm = LlamaCppGreedy(path)
    try:
        theirs, rows = llm.generate(ids, n)
    finally:
        llm.close()
    logits = engine.logits_all(ids + theirs)[len(ids) - 1 : len(ids) - 1 + n]
    gaps = (logits - torch.stack([torch.from_numpy(r) for r in rows])).abs().amax(dim=-1)  # [n]
    k = n
    if not (lazy and ours == theirs and gaps.max() < max_gap):
        k = min(n, first_tie_at(ids + theirs) - len(ids) + 1)
        assert k >= min_tokens, f"a router near-tie after {k} tokens; pick a prompt without one ({ours} vs {theirs})"
    gap = gaps[:k].max().item()
    assert gap < max_gap, f"logits differ from llama.cpp's by {gap} within {k} tokens"
    i = next((j for j, (x, y) in enumerate(zip(ours[:k], theirs[:k])) if x != y), None)
    if i is not None:  # only where llama.cpp's own top two are within the logit gap
        margin = float(rows[i][theirs[i]] - rows[i][ours[i]])
        assert margin < 3 * gap, f"diverged at token {i} with margin {margin:.4f} (gap {gap:.4f})"
    print(f"\n{path}: compared {k} tokens with llama.cpp, logit gap {gap:.4f}, first divergence {i}")
    return ours, k


def check_paged_gguf(engine, path: str, ids: list[int], first_tie_at, also=(), tokenizer: bool = True,
                     **compare) -> int:
    """check_greedy_against_llama_cpp (closing engine after), then the same tokens from the file (and from each of
    also: split directories of it) at 25% of the experts and at the minimum, paging. Returns the tokens compared."""
    from family_support import check_budgets

    ours, n = check_greedy_against_llama_cpp(engine, path, ids, first_tie_at, **compare)
    a, each = engine.args, engine.plan.expert_bytes_each
    engine.close()
    check_budgets([path, *also], ids, ours, each, a, ("25%", "minimum"), dtype="float32", tokenizer=tokenizer)
    return n


def check_gguf_against_llama_cpp(hf_dir, gguf_path, prompt: str = "import os\nimport sys\n\ndef main():\n",
                                 min_tokens: int = 8) -> int:
    """A llama.cpp-converted GGUF served by moepage (fp32, experts paged from the file): 32 greedy tokens equal to
    llama.cpp's with every logit within 0.05 of its own, or, where they are not, equal up to the first router
    near-tie of hf_dir's transformers model (first_router_tie) and within 0.05 before it; then the same tokens at 25%
    of the experts and the minimum. Returns the number of tokens compared."""
    from moepage.engine.engine import Engine, EngineConfig

    engine = Engine.load(EngineConfig(str(gguf_path), dtype="float32"))
    ids, top_k = engine.tokenizer.encode(prompt), engine.args.top_k
    return check_paged_gguf(engine, str(gguf_path), ids, lambda seq: first_router_tie(str(hf_dir), seq, top_k),
                            min_tokens=min_tokens, lazy=True)


def tiny_q4_k_m(root, tokenizer_dir, families=("qwen3_moe", "qwen2_moe")) -> dict[str, str]:
    """{family: path} of a tiny random Q4_K_M GGUF per family under root, made with llama.cpp's converter and
    quantizer (qwen2_moe has a shared expert)."""
    llama_cpp_module()
    converter = find_converter(str(root))
    out = {}
    for family in families:
        hf = make_gguf_source(root / family, family, tokenizer_dir, seed=3)
        f16 = str(root / f"{family}-f16.gguf")
        convert(converter, [(hf, f16, "f16")])
        out[family] = quantize(f16, str(root / f"{family}-q4_k_m.gguf"), "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    return out
