"""FP8 checkpoints (config.json `quantization_config.quant_method: "fp8"`, as DeepSeek-V3, Kimi K2 and the GLM FP8
repositories publish them): which weights are FP8, the routed experts read as their FP8 bytes plus block scales
(kernels/fp8.py multiplies on them), the resident FP8 weights dequantized once as they are read.

A weight is FP8 when its tensor is F8_E4M3 and `<name>_scale_inv` (float32 [ceil(R / br), ceil(C / bc)]) sits
next to it; weight_block_size [br, bc] comes from the config. Family-agnostic: the expert names come from the
family's table, so every family with per-expert tensors (glm4_moe, deepseek_v3, kimi_k25 ...) reads the same way.

Shape legend: I expert intermediate size, H hidden size, br x bc a scale block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moepage.kernels.fp8 import MAX_BLOCK, Fp8Tensor, dequantize_reference, scale_grid
from moepage.paging.safetensors_file import CheckpointError
from moepage.paging.sources import (
    SafetensorsExpertSource, Shapes, SplitExpertSource, TensorIndex, check_shape, check_unchanged, paging_in,
    read_parts,
)

SCALE_SUFFIX = "_scale_inv"
PARTS = ("gate", "up", "down")


@dataclass(frozen=True)
class Fp8Quantization:
    block: tuple[int, int]  # weight_block_size [br, bc]


def fp8_quantization(config: dict, where: str = "config.json") -> Fp8Quantization | None:
    """The FP8 scheme of a config (None without a quantization_config or for another quant_method); a config that
    says fp8 in a form moepage does not read is refused naming the key."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        return None
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"{where}: quantization_config.fmt must be 'e4m3' (float8_e4m3fn), not "
                              f"{fmt if isinstance(fmt, str) and len(fmt) < 32 else 'that'}")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and not isinstance(b, bool)
                                                                and 1 <= b <= MAX_BLOCK for b in block)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two block sides from 1 to "
                              f"{MAX_BLOCK} (per-tensor or per-channel FP8 is not read)")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(f"{where}: quantization_config.activation_scheme must be 'dynamic' (static activation "
                              f"scales are not read)")
    return Fp8Quantization((block[0], block[1]))


def is_fp8(index: TensorIndex, name: str) -> bool:
    return index.has(name) and index.info(name, "weight").dtype == torch.float8_e4m3fn


def _scales_of(index: TensorIndex, name: str, shape, block: tuple[int, int], what: str):
    """The scale_inv tensor info of FP8 weight `name`, checked: present, float32, the block grid of `shape`."""
    f = index.file_of(name + SCALE_SUFFIX, f"{what} scales")
    return _check_scales(f, name, shape, block, what)


def _check_scales(f, name: str, shape, block: tuple[int, int], what: str):
    scale = name + SCALE_SUFFIX
    info = f.tensors.get(scale)
    if info is None:
        raise CheckpointError(f"{f.path}: tensor {scale!r} ({what} scales) is missing")
    if info.dtype != torch.float32:
        raise CheckpointError(f"{f.path}: tensor {scale!r} is {info.dtype}, not float32")
    check_shape(f.path, scale, info.shape, scale_grid(tuple(shape), block), f"{what} scales")
    return info


def _check_part(f, name: str, want, what: str):
    """An expert part in file f: F8_E4M3 of the shape the config implies (when known)."""
    info = f.tensors.get(name)
    if info is None:
        raise CheckpointError(f"{f.path}: tensor {name!r} ({what}) is missing")
    if want is not None:
        check_shape(f.path, name, info.shape, want, what)
    if info.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"{f.path}: tensor {name!r} is {info.dtype}; an FP8 checkpoint's routed experts must "
                              f"be float8_e4m3fn")


def read_resident(index: TensorIndex, name: str, fp8: Fp8Quantization) -> torch.Tensor:
    """A resident weight; an FP8 one dequantized to float32 (fp8 * scale, transformers' values; the caller casts
    once more to the model dtype, as transformers' loader does)."""
    t = index.read(name, "resident weight")
    if t.dtype != torch.float8_e4m3fn:
        return t
    if t.dim() != 2:
        raise CheckpointError(f"{index.file_of(name, 'resident weight').path}: FP8 tensor {name!r} is not a matrix")
    _scales_of(index, name, t.shape, fp8.block, "resident weight")
    return dequantize_reference(t, index.read(name + SCALE_SUFFIX, "resident weight scales"), fp8.block)


