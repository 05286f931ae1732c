"""Paths named inside a model directory (a manifest, an index, a glob), resolved so that none leads out of it.

A name must resolve, after symlinks, to a regular file inside the model directory; a Hugging Face cache
snapshot (`models--org--name/snapshots/REV/`) may also point into its own repository folder's `blobs/`,
where the cache keeps every file.
"""
from __future__ import annotations

import json
import os
import stat

from moepage.paging.pread import CheckpointError

MAX_JSON_BYTES = 64 << 20  # config.json, moepage.json, model.safetensors.index.json
MAX_NAME = 4096  # characters of a file name in a manifest or index


def allowed_roots(root: str) -> list[str]:
    """The real directories files of the model at root may live in."""
    real = os.path.realpath(root)
    roots = [real]
    parent = os.path.dirname(os.path.abspath(root))
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if os.path.isdir(blobs):
            roots.append(os.path.realpath(blobs))
    return roots


def _inside(path: str, base: str) -> bool:
    try:
        return os.path.commonpath([path, base]) == base
    except ValueError:  # different drives
        return False


def resolve_model_file(root: str, name, what: str, must_exist: bool = True) -> str | None:
    """root/name, checked: inside root (after symlinks) and a regular file. A missing file is a CheckpointError, or
    None when must_exist is False. The message names the path, never the file's bytes."""
    if not isinstance(name, str) or not name or "\0" in name or len(name) > MAX_NAME:
        raise CheckpointError(f"{root}: {what}: the file name is not a path of 1 to {MAX_NAME} characters")
    where = os.path.join(root, name)
    if os.path.isabs(name) or any(part == ".." for part in name.replace("\\", "/").split("/")):
        raise CheckpointError(f"{where}: {what} must be a path inside the model directory {root}")
    real = os.path.realpath(os.path.join(root, name))
    if not any(_inside(real, base) for base in allowed_roots(root)):
        raise CheckpointError(f"{where}: {what} resolves to {real}, outside the model directory {root}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if must_exist:
            raise CheckpointError(f"{where}: {what} is missing") from None
        return None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read {what}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{where}: {what} is not a regular file")
    return where


def read_model_json(root: str, name: str, what: str, must_exist: bool = True, limit: int = MAX_JSON_BYTES):
    """The JSON value of root/name (resolved as above, at most `limit` bytes), or None if absent and allowed."""
    path = resolve_model_file(root, name, what, must_exist)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a fifo swapped in meanwhile: no wait
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e.strerror}") from None
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: {what} is not a regular file")
        raw = f.read(st.st_size + 1) if st.st_size <= limit else b""  # read(n) allocates n bytes up front
    if st.st_size > limit or len(raw) > limit:
        raise CheckpointError(f"{path}: {what} is larger than {limit >> 20} MiB")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        pos = f" (line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise CheckpointError(f"{path}: {what} is not valid JSON{pos}") from None
