"""ggml's own CPU kernels for GGML weights: csrc/ggml_cpu.cpp calls `from_float` and `vec_dot` of a prebuilt
libggml-cpu (the `libggml-python` wheel: AVX2 x86-64, aarch64 NEON, macOS arm64), so a quantized matvec has
llama.cpp's numerics and SIMD on every CPU that wheel exists for.

`backend()` is None where the library, the C++ build or the CPU path is unavailable (or MOEPAGE_KERNELS=torch);
callers then dequantize with torch. MOEPAGE_GGML_LIB names another libggml-cpu shared library to use instead
(e.g. the one inside llama-cpp-python, built for this machine).
"""
from __future__ import annotations

import logging
import os
import threading

import torch

from moepage.kernels import native

log = logging.getLogger("moepage.kernels")
LIBRARY_NAMES = ("libggml-cpu.so", "libggml-cpu.dylib")


def library_path() -> str | None:
    """The libggml-cpu shared library to open: $MOEPAGE_GGML_LIB, else the one in the libggml-python wheel."""
    env = os.environ.get("MOEPAGE_GGML_LIB")
    if env:
        return env
    try:
        import libggml
    except ImportError:
        return None
    root = os.path.dirname(libggml.__file__)
    for sub in ("lib64", "lib"):
        for name in LIBRARY_NAMES:
            path = os.path.join(root, sub, name)
            if os.path.exists(path):
                return path
    return None


class GGMLBackend:
    """The opened library: which types it multiplies, and the kernels (all on CPU tensors)."""

    def __init__(self, module, path: str, features: str):
        self.module = module
        self.path = path
        self.features = features
        self._info: dict[int, tuple[int, int, int, bool]] = {}

    def type_info(self, type_id: int) -> tuple[int, int, int, bool]:
        """(values per block, bytes per block, activation type id, has a CPU dot product)."""
        if type_id not in self._info:
            self._info[type_id] = tuple(self.module.type_info(type_id))
        return self._info[type_id]

    def multiplies(self, type_id: int) -> bool:
        return self.type_info(type_id)[3]

    def dequantizes(self, type_id: int) -> bool:
        return self.type_info(type_id)[0] > 0

    def activation_block(self, type_id: int) -> int:
        """Values per block of the activation type a weight of type_id is multiplied with."""
        return self.type_info(self.type_info(type_id)[2])[0]

    def dequantize(self, raw: torch.Tensor, type_id: int, rows: int, cols: int) -> torch.Tensor:
        return self.module.dequantize(raw, type_id, rows, cols)

    def linear(self, x: torch.Tensor, raw: torch.Tensor, type_id: int, rows: int) -> torch.Tensor:
        return self.module.linear(x, raw, type_id, rows)

    def interleaves(self, type_id: int) -> bool:
        """Whether type_id has ggml's 8-row interleaved layout with a faster kernel on this CPU."""
        return self.module.interleaves(type_id)

    def relayout_(self, raw: torch.Tensor, type_id: int, rows: int, cols: int, interleave: bool = True) -> None:
        """raw (GGML bytes [rows, cols]) into (interleave) or out of the 8-row interleaved layout, in place."""
        self.module.relayout_(raw, type_id, rows, cols, interleave)

    def quantize_rows(self, x: torch.Tensor, type_id: int) -> torch.Tensor:
        return self.module.quantize_rows(x, type_id)

    def experts_one_token(self, x, gates, ups, downs, types: tuple[int, int, int], width: int, weights: list[float],
                          residual):
        return self.module.experts_one_token(x, gates, ups, downs, *types, width, weights, residual)


_lock = threading.Lock()
_backend: list = []  # [GGMLBackend | None] once decided


def backend() -> GGMLBackend | None:
    if _backend:
        return _backend[0]
    with _lock:
        if not _backend:
            _backend.append(_open())
        return _backend[0]


def _open() -> GGMLBackend | None:
    path = library_path()
    if path is None:
        if os.environ.get("MOEPAGE_KERNELS", "auto") != "torch":
            log.warning("libggml-python is not installed: GGML weights are dequantized with torch (slow); "
                        "`pip install libggml-python`")
        return None
    module = native.load("ggml_cpu")
    if module is None:
        return None
    try:
        features = module.open(path)
    except RuntimeError as e:
        log.warning("ggml CPU kernels unavailable (%s); GGML weights are dequantized with torch",
                    str(e).splitlines()[0])
        return None
    log.info("ggml CPU kernels from %s (%s)", path, features or "no SIMD extensions")
    return GGMLBackend(module, path, features)


def finite_argmax(raw: torch.Tensor) -> int | None:
    """raw [V] logits (float32 or bf16) -> their first argmax, or -1 when one is NaN or inf, in one C++ pass on this
    thread (torch's isfinite + all + argmax start parallel regions: ~1 ms a token idle, tens of ms on a loaded
    machine); None where the kernels were not opened (no build is started for this) or raw does not suit them."""
    b = _backend[0] if _backend else None
    if b is None or raw.dim() != 1 or raw.dtype not in (torch.float32, torch.bfloat16) or raw.device.type != "cpu" \
            or not raw.is_contiguous():
        return None
    return b.module.finite_argmax(raw)