@dataclass
class Fp8ExpertWeights:
    """One routed expert as stored: gate [I, H], up [I, H], down [H, I] FP8 with their scales."""

    gate: Fp8Tensor
    up: Fp8Tensor
    down: Fp8Tensor

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


class Fp8ExpertSource(SafetensorsExpertSource):
    """Routed experts of an FP8 checkpoint, each part one read of its bytes and one of its scales (parts that lie
    back to back, as save_pretrained writes them, come in one read)."""

    reads_into = False

    def __init__(self, index: TensorIndex, expert_table: dict[str, str], fp8: Fp8Quantization):
        super().__init__(index, expert_table)
        self.fp8 = fp8

    def _names(self, layer: int, expert: int) -> dict[str, str]:
        names = self.names(layer, expert)
        return {**names, **{p + "_scale": names[p] + SCALE_SUFFIX for p in PARTS}}

    def expect(self, shapes: Shapes, layers: list[int], num_experts: int):
        """Every expert part checked from the headers now: F8_E4M3 of the implied shape, its float32 scale grid."""
        self.expected = shapes
        for layer in layers:
            for e in range(num_experts):
                for p, n in self.names(layer, e).items():
                    what = f"layer {layer} expert {e} {p}"
                    f = self.index.file_of(n, what)
                    _check_part(f, n, shapes[p], what)
                    _scales_of(self.index, n, f.tensors[n].shape, self.fp8.block, what)

    def read(self, layer: int, expert: int, into: torch.Tensor | None = None) -> Fp8ExpertWeights:
        with paging_in(layer, expert):
            names = self._names(layer, expert)
            files = {p: self.index.file_of(n, f"layer {layer} expert {expert} {p}") for p, n in names.items()}
            for f in {id(f): f for f in files.values()}.values():
                check_unchanged(f, f"layer {layer} expert {expert}")
            t = read_parts(files, names)
            return Fp8ExpertWeights(*(Fp8Tensor(t[p], t[p + "_scale"], tuple(t[p].shape), self.fp8.block,
                                                names[p]) for p in PARTS))

    def stored_nbytes(self, layer: int) -> int:
        return sum(self.index.info(n, "expert").nbytes for n in self._names(layer, 0).values())

    def describe(self) -> str:
        return f"safetensors FP8 {self.fp8.block[0]}x{self.fp8.block[1]} blocks ({len(self.index.files)} files)"


class Fp8SplitExpertSource(SplitExpertSource):
    """The experts of a `moepage split` of an FP8 checkpoint: each shard holds gate, up, down as F8_E4M3 and their
    `_scale_inv` tensors (sha256-checked at first open, as every split shard)."""

    reads_into = False

    def __init__(self, root: str, shard_path, expert_table: dict[str, str], hashes: dict[str, str],
                 fp8: Fp8Quantization, drop_page_cache: bool = True, verify: bool = True):
        super().__init__(root, shard_path, expert_table, hashes, drop_page_cache, verify)
        self.fp8 = fp8

    def read(self, layer: int, expert: int, into: torch.Tensor | None = None) -> Fp8ExpertWeights:
        with paging_in(layer, expert):
            f = self._open(layer, expert)
            try:
                names = {p: t.format(L=layer, E=expert) for p, t in self.table.items()}
                for p in PARTS:
                    what = f"layer {layer} expert {expert} {p}"
                    _check_part(f, names[p], None if self.expected is None else self.expected[p], what)
                    _check_scales(f, names[p], f.tensors[names[p]].shape, self.fp8.block, what)
                names |= {p + "_scale": names[p] + SCALE_SUFFIX for p in PARTS}
                t = read_parts({p: f for p in names}, names)
                return Fp8ExpertWeights(*(Fp8Tensor(t[p], t[p + "_scale"], tuple(t[p].shape), self.fp8.block,
                                                    names[p]) for p in PARTS))
            finally:
                f.close()

    def describe(self) -> str:
        return f"split FP8 shards in {self.root}"


FP8_SOURCES = (Fp8ExpertSource, Fp8SplitExpertSource)


def split_tensors(w: Fp8ExpertWeights, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """One expert's shard tensors for `moepage split`: each part's F8_E4M3 values and float32 scales as stored."""
    out = {}
    for p in PARTS:
        part = getattr(w, p)
        out[names[p]] = part.data.view(part.shape).view(torch.float8_e4m3fn).contiguous()
        out[names[p] + SCALE_SUFFIX] = part.scales.contiguous()
    return out
