"""What a MODEL argument names: a local directory, a .gguf file, a Hugging Face repo id, or `demo` / nothing (the
built-in demo model; a local path called `demo` wins over the name).

Hub forms (downloads go to the standard Hugging Face cache, only the files needed):
- `owner/repo`: a safetensors checkpoint (config.json, weights, tokenizer) — or, for a repo holding only GGUF
  files, one of them: Q4_K_M if there is one, else the first in name order (logged).
- `owner/repo:QUANT` (as llama.cpp's `-hf owner/repo:Q4_K_M`): the .gguf file of that quant, alone.
- `owner/repo/path/file.gguf`: that file alone.
With HF_HUB_OFFLINE=1, or when the Hub does not answer within HUB_TIMEOUT_S, the files are taken from the local
cache without asking the Hub again; what the cache lacks is an error at once.

`--lazy` (owner/repo only): the resident weights, config and tokenizer now, each routed expert on its first miss
(engine/hub_lazy.py); offline, the lazy directory an earlier start made serves what its disk tier holds.
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
DEMO_NAME = "demo"
HUB_TIMEOUT_S = 10.0  # one listing request, no retries: an unreachable Hub fails in seconds, not after backoffs
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


def resolve_model(spec: str | None, revision: str | None = None, lazy: bool = False) -> ResolvedModel:
    """lazy: a Hub repo id served with its experts fetched on their first miss (resolve_lazy)."""
    if lazy:
        if not spec or os.path.exists(os.path.expanduser(spec)) or not (HUB_ID.match(spec) or HUB_QUANT.match(spec)
                                                                         or HUB_FILE.match(spec)):
            raise ModelNotFound(f"{spec or 'the demo model'}: --lazy takes a Hugging Face repo id (owner/repo, "
                                f"owner/repo:QUANT or owner/repo/file.gguf); local models are paged from disk already")
        return ResolvedModel(resolve_lazy(spec, revision), spec, "hub-lazy")
    if not spec or (spec == DEMO_NAME and not os.path.exists(spec)):
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
            listing = list_hub_files(m["repo"], revision)
            if listing.online and m["file"] not in listing.files:
                raise ModelNotFound(f"{m['repo']}: the repository has no file {m['file']!r}")
            try:
                path = download_hub_file(m["repo"], m["file"], revision, offline=not listing.online)
            except ModelNotFound as e:
                raise ModelNotFound(f"{spec}: no such local file; as a Hugging Face Hub file: {e}") from None
            return ResolvedModel(path, spec, "hub-gguf")
        m = HUB_QUANT.match(spec)
        if m:
            listing = list_hub_files(m["repo"], revision)
            if listing.files is None:
                raise ModelNotFound(f"{m['repo']}: not in the local Hugging Face cache and the Hub cannot be reached "
                                    f"({listing.why}), so its GGUF files cannot be listed. Connect once, or name the "
                                    f"file: {m['repo']}/FILE.gguf")
            name = pick_gguf(m["repo"], listing.files, m["quant"])
            return ResolvedModel(download_hub_file(m["repo"], name, revision, offline=not listing.online), spec,
                                 "hub-gguf")
        if HUB_ID.match(spec):
            listing = list_hub_files(spec, revision)
            if listing.files is None:
                raise ModelNotFound(f"{spec}: not in the local Hugging Face cache and the Hub cannot be reached "
                                    f"({listing.why}). Connect once to download it, or pass a local directory or "
                                    f".gguf file")
            if "config.json" not in listing.files and _ggufs(listing.files):
                name = pick_gguf(spec, listing.files, None)
                log.info("%s has GGUF files and no config.json: serving %s (pick another with %s:QUANT or %s/FILE.gguf)",
                         spec, name, spec, spec)
                return ResolvedModel(download_hub_file(spec, name, revision, offline=not listing.online), spec,
                                     "hub-gguf")
            return ResolvedModel(download_from_hub(spec, revision, offline=not listing.online), spec, "hub")
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


@dataclass
class HubListing:
    files: list[str] | None  # the repo's files, from the Hub or else the local cache; None: neither knows the repo
    online: bool  # the Hub answered (downloads may ask it); False: the cache alone is used
    why: str = ""  # why the Hub was not asked or did not answer


def list_hub_files(repo_id: str, revision: str | None = None) -> HubListing:
    """The repo's files from one Hub request (HUB_TIMEOUT_S, no retries) when online, else from the local cache."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if constants.is_offline_mode():
        return HubListing(_cached_files(repo_id, revision), False, "HF_HUB_OFFLINE=1")
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
        return HubListing(sorted(s.rfilename for s in info.siblings or []), True)
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private or gated: "
                            f"run `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"{repo_id}: no revision {revision!r} on the Hugging Face Hub") from None
    except Exception as e:  # no connection, a timeout, the Hub down: the cache alone decides, at once
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}"
    cached = _cached_files(repo_id, revision)
    if cached is not None:
        log.warning("%s: the Hugging Face Hub did not answer (%s); using the local cache", repo_id, why)
    return HubListing(cached, False, why)


