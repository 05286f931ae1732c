"""`moepage serve MODEL`: a local directory, a .gguf file, a Hugging Face repo id, or nothing (the demo model)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files a safetensors MoE checkpoint needs: weights, index, config, tokenizer, chat template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "merges.txt", "vocab.json", "*.txt"]


class ModelNotFound(ValueError):
    pass


@dataclass
class ResolvedModel:
    path: str
    model_id: str
    kind: str  # "demo" | "dir" | "gguf" | "hub"


def default_model_id(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or "moepage"


def resolve_model(spec: str | None, revision: str | None = None) -> ResolvedModel:
    if not spec:
        from moepage.demo import demo_model_path

        return ResolvedModel(demo_model_path(), "moepage-demo", "demo")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return ResolvedModel(os.path.abspath(path), default_model_id(path), "dir")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelNotFound(f"{path}: a single file must be a .gguf model; otherwise pass the model directory")
        return ResolvedModel(os.path.abspath(path), os.path.basename(path)[: -len(".gguf")], "gguf")
    if spec.startswith((".", "/", "~")) or not HUB_ID.match(spec):
        raise ModelNotFound(f"{spec}: no such model directory or .gguf file (and not a Hugging Face repo id "
                            f"like Qwen/Qwen3-30B-A3B)")
    return ResolvedModel(download_from_hub(spec, revision), spec, "hub")


def download_from_hub(repo_id: str, revision: str | None = None) -> str:
    """snapshot_download into the standard HF cache, only the files a safetensors checkpoint needs."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private: "
                            f"run `hf auth login`)") from None
    except LocalEntryNotFoundError as e:
        raise ModelNotFound(f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached "
                            f"(offline or HF_HUB_OFFLINE=1): {e}. Connect once to download it, or pass a local "
                            f"directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFound(f"{repo_id}: download from the Hugging Face Hub failed: {e}") from None
