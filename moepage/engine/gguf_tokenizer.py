"""A `tokenizers.Tokenizer` (and moepage Tokenizer) built from GGUF tokenizer metadata, without transformers.

Supported: `tokenizer.ggml.model == "gpt2"` (byte-level BPE: GPT-2, Qwen2/Qwen3, Llama 3, OLMo vocabularies)
with the pre-tokenizer named by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp defines them; "gemma4"
(SentencePiece-style BPE: spaces as U+2581, bytes outside the vocabulary as <0xNN> tokens).
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from moepage.engine.tokenizer import Tokenizer
from moepage.paging.safetensors_file import CheckpointError, shown

# GGUF token types (llama.cpp llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex applied before byte-level encoding (None: GPT-2's own regex)
PRE_SPLITS = {
    "default": None, "gpt-2": None, "gpt2": None, "olmo": None, "starcoder": None, "refact": None,
    "qwen2": QWEN2_SPLIT, "qwen35": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT,
    "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT, "dbrx": LLAMA3_SPLIT,
}
IGNORE_MERGES = {"llama-bpe", "llama3"}  # llama.cpp uses whole-word vocab hits first for these


def _pre_tokenizer(pre: str, path: str):
    if pre not in PRE_SPLITS:
        raise CheckpointError(
            f"{path}: GGUF pre-tokenizer {shown(pre)} is not supported yet (supported: {', '.join(sorted(PRE_SPLITS))})"
        )
    split = PRE_SPLITS[pre]
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _strings(meta: dict, key: str, path: str) -> list[str]:
    value = meta.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{path}: GGUF metadata {key} must be a list of strings")
    return value


def build_hf_tokenizer(meta: dict, path: str = "?") -> HFTokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model not in ("gpt2", "gemma4"):
        raise CheckpointError(
            f"{path}: GGUF tokenizer model {shown(model)} is not supported yet (moepage builds 'gpt2' byte-level BPE "
            f"and 'gemma4' tokenizers from GGUF); serve the original Hugging Face directory instead"
        )
    tokens = _strings(meta, "tokenizer.ggml.tokens", path)
    merges = _strings(meta, "tokenizer.ggml.merges", path)
    if not tokens:
        raise CheckpointError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens):
        raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.token_type must list one type per token")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str):
        raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.pre must be a string")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise CheckpointError(f"{path}: GGUF metadata tokenizer.ggml.merges: every merge must be two tokens")
    try:
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=model == "gemma4",
                                    ignore_merges=pre in IGNORE_MERGES))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # tokenizers raises Exception, or pyo3's PanicException (a BaseException), on odd input
        raise CheckpointError(f"{path}: the GGUF tokenizer metadata does not make a BPE tokenizer "
                              f"(merges name tokens outside tokenizer.ggml.tokens?)") from None
    if model == "gemma4":
        tk.normalizer = normalizers.Replace(" ", "\u2581")
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tk.pre_tokenizer = _pre_tokenizer(pre, path)
        tk.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    return tk


def tokenizer_from_gguf(meta: dict, path: str = "?") -> Tokenizer:
    """moepage Tokenizer (with the chat template from tokenizer.chat_template) from GGUF metadata."""
    tk = build_hf_tokenizer(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{path}: GGUF metadata tokenizer.chat_template must be a string")

    def token(key: str):
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens) else None

    config = {
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    }
    return Tokenizer(tk, config, template, f"{path}: GGUF tokenizer.chat_template")
