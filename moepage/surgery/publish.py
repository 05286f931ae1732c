"""`moepage publish`: upload a model directory to the Hugging Face Hub (huggingface_hub), or list what would go."""
from __future__ import annotations

import os
import re

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
IGNORED_PREFIXES = (".",)  # hidden files and folders (.git, .cache, editor files) never go up
SPLIT_MANIFEST = "moepage.json"  # a `moepage split` directory (engine.checkpoint.MANIFEST)
LAZY_FILES = ("hub.json", "expert-hashes.txt")  # what `serve --lazy` adds to its copy (engine/hub_lazy.py)


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id:
        raise ValueError(f"--repo-id must look like OWNER/NAME, got {repo_id!r}")
    return repo_id


def files_to_upload(folder: str) -> list[tuple[str, int]]:
    """[(path relative to folder, bytes)] in sorted order, hidden files and folders left out."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such model directory")
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(IGNORED_PREFIXES))
        for f in sorted(files):
            if f.startswith(IGNORED_PREFIXES):
                continue
            path = os.path.join(root, f)
            out.append((os.path.relpath(path, folder), os.path.getsize(path)))
    return sorted(out)


def check_model_dir(files: list[tuple[str, int]], folder: str) -> list[str]:
    """Errors for a directory that is not a loadable model; returns warnings for softer problems."""
    names = {f for f, _ in files}
    if "config.json" not in names:
        raise ValueError(f"{folder}: no config.json; not a model directory")
    if not any(f.endswith(".safetensors") for f in names):
        raise ValueError(f"{folder}: no *.safetensors weights")
    warnings = []
    if "README.md" not in names:
        warnings.append("no README.md model card (moepage extract/prune write one)")
    if "tokenizer.json" not in names and "tokenizer.model" not in names:
        warnings.append("no tokenizer files")
    return warnings


def publish(folder: str, repo_id: str, *, dry_run: bool = False, private: bool = False,
            commit_message: str | None = None, token: str | None = None, api=None) -> dict:
    """Upload folder to repo_id (created if missing). dry_run: only list the files, no network."""
    check_repo_id(repo_id)
    folder = os.path.abspath(os.path.expanduser(folder))
    files = files_to_upload(folder)
    warnings = check_model_dir(files, folder)
    split = any(f == SPLIT_MANIFEST for f, _ in files)
    if split:  # every expert its own file: a `serve REPO --lazy` client fetches one file per miss, checked by sha256
        from moepage.surgery.split import verify_split

        problems = verify_split(folder)
        if problems:
            raise ValueError(f"{folder}: the split directory does not match its manifest, nothing uploaded: "
                             f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        if any(f in LAZY_FILES for f, _ in files):
            raise ValueError(f"{folder}: a `serve --lazy` cache directory (it has {' or '.join(LAZY_FILES)}); "
                             f"publish the `moepage split` output instead")
    result = {"repo_id": repo_id, "folder": folder, "files": files, "bytes": sum(s for _, s in files),
              "warnings": warnings, "dry_run": dry_run, "url": None, "split": split}
    if dry_run:
        return result
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=folder, repo_id=repo_id, repo_type="model", ignore_patterns=[".*", "**/.*"],
        commit_message=commit_message or f"Upload {os.path.basename(folder)} with moepage",
    )
    result["url"] = str(getattr(commit, "commit_url", commit))
    return result
