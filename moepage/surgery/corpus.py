"""Domain-tagged training text from files already on this machine (no downloads), tokenized into id streams.

Domains (the order is the named-expert order: domain i -> routed expert i):
  code       Python standard-library source: <stdlib>/*.py and <stdlib>/{json,email,http,...}/*.py (tests skipped)
  prose      English documentation: README* / *.md / *.txt under /usr/share/doc (gzip read transparently)
  c_headers  C headers: /usr/include/*.h and /usr/include/{linux,sys,...}/*.h
  shell      shell scripts: files under /usr/bin, /usr/sbin, /etc, /usr/lib, /usr/share whose first line is a
             #!.../sh|bash|dash shebang, plus *.sh files
Files are taken in sorted path order up to a character budget per domain; every `heldout_every`-th file is held
out (a file never lands in both splits). The manifest records every file used, its split and its token count.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

DOMAINS = ("code", "prose", "c_headers", "shell")
STDLIB_PACKAGES = ("json", "email", "http", "asyncio", "concurrent", "importlib", "logging", "urllib", "xml",
                   "collections", "unittest", "multiprocessing", "sqlite3", "tomllib", "wsgiref", "html")
INCLUDE_DIRS = ("", "linux", "sys", "net", "netinet", "arpa", "x86_64-linux-gnu/sys", "x86_64-linux-gnu/bits")
SHELL_ROOTS = ("/usr/bin", "/usr/sbin", "/etc", "/usr/lib", "/usr/share")
SHELLS = (b"/sh", b"/bash", b"/dash", b"env sh", b"env bash")


def _code_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "*.py"))
    for package in STDLIB_PACKAGES:
        files += glob.glob(os.path.join(root, package, "*.py"))
    return sorted(f for f in files if "/test" not in f[len(root):])


def _prose_files() -> list[str]:
    files = []
    for path in glob.glob("/usr/share/doc/**/*", recursive=True):
        base = os.path.basename(path).lower()
        stem = base[:-3] if base.endswith(".gz") else base
        if os.path.isfile(path) and (stem.startswith("readme") or stem.endswith((".md", ".markdown", ".txt"))):
            files.append(path)
    return sorted(files)


def _c_header_files() -> list[str]:
    files = []
    for d in INCLUDE_DIRS:
        files += glob.glob(os.path.join("/usr/include", d, "*.h"))
    return sorted(set(files))


def _is_shell_script(path: str) -> bool:
    if path.endswith(".sh"):
        return True
    try:
        with open(path, "rb") as f:
            first = f.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and any(s in first for s in SHELLS)


def _shell_files() -> list[str]:
    files = []
    for root in SHELL_ROOTS:
        for d, _, names in os.walk(root):
            for name in names:
                path = os.path.join(d, name)
                if os.path.isfile(path) and not os.path.islink(path) and (
                        d in ("/usr/bin", "/usr/sbin") or name.endswith(".sh")) and _is_shell_script(path):
                    files.append(path)
    return sorted(files)


FINDERS: dict[str, Callable[[], list[str]]] = {
    "code": _code_files, "prose": _prose_files, "c_headers": _c_header_files, "shell": _shell_files,
}


def read_text(path: str, max_chars: int) -> str | None:
    """The file's text (gunzipped when .gz), None when unreadable, binary or not UTF-8."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read(max_chars * 4)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    if "\x00" in text or not text.strip():
        return None
    return text[:max_chars]


@dataclass(frozen=True)
class CorpusSpec:
    domains: tuple[str, ...] = DOMAINS
    chars_per_domain: int = 1_500_000
    max_chars_per_file: int = 60_000  # long files are truncated so one file cannot dominate a domain
    heldout_every: int = 10


@dataclass
class DomainCorpus:
    domains: list[str]
    train: dict[str, np.ndarray]  # domain -> int32 token ids, documents joined by the separator token
    heldout: dict[str, np.ndarray]
    manifest: dict = field(default_factory=dict)

    def save(self, path: str):
        arrays = {f"{split}/{d}": getattr(self, split)[d] for split in ("train", "heldout") for d in self.domains}
        np.savez(path, **arrays)
        with open(manifest_path(path), "w") as f:
            json.dump(self.manifest, f, indent=1)

    @classmethod
    def load(cls, path: str) -> "DomainCorpus":
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such corpus file")
        with open(manifest_path(path)) as f:
            manifest = json.load(f)
        data = np.load(path)
        domains = list(manifest["domains"])
        return cls(domains, {d: data[f"train/{d}"] for d in domains}, {d: data[f"heldout/{d}"] for d in domains},
                   manifest)


def manifest_path(corpus_path: str) -> str:
    return os.path.splitext(corpus_path)[0] + ".manifest.json"


def collect_texts(domain: str, spec: CorpusSpec) -> list[tuple[str, str]]:
    """[(path, text)] for one domain in sorted path order, up to spec.chars_per_domain characters."""
    if domain not in FINDERS:
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(FINDERS)}")
    out, total = [], 0
    for path in FINDERS[domain]():
        text = read_text(path, spec.max_chars_per_file)
        if text is None:
            continue
        out.append((path, text))
        total += len(text)
        if total >= spec.chars_per_domain:
            break
    if not out:
        raise ValueError(f"domain {domain!r}: no readable files found on this machine")
    return out


def build_corpus(tokenizer, spec: CorpusSpec = CorpusSpec(), separator_id: int | None = None,
                 texts: dict[str, list[tuple[str, str]]] | None = None) -> DomainCorpus:
    """Tokenize each domain's files (a `tokenizers.Tokenizer`) into train/held-out id streams + a manifest."""
    from moepage.progress import bar

    train, heldout, files_manifest = {}, {}, {}
    for domain in bar(spec.domains, desc="corpus from this machine's files", unit="domain"):
        items = texts[domain] if texts is not None else collect_texts(domain, spec)
        streams = {"train": [], "heldout": []}
        entries = []
        for n, (path, text) in enumerate(items):
            split = "heldout" if spec.heldout_every and n % spec.heldout_every == spec.heldout_every - 1 else "train"
            ids = tokenizer.encode(text).ids
            if separator_id is not None:
                ids = ids + [separator_id]
            streams[split].extend(ids)
            entries.append({"path": path, "split": split, "chars": len(text), "tokens": len(ids),
                            "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]})
        train[domain] = np.asarray(streams["train"], dtype=np.int32)
        heldout[domain] = np.asarray(streams["heldout"], dtype=np.int32)
        files_manifest[domain] = entries
    manifest = {
        "domains": list(spec.domains), "spec": asdict(spec),
        "tokens": {d: {"train": int(train[d].size), "heldout": int(heldout[d].size)} for d in spec.domains},
        "files": files_manifest,
    }
    return DomainCorpus(list(spec.domains), train, heldout, manifest)


def domain_texts_for_tokenizer(spec: CorpusSpec = CorpusSpec(), chars_per_domain: int = 400_000) -> list[str]:
    """A balanced sample of every domain's training files (held-out files excluded) for training a tokenizer."""
    sample = []
    for domain in spec.domains:
        total = 0
        for n, (_, text) in enumerate(collect_texts(domain, spec)):
            if spec.heldout_every and n % spec.heldout_every == spec.heldout_every - 1:
                continue
            sample.append(text)
            total += len(text)
            if total >= chars_per_domain:
                break
    return sample
