"""`moepage serve MODEL`: a local directory, a .gguf file, a Hugging Face repo id, or nothing (the demo model).

Hub forms (downloads go to the standard Hugging Face cache, only the files needed):
- `owner/repo`: a safetensors checkpoint (config.json, weights, tokenizer) — or, for a repo holding only GGUF
  files, one of them: Q4_K_M if there is one, else the first in name order (logged).
- `owner/repo:QUANT` (as llama.cpp's `-hf owner/repo:Q4_K_M`): the .gguf file of that quant, alone.
- `owner/repo/path/file.gguf`: that file alone.
With HF_HUB_OFFLINE=1 (or no connection) the files are found in the local cache.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger("moepage.server")

_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
HUB_ID = re.compile(rf"^{_REPO}$")
HUB_QUANT = re.compile(rf"^(?P<repo>{_REPO}):(?P<quant>[\w.-]+)$")
HUB_FILE = re.compile(rf"^(?P<repo>{_REPO})/(?P<file>[\w.-]+(?:/[\w.-]+)*\.gguf)$", re.IGNORECASE)
# Files a safetensors MoE checkpoint needs: weights, index, config, tokenizer, chat template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "merges.txt", "vocab.json", "*.txt"]
DEFAULT_QUANT = "Q4_K_M"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


class ModelNotFound(ValueError):
    pass


@dataclass
class ResolvedModel:
    path: str
    model_id: str
    kind: str  # "demo" | "dir" | "gguf" | "hub" | "hub-gguf"


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
    if not spec.startswith((".", "/", "~")):
        m = HUB_FILE.match(spec)
        if m:
            try:
                return ResolvedModel(download_hub_file(m["repo"], m["file"], revision), spec, "hub-gguf")
            except ModelNotFound as e:
                raise ModelNotFound(f"{spec}: no such local file; as a Hugging Face Hub file: {e}") from None
        m = HUB_QUANT.match(spec)
        if m:
            files = list_hub_files(m["repo"], revision)
            if files is None:
                raise ModelNotFound(f"{m['repo']}: not in the local Hugging Face cache and the Hub cannot be reached "
                                    f"(offline or HF_HUB_OFFLINE=1), so its GGUF files cannot be listed. Connect once, "
                                    f"or name the file: {m['repo']}/FILE.gguf")
            name = pick_gguf(m["repo"], files, m["quant"])
            return ResolvedModel(download_hub_file(m["repo"], name, revision), spec, "hub-gguf")
        if HUB_ID.match(spec):
            files = list_hub_files(spec, revision)
            if files is not None and "config.json" not in files and _ggufs(files):
                name = pick_gguf(spec, files, None)
                log.info("%s has GGUF files and no config.json: serving %s (pick another with %s:QUANT or %s/FILE.gguf)",
                         spec, name, spec, spec)
                return ResolvedModel(download_hub_file(spec, name, revision), spec, "hub-gguf")
            return ResolvedModel(download_from_hub(spec, revision), spec, "hub")
    raise ModelNotFound(f"{spec}: no such model directory or .gguf file (and not a Hugging Face repo id like "
                        f"Qwen/Qwen3-30B-A3B, owner/repo:Q4_K_M or owner/repo/file.gguf)")


# ---- choosing a GGUF file --------------------------------------------------------------------------------
def _ggufs(files: list[str]) -> list[str]:
    """The model GGUF files of a listing (not the multimodal projectors), in name order."""
    return sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in os.path.basename(f).lower())


def _has_quant(path: str, quant: str) -> bool:
    """quant appears in the path as a whole part: `-Q4_K_M.gguf`, `Q4_K_M/...`, not `Q4_K` inside `Q4_K_M`."""
    return re.search(rf"(?:^|[-_./]){re.escape(quant)}(?:[-./]|$)", path, re.IGNORECASE) is not None


def pick_gguf(repo_id: str, files: list[str], quant: str | None) -> str:
    ggufs = _ggufs(files)
    if not ggufs:
        raise ModelNotFound(f"{repo_id}: the repository has no .gguf files")
    if quant is None:
        chosen = [f for f in ggufs if _has_quant(f, DEFAULT_QUANT)] or ggufs
    else:
        chosen = [f for f in ggufs if _has_quant(f, quant)]
        if not chosen:
            raise ModelNotFound(f"{repo_id}: no .gguf file for quant {quant!r}; it has: "
                                f"{', '.join(ggufs)}")
    name = chosen[0]
    split = _SPLIT.search(name)
    if split:
        raise ModelNotFound(f"{repo_id}: {name} is one of {int(split.group(2))} parts of a split GGUF; moepage reads "
                            f"single-file GGUF: merge the parts with `llama-gguf-split --merge`, or pick another quant")
    return name


# ---- the Hub and its local cache -------------------------------------------------------------------------
def _cached_files(repo_id: str, revision: str | None) -> list[str] | None:
    """Files of the repo's snapshot in the local HF cache (None if it is not there); no network."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"))
    rev = revision or "main"
    commit = rev
    ref = os.path.join(root, "refs", rev)
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
    snapshot = os.path.join(root, "snapshots", commit)
    if not os.path.isdir(snapshot):
        return None
    out = []
    for dirpath, _, names in os.walk(snapshot):
        rel = os.path.relpath(dirpath, snapshot)
        out += [n if rel == "." else f"{rel}/{n}".replace(os.sep, "/") for n in names]
    return sorted(out)


def list_hub_files(repo_id: str, revision: str | None = None) -> list[str] | None:
    """The repo's files: from the Hub when online, else from the local cache; None if neither knows them."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if not constants.is_offline_mode():
        try:
            return HfApi().list_repo_files(repo_id, revision=revision)
        except RepositoryNotFoundError:
            raise ModelNotFound(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private or gated: "
                                f"run `hf auth login`)") from None
        except RevisionNotFoundError:
            raise ModelNotFound(f"{repo_id}: no revision {revision!r} on the Hugging Face Hub") from None
        except Exception as e:  # no connection, Hub down: fall back to the cache
            log.warning("%s: cannot list the repository on the Hub (%s: %s); looking in the local cache",
                        repo_id, type(e).__name__, e)
    return _cached_files(repo_id, revision)


def download_hub_file(repo_id: str, filename: str, revision: str | None = None) -> str:
    """hf_hub_download of one file into the standard HF cache (served from the cache when offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
    )

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private or gated: "
                            f"run `hf auth login`)") from None
    except LocalEntryNotFoundError:
        cached = _cached_files(repo_id, revision)
        have = f"; the cache has: {', '.join(cached)}" if cached else ""
        raise ModelNotFound(f"{repo_id}/{filename}: not in the local Hugging Face cache and the Hub cannot be reached "
                            f"(offline or HF_HUB_OFFLINE=1){have}. Connect once to download it, or pass a local "
                            f".gguf path") from None
    except EntryNotFoundError:
        raise ModelNotFound(f"{repo_id}: the repository has no file {filename!r}") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFound(f"{repo_id}/{filename}: download from the Hugging Face Hub failed: {e}") from None


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
