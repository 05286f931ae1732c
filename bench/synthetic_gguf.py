"""A full-shape synthetic GGUF written directly: random but valid GGML blocks, the real tensor names, shapes and
metadata of a published MoE, and the real Qwen2 vocabulary (llama.cpp's models/ggml-vocab-qwen2.gguf).

    python bench/synthetic_gguf.py OUT.gguf --vocab-gguf ggml-vocab-qwen2.gguf [--shape qwen3-30b-a3b]
        [--quant Q4_K_M | --quant Q8_0 ...] [--routing uniform|skewed] [--seed 0]
    python bench/synthetic_gguf.py OUT.gguf --patch-routing skewed   # rewrite only the routers, in place

No bf16 intermediate: every tensor's bytes come from numpy's generator, block by block, and are written with
large buffered writes (17 GB in minutes). Each block's f16 scales are set so the dequantized values have a sane
spread (activations stay finite), and where a type has per-sub-block mins each min equals its scale, so every
sub-block is centred on zero (a random min would give each 32-value group a random mean, which a constant input
direction turns into huge activations); the rest of the block is random bits, which every GGML type accepts.

--quant Q4_K_M assigns types as llama.cpp's quantizer does for qwen3moe (llama-quant.cpp,
llama_tensor_get_type_impl): Q4_K by default, Q6_K for output.weight and for attn_v / ffn_down(_exps) of the
"use_more_bits" layers (the first and last eighth and every third between), F32 norms and routers. Any other
--quant NAME puts every weight matrix in that type (what the CI test uses, one file per type).

Routing: with random routers every expert is equally popular, the worst case for a cache. --routing skewed gives
each layer a Zipf-like popularity: the first CHANNEL values of every token embedding form a constant positive
channel (their rows of attn_output and ffn_down are zero, so no layer writes into it), and router row e gets a
weight on that channel that adds `-zipf * ln(rank_e)` to its logit (rank: a per-layer permutation). Neighbouring
tokens share experts through attention, whose output (a mix of the prefix's values) moves slowly along the
sequence; the bench reports the overlap it gives.

Shape legend: E experts, I expert FFN width, H hidden, V vocabulary, R rows, C columns.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

CHANNEL = 32  # width of the constant channel (one Q4_K sub-block)
EMBED_STD = 0.02  # spread of a token embedding value
GROWTH = 0.12  # rms each attention / expert output adds to the residual, relative to EMBED_STD


@dataclass(frozen=True)
class Shape:
    arch: str
    layers: int
    experts: int
    top_k: int
    hidden: int
    expert_ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int = 40960
    rope_theta: float = 1e6
    name: str = ""


SHAPES = {
    # Qwen/Qwen3-30B-A3B config.json
    "qwen3-30b-a3b": Shape("qwen3moe", 48, 128, 8, 2048, 768, 32, 4, 128, name="Qwen3-30B-A3B (synthetic)"),
    # two layers, CI-sized, K-quant friendly widths
    "tiny": Shape("qwen3moe", 2, 8, 2, 256, 256, 4, 2, 64, context=4096, name="tiny qwen3moe (synthetic)"),
}


# ---- block layouts -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where a GGML block's f16 scales lie and how big its quants are (ggml-common.h)."""

    block: int  # values per block
    nbytes: int  # bytes per block
    d: int  # byte offset of the f16 scale d (-1: none)
    spread: float  # std of a value in units of d, with random sub-scales and quants
    dmin: int = -1  # byte offset of the f16 min (types with d*q - dmin*m), -1: none
    min_ratio: float = 0.0  # dmin = min_ratio * d centres the values
    small_scales: tuple[int, int] = (0, 0)  # int8 sub-scales in [lo, hi) bytes, kept in [-16, 16]
    mins: str = ""  # "k4": Q4_K/Q5_K 12-byte scales at 4..16, "k2": Q2_K nibble pairs at 0..16: each min = its scale


