"""One module per CLI verb; each exposes `register(subparsers)`."""
from __future__ import annotations

import importlib

VERBS = ["serve", "generate", "inspect", "split", "verify"]
OPTIONAL_VERBS = ["profile", "extract", "prune", "publish", "prefetch", "upcycle", "train", "probe", "bench"]


def register_all(sub):
    for verb in VERBS + OPTIONAL_VERBS:
        try:
            module = importlib.import_module(f"moepage.commands.{verb}")
        except ModuleNotFoundError as e:
            if e.name == f"moepage.commands.{verb}":
                continue  # verb not built yet
            raise
        module.register(sub)


def plural(n: int, word: str) -> str:
    """'1 expert', '2 experts'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
