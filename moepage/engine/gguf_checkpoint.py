"""Open a .gguf file (or a GGUF split directory) as a moepage Checkpoint.

Resident tensors are dequantized on read (and llama.cpp's q/k row permutation for the llama architecture is
undone); routed experts are paged from the 3-D `blk.N.ffn_*_exps` tensors, kept quantized when they are.

Shape legend: R rows, C columns, N heads, D head dim.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from moepage.engine.checkpoint import (
    MANIFEST, Checkpoint, check_shapes, manifest_resident, model_args_of, split_shard_path,
)
from moepage.engine.gguf_config import gguf_config
from moepage.engine.gguf_tokenizer import tokenizer_from_gguf
from moepage.engine.weight_names import resident_names, to_checkpoint
from moepage.kernels.ggml import QuantizedTensor
from moepage.kernels.ggml_linear import GGMLWeight
from moepage.paging.gguf_experts import GGUFExpertSource, GGUFSplitExpertSource
from moepage.paging.gguf_file import GGUFFile
from moepage.paging.tensor_rows import TensorRows

_QK = re.compile(r"^blk\.(\d+)\.attn_([qk])\.weight$")
ONE_ROW = re.compile(r"^blk\.\d+\.ffn_gate_inp_shexp\.weight$")  # HF shape [1, H]; GGUF may store [H]


def unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's LlamaModel.permute: w [N*D, C] with per-head rows (interleaved rotary
    pairs) -> HF's half-split rotary layout."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFCheckpoint(Checkpoint):
    gguf: GGUFFile | None = None
    metadata: dict = field(default_factory=dict)

    def resident_checkpoint_names(self) -> dict[str, str]:
        return {n: to_checkpoint(self.names, n) for n in resident_names(self.args)}

    def resident_tensor(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        """Quantized and 16-bit matrices stay as stored (GGMLWeight: dequantized just in time inside F.linear /
        F.embedding, llama.cpp's activation rounding); F32 tensors and vectors are plain tensors in `dtype`."""
        info = self.gguf.info(name, "resident weight")
        if info.type.name == "F32" or len(info.shape) != 2:
            return self.read_tensor(name).to(device=device, dtype=dtype)
        q = self.gguf.read_quantized(name, "resident weight")
        m = _QK.match(name)
        if self.config.get("gguf_architecture") == "llama" and m:
            heads = self.config["num_attention_heads"] if m.group(2) == "q" else self.config["num_key_value_heads"]
            rows = unpermute_qk(q.data.view(info.shape[0], -1), heads)  # whole rows move: GGML rows are whole blocks
            q = QuantizedTensor(rows.reshape(-1).contiguous(), q.type, q.shape, name)
        return GGMLWeight(q.to(device), dtype)

    def tensor_rows(self, name: str, dtype: torch.dtype, device) -> TensorRows | None:
        """A 2-D tensor read row by row (GGML rows are whole blocks), decoded as resident_tensor's would be: F32
        through the family's gguf_tensor, other types as GGMLWeight rows."""
        info = self.gguf.info(name, "resident weight")
        if len(info.shape) != 2 or (_QK.match(name) and self.config.get("gguf_architecture") == "llama"):
            return None
        fix = getattr(self.family, "gguf_tensor", None) if info.type.name == "F32" else None
        rows, cols = info.shape

        def decode(raw: torch.Tensor, n: int) -> torch.Tensor:  # [N, B] -> [N, C]
            q = QuantizedTensor(raw.reshape(-1), info.type, (n, cols), name)
            out = q.dequantize(torch.float32 if fix is not None else dtype)
            return fix(name, out) if fix is not None else out

        return TensorRows(self.gguf, name, info.start, (rows, cols), info.nbytes // rows, decode, dtype, device)

    def load_tokenizer(self):
        if "tokenizer.ggml.model" not in self.metadata:
            raise FileNotFoundError(f"{self.gguf.path}: the GGUF file has no tokenizer metadata")
        return tokenizer_from_gguf(self.metadata, self.gguf.path)

    @property
    def tokenizer_dir(self) -> str:
        return os.path.dirname(self.gguf.path)


def _reader(gguf: GGUFFile, config: dict, family=None):
    """checkpoint (GGUF) name -> float tensor in HF layout (the family's gguf_tensor undoes its converter's
    changes)."""
    llama = config.get("gguf_architecture") == "llama"
    fix = getattr(family, "gguf_tensor", None)

    def read_tensor(name: str) -> torch.Tensor:
        t = gguf.read(name, what="resident weight")
        m = _QK.match(name)
        if llama and m:
            heads = config["num_attention_heads"] if m.group(2) == "q" else config["num_key_value_heads"]
            t = unpermute_qk(t, heads)
        if ONE_ROW.match(name) and t.dim() == 1:
            t = t.unsqueeze(0)  # [1, H]
        return fix(name, t) if fix is not None else t

    return read_tensor


def _config_from(gguf: GGUFFile) -> dict:
    names = set(gguf.tensors)
    embed = gguf.info("token_embd.weight", "token embeddings")
    return gguf_config(gguf.metadata, names, vocab_size=embed.shape[0], path=gguf.path)


def open_gguf(path: str, drop_page_cache: bool = True, verify: bool = True) -> GGUFCheckpoint:
    gguf = GGUFFile(path, drop_page_cache=drop_page_cache)
    config = _config_from(gguf)
    family, args = model_args_of(config, f"{gguf.path} (GGUF metadata)")
    source = (family.gguf_expert_source or GGUFExpertSource)(gguf, dict(family.gguf_expert_names), args.moe_layers)
    ckpt = GGUFCheckpoint(
        kind="gguf", root=gguf.path, config=config, family=family, args=args, experts=source,
        names=dict(family.gguf_names), expert_names=dict(family.gguf_expert_names),
        read_tensor=_reader(gguf, config, family), tensor_nbytes=lambda n: gguf.info(n, "resident weight").nbytes,
        generation_config={}, tensor_shape=lambda n: gguf.info(n, "resident weight").shape,
        gguf=gguf, metadata=gguf.metadata,
    )
    check_shapes(ckpt)
    return ckpt


def open_gguf_split(root: str, manifest: dict, drop_page_cache: bool = True, verify: bool = True) -> GGUFCheckpoint:
    """A `moepage split` directory made from a GGUF file (manifest "source_format": "gguf"): a resident .gguf
    (all metadata + every tensor but the routed experts) and one shard per expert with its raw GGML bytes."""
    gguf = GGUFFile(manifest_resident(root, manifest, "resident.gguf"), drop_page_cache=False)
    config = manifest["config"] if "config" in manifest else _config_from(gguf)
    family, args = model_args_of(config, f"{os.path.join(root, MANIFEST)} (config)")
    hashes = {rel: meta["sha256"] for rel, meta in manifest["files"].items()}
    if os.path.lexists(os.path.join(root, "hub.json")):  # `serve --lazy`: experts come from the Hub on a miss
        from moepage.paging.hub_source import hub_expert_source

        source = hub_expert_source(root, manifest, split_shard_path, hashes, drop_page_cache,
                                   moe_layers=args.moe_layers)
    else:
        source = GGUFSplitExpertSource(root, split_shard_path, hashes, args.moe_layers, drop_page_cache, verify)
    ckpt = GGUFCheckpoint(
        kind="split", root=root, config=config, family=family, args=args, experts=source,
        names=dict(family.gguf_names), expert_names=dict(family.gguf_expert_names),
        read_tensor=_reader(gguf, config, family), tensor_nbytes=lambda n: gguf.info(n, "resident weight").nbytes,
        generation_config={}, tensor_shape=lambda n: gguf.info(n, "resident weight").shape,
        gguf=gguf, metadata=gguf.metadata,
    )
    check_shapes(ckpt)
    return ckpt