def download_hub_file(repo_id: str, filename: str, revision: str | None = None, offline: bool = False) -> str:
    """hf_hub_download of one file into the standard HF cache (offline: from the cache only, no request)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
    )

    try:
        return hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline)
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


def download_from_hub(repo_id: str, revision: str | None = None, offline: bool = False) -> str:
    """snapshot_download into the standard HF cache, only the files a safetensors checkpoint needs (offline: from
    the cache only, no request)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private: "
                            f"run `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise ModelNotFound(f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached "
                            f"(offline or HF_HUB_OFFLINE=1). Connect once to download it, or pass a local "
                            f"directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFound(f"{repo_id}: download from the Hugging Face Hub failed: {e}") from None


def resolve_lazy(spec: str, revision: str | None = None) -> str:
    """The lazy directory (engine/hub_lazy.py) of a Hub spec: owner/repo (a safetensors checkpoint, a `moepage
    split` upload, or a GGUF-only repo: its Q4_K_M or first GGUF), owner/repo:QUANT, owner/repo/file.gguf. Built or
    reused when the Hub answers, else the one an earlier start left in the cache."""
    from moepage.engine.hub_lazy import MANIFEST, prepare_lazy

    repo_id, gguf_file, quant = spec, None, None
    if m := HUB_FILE.match(spec):
        repo_id, gguf_file = m["repo"], m["file"]
    elif m := HUB_QUANT.match(spec):
        repo_id, quant = m["repo"], m["quant"]
    listing = list_hub_files(repo_id, revision)
    why = listing.why
    if listing.online:
        files = listing.files
        if quant is not None or (gguf_file is None and "config.json" not in files and MANIFEST not in files
                                 and _ggufs(files)):
            gguf_file = pick_gguf(repo_id, files, quant)
        elif gguf_file is not None and gguf_file not in files:
            raise ModelNotFound(f"{repo_id}: the repository has no file {gguf_file!r}")
        try:
            return prepare_lazy(repo_id, files, revision, gguf_file, log=log.info)
        except Exception as e:  # the Hub stopped answering mid-way, or a file it sent is malformed
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}"
            if isinstance(e, ValueError):  # a malformed file (CheckpointError), not the network
                raise ModelNotFound(f"{spec}: preparing the lazy model failed: {why}") from None
    cached = _cached_lazy(repo_id, revision, gguf_file, quant)
    if cached is None:
        raise ModelNotFound(f"{spec}: the Hub cannot be reached ({why}) and no earlier `--lazy` start left a copy "
                            f"of revision {revision or 'main'!r} in the local cache")
    log.warning("%s: the Hugging Face Hub did not answer (%s); serving the lazy copy in %s: experts its disk tier "
                "lacks fail their request until the Hub answers", spec, why, cached)
    return cached


def _cached_lazy(repo_id: str, revision: str | None, gguf_file: str | None, quant: str | None) -> str | None:
    from moepage.engine.hub_lazy import cached_lazy_dirs

    found = cached_lazy_dirs(repo_id, revision)
    if gguf_file is not None:
        found = [(d, f) for d, f in found if f == gguf_file]
    elif quant is not None:
        found = [(d, f) for d, f in found if f is not None and _has_quant(f, quant)]
    else:  # the checkpoint itself, else the GGUF a plain owner/repo picks
        found = sorted(found, key=lambda t: (t[1] is not None, not (t[1] and _has_quant(t[1], DEFAULT_QUANT)),
                                             t[1] or ""))
    return found[0][0] if found else None
