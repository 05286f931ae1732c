"""The bytes the resident weights will take, known from file headers before any of them is read, so a budget that
cannot hold them is refused at start-up instead of after loading them (the engine and `moepage inspect` both use
this, so they state the same resident bytes, bytes per expert and minimum budget)."""
from __future__ import annotations

import torch

from moepage.engine.attention import mixer_class
from moepage.engine.checkpoint import Checkpoint
from moepage.engine.model_args import ModelArgs
from moepage.engine.weight_names import resident_dtype


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def resident_nbytes(ckpt: Checkpoint, name: str, dtype: torch.dtype) -> int:
    """Bytes the engine holds for resident tensor `name` (Checkpoint.resident_tensor's result): GGUF matrices stay
    as stored (quantized or 16-bit), GGUF F32 tensors and vectors and every safetensors tensor become `dtype`."""
    size = torch.empty(0, dtype=dtype).element_size()
    gguf = getattr(ckpt, "gguf", None)
    if gguf is not None:
        info = gguf.info(name, "resident weight")
        if info.type.name == "F32" or len(info.shape) != 2:
            return _numel(info.shape) * size
        return info.nbytes
    if ckpt.tensor_numel is not None:
        return ckpt.tensor_numel(name) * size
    if ckpt.tensor_shape is not None:
        return _numel(ckpt.tensor_shape(name)) * size
    return ckpt.tensor_nbytes(name) // 2 * size  # 16-bit files


def packed_nbytes(rows: int, cols: int) -> int:
    """The lossless 12-bit lm_head (PackedMatrix): 1.5 bytes a value, an 8-byte row offset, a 16-byte table per
    block of 4096 rows (escapes, a few hundredths of 1%, are counted when it is built)."""
    return rows * cols * 3 // 2 + (rows + 1) * 8 + -(-rows // 4096) * 16


def planned_resident_bytes(ckpt: Checkpoint, names: dict[str, str], dtype: torch.dtype, embed_on_disk: bool,
                           packed_head: bool) -> int:
    """Resident bytes for the canonical -> checkpoint `names`, without the embedding table when it is read from
    disk row by row and with the lm_head in its 12-bit form when it is packed."""
    total = 0
    for canonical, name in names.items():
        if canonical == "embed" and embed_on_disk:
            continue
        if canonical == "lm_head" and packed_head:
            shape = ckpt.tensor_shape(name) if ckpt.tensor_shape else (ckpt.args.vocab_size, ckpt.args.hidden_size)
            total += packed_nbytes(shape[0], _numel(shape[1:]))
            continue
        total += resident_nbytes(ckpt, name, resident_dtype(ckpt.args, canonical, dtype))
    return total


def prefill_workspace_bytes(args: ModelArgs, tokens: int, positions: int, dtype: torch.dtype) -> int:
    """The temporaries a prefill chunk of `tokens` tokens allocates in the model's hungriest token mixer (attending
    up to `positions` positions): kept out of the expert cache, so a chunk runs inside the budget."""
    return max((mixer_class(kind).workspace_nbytes(args, tokens, positions, dtype) for kind in set(args.mixers)),
               default=0)
