"""The peak bytes of tensor storage a piece of torch code allocates (what it holds at its worst moment beyond what
existed before), counted per storage as the dispatcher creates it and freed when the storage dies. Deterministic for
given shapes (unlike RSS, which the C allocator's caching and the page cache blur), so a test can bound a planned
workspace with it. Allocations made outside the dispatcher (C++ kernels' private buffers) are not seen.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocPeak(TorchDispatchMode):
    """with AllocPeak() as p: ...  then p.peak (bytes), p.live (still held at exit), p.peak_op (the op whose output
    reached the peak); trace=True also keeps (op, bytes it allocated, live bytes after it) for every allocation."""

    def __init__(self, trace: bool = False):
        super().__init__()
        self.trace: list[tuple[str, int, int]] | None = [] if trace else None
        self.live = 0
        self.peak = 0
        self.peak_op = ""
        self._seen: dict[int, int] = {}  # storage address -> bytes, while alive

    def _free(self, key: int, nbytes: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self._seen:
                continue
            if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == key
                   for a in tree_flatten((args, kwargs))[0]):
                continue  # an in-place op or a view of an input: nothing new
            self._seen[key] = nbytes
            self.live += nbytes
            weakref.finalize(st, self._free, key, nbytes)
            if self.trace is not None:
                self.trace.append((str(func), nbytes, self.live))
            if self.live > self.peak:
                self.peak, self.peak_op = self.live, str(func)
        return out
