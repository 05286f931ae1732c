"""moepage: serve Mixture-of-Experts LLMs larger than memory by paging routed experts from disk."""
import os as _os

__version__ = "0.1.0"

# torch's oneDNN (ideep) path keeps prepared matmul state per GEMM shape in two caches of 1024 entries each; a
# paged prefill multiplies experts by a different token count every time, and those caches held ~100 MB on the
# bench model after one 512-token prompt. 16 entries each cost no measurable prefill speed. Read when torch first
# runs a bf16 matmul, so set on import; the user's own settings win.
_os.environ.setdefault("LRU_CACHE_CAPACITY", "16")
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
# libgomp's default spin-wait keeps torch's worker threads running after each parallel region; beside moepage's own
# kernel threads or a busy neighbour on few cores that collapses decode. Read when libgomp loads (import torch), so
# set on import; the user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