LAYOUTS = {
    "Q4_0": Layout(32, 18, 0, 4.6),
    "Q4_1": Layout(32, 20, 0, 4.6, dmin=2, min_ratio=-7.5),  # value d*q + m
    "Q5_0": Layout(32, 22, 0, 9.2),
    "Q5_1": Layout(32, 24, 0, 9.2, dmin=2, min_ratio=-15.5),
    "Q8_0": Layout(32, 34, 0, 74.0),
    "Q2_K": Layout(256, 84, 80, 9.8, dmin=82, min_ratio=1.5, mins="k2"),
    "Q3_K": Layout(256, 110, 108, 40.0),
    "Q4_K": Layout(256, 144, 0, 168.0, dmin=2, min_ratio=7.5, mins="k4"),
    "Q5_K": Layout(256, 176, 0, 336.0, dmin=2, min_ratio=15.5, mins="k4"),
    "Q6_K": Layout(256, 210, 208, 175.0, small_scales=(192, 208)),
    "IQ4_NL": Layout(32, 18, 0, 70.0),
    "IQ4_XS": Layout(256, 136, 0, 1260.0),
}
FLOATS = {"F32": np.float32, "F16": np.float16}


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def random_rows(rng: np.random.Generator, type_name: str, rows: int, cols: int, std: float) -> np.ndarray:
    """rows x cols values of type_name with about `std` spread, as the raw GGML bytes [rows, row_bytes]."""
    if type_name in FLOATS:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(FLOATS[type_name]).view(np.uint8)
    if type_name == "BF16":
        f = rng.standard_normal((rows, cols), dtype=np.float32) * std
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, -1)
    lay = LAYOUTS[type_name]
    if cols % lay.block:
        raise ValueError(f"{type_name}: rows of {cols} values are not whole blocks of {lay.block}")
    n = rows * (cols // lay.block)
    blocks = np.frombuffer(bytearray(rng.bytes(n * lay.nbytes)), np.uint8).reshape(n, lay.nbytes)
    d = np.float32(std / lay.spread) * rng.uniform(0.75, 1.25, size=n).astype(np.float32)
    blocks[:, lay.d:lay.d + 2] = _f16_bytes(d)
    if lay.dmin >= 0:
        blocks[:, lay.dmin:lay.dmin + 2] = _f16_bytes(d * np.float32(lay.min_ratio))
    if lay.mins == "k4":  # scales j<4: bytes 4+j (6 bits) and their mins bytes 8+j; j>=4: nibbles of 12+j-4
        blocks[:, 8:12] = blocks[:, 4:8]
        low = blocks[:, 12:16] & 0x0F
        blocks[:, 12:16] = low | (low << 4)
    elif lay.mins == "k2":
        low = blocks[:, 0:16] & 0x0F
        blocks[:, 0:16] = low | (low << 4)
    lo, hi = lay.small_scales
    if hi:
        blocks[:, lo:hi] = (rng.integers(-16, 17, size=(n, hi - lo), dtype=np.int8)).view(np.uint8)
    return blocks.reshape(rows, -1)


def row_bytes(type_name: str, cols: int) -> int:
    if type_name in FLOATS or type_name == "BF16":
        return cols * (4 if type_name == "F32" else 2)
    lay = LAYOUTS[type_name]
    return cols // lay.block * lay.nbytes


# ---- the tensor plan ----------------------------------------------------------------------------------
def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first
    type: str
    std: float
    layer: int = -1
    role: str = ""  # "embd", "out_proj" (rows 0..CHANNEL-1 zeroed for the channel), "router", "norm"


def type_for(quant: str, role: str, layer: int, layers: int) -> str:
    if role in ("norm", "router"):
        return "F32"
    if quant != "Q4_K_M":
        return quant
    if role == "output":
        return "Q6_K"
    if role in ("attn_v", "ffn_down") and use_more_bits(layer, layers):
        return "Q6_K"
    return "Q4_K"


def plan(s: Shape, vocab: int, quant: str) -> list[TensorPlan]:
    H, I, E, D = s.hidden, s.expert_ffn, s.experts, s.head_dim
    q_rows, kv_rows = s.heads * D, s.kv_heads * D
    t = lambda name, shape, role, std, layer=-1: TensorPlan(  # noqa: E731
        name, shape, type_for(quant, role, layer, s.layers), std, layer, role)
    out = [t("token_embd.weight", (vocab, H), "embd", EMBED_STD)]
    for L in range(s.layers):
        b = f"blk.{L}."
        out += [
            t(b + "attn_norm.weight", (H,), "norm", 0.0, L),
            t(b + "attn_q.weight", (q_rows, H), "attn_q", 1 / math.sqrt(H), L),
            t(b + "attn_k.weight", (kv_rows, H), "attn_k", 1 / math.sqrt(H), L),
            t(b + "attn_v.weight", (kv_rows, H), "attn_v", 1 / math.sqrt(H), L),
            t(b + "attn_output.weight", (H, q_rows), "out_proj", GROWTH * EMBED_STD / (0.7 * math.sqrt(q_rows)), L),
            t(b + "attn_q_norm.weight", (D,), "norm", 0.0, L),
            t(b + "attn_k_norm.weight", (D,), "norm", 0.0, L),
            t(b + "ffn_norm.weight", (H,), "norm", 0.0, L),
            t(b + "ffn_gate_inp.weight", (E, H), "router", 1 / math.sqrt(H), L),
            t(b + "ffn_gate_exps.weight", (E, I, H), "ffn_gate", 1 / math.sqrt(H), L),
            t(b + "ffn_up_exps.weight", (E, I, H), "ffn_up", 1 / math.sqrt(H), L),
            # silu(gate) * up has rms ~0.6; k experts mixed with weights summing to 1: ~0.4 of one
            t(b + "ffn_down_exps.weight", (E, H, I), "ffn_down", GROWTH * EMBED_STD / (0.24 * math.sqrt(I)), L),
        ]
    out += [t("output_norm.weight", (H,), "norm", 0.0), t("output.weight", (vocab, H), "output", 1 / math.sqrt(H))]
    return out


def nbytes_of(p: TensorPlan) -> int:
    rows = int(np.prod(p.shape[:-1])) if len(p.shape) > 1 else 1
    return rows * row_bytes(p.type, p.shape[-1])


# ---- routing -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Routing:
    kind: str = "uniform"  # or "skewed"
    zipf: float = 0.6  # logit bias -zipf * ln(rank)
    seed: int = 0


def channel_value(embd_type: str) -> float:
    """The constant channel's value in every embedding row: Q4_K sub-block 0 with scale 63, min 0, quants 15."""
    return 945.0 * EMBED_STD / LAYOUTS[embd_type].spread if embd_type == "Q4_K" else 0.0


def router_rows(p: TensorPlan, s: Shape, routing: Routing, channel: float) -> np.ndarray:
    """[E, H] float32 router of layer p.layer: random rows, plus the Zipf bias on the channel when skewed."""
    rng = np.random.default_rng([routing.seed, 7, p.layer])
    w = rng.standard_normal(p.shape, dtype=np.float32) * np.float32(p.std)
    if channel:
        w[:, :CHANNEL] = 0  # uniform: the channel adds no bias
    if routing.kind == "skewed":
        if not channel:
            raise SystemExit("--routing skewed needs the constant channel: --quant Q4_K_M (a Q4_K token_embd)")
        rank = rng.permutation(s.experts) + 1
        bias = -routing.zipf * np.log(rank).astype(np.float32)
        # the router sees x / rms(x): CHANNEL values `channel` and H - CHANNEL values whose spread grows by
        # GROWTH * EMBED_STD per attention and per expert output (2L + 1 of them before layer L's router)
        other = EMBED_STD ** 2 * (1 + (2 * p.layer + 1) * GROWTH ** 2)
        rms = math.sqrt((CHANNEL * channel ** 2 + (s.hidden - CHANNEL) * other) / s.hidden)
        w[:, :CHANNEL] = (bias / (CHANNEL * channel / rms))[:, None]
    return w


def craft_channel(raw: np.ndarray) -> None:
    """Q4_K rows [R, row_bytes]: sub-block 0 of each row's first block becomes the constant channel."""
    blk = raw[:, :144]
    d = np.full(len(blk), EMBED_STD / LAYOUTS["Q4_K"].spread, np.float32)
    blk[:, 2:4] = _f16_bytes(d * np.float32(LAYOUTS["Q4_K"].min_ratio))
    blk[:, 0:2] = _f16_bytes(d)
    blk[:, 4] = 63  # scales[0] & 63: sub-block 0's scale
    blk[:, 8] = 0  # scales[4] & 63: sub-block 0's min
    blk[:, 16:48] |= 0x0F  # qs[0:32] low nibbles: sub-block 0's quants


# ---- writing -------------------------------------------------------------------------------------------
def tensor_bytes(p: TensorPlan, s: Shape, rng: np.random.Generator, routing: Routing, channel: float):
    """Yield the raw bytes of tensor p in chunks of whole rows (at most ~64 MB each)."""
    if p.role == "norm":
        yield np.ones(p.shape, np.float32).view(np.uint8)
        return
    if p.role == "router":
        yield router_rows(p, s, routing, channel).view(np.uint8)
        return
    cols = p.shape[-1]
    outer = p.shape[0] if len(p.shape) == 3 else 1
    rows = p.shape[-2]
    step = max(1, min(rows, (64 << 20) // max(1, row_bytes(p.type, cols))))
    for _ in range(outer):
        for r0 in range(0, rows, step):
            raw = random_rows(rng, p.type, min(step, rows - r0), cols, p.std)
            if channel and p.role == "embd":
                craft_channel(raw)
            if channel and p.role in ("out_proj", "ffn_down") and r0 < CHANNEL:
                raw[: CHANNEL - r0] = 0  # nothing writes into the channel
            yield raw


def write_gguf(out: str, s: Shape, quant: str, vocab_gguf: str, routing: Routing, seed: int = 0,
               progress: bool = True) -> dict:
    import gguf

    from moepage.paging.gguf_file import GGUFFile

    vocab = GGUFFile(vocab_gguf)
    n_vocab = len(vocab.metadata["tokenizer.ggml.tokens"])
    tensors = plan(s, n_vocab, quant)
    channel = channel_value(next(p.type for p in tensors if p.role == "embd"))
    w = gguf.GGUFWriter(out, s.arch)
    w.add_name(s.name)
    w.add_block_count(s.layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.expert_ffn * s.top_k)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(s.experts)
    w.add_expert_used_count(s.top_k)
    w.add_expert_feed_forward_length(s.expert_ffn)
    ftype = {"Q4_K_M": 15, "F32": 0, "F16": 1, "BF16": 32}.get(quant)
    if ftype is not None:
        w.add_file_type(ftype)
    for key, value in vocab.metadata.items():
        if key.startswith("tokenizer."):
            kind, sub = vocab.field_types[key]
            w.add_key_value(key, value, gguf.GGUFValueType(kind),
                            sub_type=gguf.GGUFValueType(sub) if sub is not None else None)
    vocab.close()
    for p in tensors:
        n = nbytes_of(p)
        byte_shape = (*p.shape[:-1], row_bytes(p.type, p.shape[-1]))  # gguf-py takes quantized shapes in bytes
        w.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), n, raw_dtype=gguf.GGMLQuantizationType[p.type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    total = sum(nbytes_of(p) for p in tensors)
    done, t0 = 0, time.time()
    rng = np.random.default_rng(seed)
    for p in tensors:
        w.write_padding(fout, fout.tell())
        for chunk in tensor_bytes(p, s, rng, routing, channel):
            fout.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            done += chunk.nbytes
        w.write_padding(fout, nbytes_of(p))
        if progress:
            rate = done / max(time.time() - t0, 1e-6)
            print(f"\r{done / 2**30:6.2f} / {total / 2**30:.2f} GiB  {rate / 2**20:5.0f} MiB/s  {p.name:32s}",
                  end="", file=sys.stderr, flush=True)
    w.close()
    if progress:
        print(file=sys.stderr)
    return {"out": out, "bytes": os.path.getsize(out), "tensors": len(tensors), "seconds": time.time() - t0,
            "channel": channel}


def patch_routing(path: str, routing: Routing) -> int:
    """Rewrite the F32 routers of an existing synthetic file in place (uniform <-> skewed); returns layers patched."""
    from moepage.paging.gguf_file import GGUFFile

    f = GGUFFile(path)
    md = f.metadata
    arch = md["general.architecture"]
    s = Shape(arch, md[f"{arch}.block_count"], md[f"{arch}.expert_count"], md[f"{arch}.expert_used_count"],
              md[f"{arch}.embedding_length"], md[f"{arch}.expert_feed_forward_length"],
              md[f"{arch}.attention.head_count"], md[f"{arch}.attention.head_count_kv"],
              md[f"{arch}.attention.key_length"])
    channel = channel_value(f.info("token_embd.weight").type.name)
    spots = []
    for L in range(s.layers):
        info = f.info(f"blk.{L}.ffn_gate_inp.weight")
        p = TensorPlan(info.name, info.shape, "F32", 1 / math.sqrt(s.hidden), L, "router")
        spots.append((info.start, router_rows(p, s, routing, channel)))
    f.close()
    with open(path, "r+b") as out:
        for start, rows in spots:
            out.seek(start)
            out.write(rows.tobytes())
    return len(spots)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--quant", default="Q4_K_M", help="Q4_K_M (llama.cpp's mix) or one type for every matrix: "
                    + ", ".join(sorted([*LAYOUTS, *FLOATS, "BF16"])))
    ap.add_argument("--vocab-gguf", help="llama.cpp's models/ggml-vocab-qwen2.gguf")
    ap.add_argument("--routing", default="uniform", choices=("uniform", "skewed"))
    ap.add_argument("--zipf", type=float, default=Routing.zipf)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch-routing", choices=("uniform", "skewed"), help="only rewrite OUT's routers, in place")
    a = ap.parse_args(argv)
    if a.patch_routing:
        n = patch_routing(a.out, Routing(a.patch_routing, a.zipf, a.seed))
        print(f"{a.out}: {n} routers rewritten ({a.patch_routing})")
        return
    if not a.vocab_gguf:
        ap.error("--vocab-gguf is required")
    if a.quant != "Q4_K_M" and a.quant not in LAYOUTS and a.quant not in FLOATS and a.quant != "BF16":
        ap.error(f"unknown --quant {a.quant}")
    print(write_gguf(a.out, SHAPES[a.shape], a.quant, a.vocab_gguf, Routing(a.routing, a.zipf, a.seed), a.seed))


if __name__ == "__main__":
    main()
