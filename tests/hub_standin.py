"""A local stand-in for the Hugging Face Hub: the HTTP answers huggingface_hub reads, for model repos kept in
local folders. Point huggingface_hub at it with HF_ENDPOINT (set before huggingface_hub is imported: a
subprocess's environment).

- GET /api/models/OWNER/NAME[/revision/REV]: {"id", "sha", "siblings": [{"rfilename"}]} (HfApi.model_info).
- HEAD and GET /OWNER/NAME/resolve/REV/PATH: the file, with the headers the Hub sends: ETag (a file's sha256, as
  the Hub gives for LFS files; the git blob's sha1 otherwise), X-Repo-Commit, Content-Length, Accept-Ranges; a
  Range header gets 206 and Content-Range. REV is "main" or the repo's commit.
Faults, to test the client: `fail` (a set of path prefixes answered 500), `stall` (path prefixes whose body stops
halfway until `release` is set), and `down()`/`up()`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
LFS_BYTES = 1024  # files this large get an LFS-style ETag (sha256); smaller ones a git-blob-style sha1


class Repo:
    def __init__(self, folder: str):
        self.folder = folder
        self.files = {}  # rel -> (size, etag)
        for dirpath, _, names in os.walk(folder):
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                rel = os.path.relpath(p, folder).replace(os.sep, "/")
                data = open(p, "rb").read()
                if len(data) >= LFS_BYTES:
                    etag = hashlib.sha256(data).hexdigest()
                else:
                    etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                self.files[rel] = (len(data), etag)
        self.commit = hashlib.sha1(json.dumps(sorted(self.files.items())).encode()).hexdigest()


class HubStandIn:
    """`with HubStandIn({"owner/name": folder}) as hub:` serves on hub.url; hub.requests counts (method, path)."""

    def __init__(self, repos: dict[str, str]):
        self.repos = {k: Repo(v) for k, v in repos.items()}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.fail: set[str] = set()
        self.stall: set[str] = set()
        self.release = threading.Event()
        self.stalled = threading.Event()  # set once a stalled body has sent its first half
        self._server: ThreadingHTTPServer | None = None
        self._port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def up(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def down(self):
        if self._server is not None:
            self.release.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()

    def gets(self, prefix: str = "") -> list[tuple[str, str | None]]:
        """(path, Range) of every GET of a file whose path (in the repo) starts with prefix."""
        out = []
        for method, path, rng in list(self.requests):
            m = _RESOLVE.match(path)
            if method == "GET" and m and m["path"].startswith(prefix):
                out.append((m["path"], rng))
        return out

    # ---- answers ------------------------------------------------------------------------------
    def _answer(self, h: BaseHTTPRequestHandler, body: bool):
        path = h.path.split("?")[0]
        self.requests.append((h.command, path, h.headers.get("Range")))
        m = _API.match(path)
        if m and body:
            repo = self.repos.get(m["repo"])
            if repo is None or m["rev"] not in (None, "main", repo.commit):
                return self._plain(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            info = {"id": m["repo"], "sha": repo.commit, "siblings": [{"rfilename": f} for f in sorted(repo.files)]}
            return self._plain(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        m = _RESOLVE.match(path)
        repo = self.repos.get(m["repo"]) if m else None
        if repo is None or m["rev"] not in ("main", repo.commit):
            return self._plain(h, 404, b"Repository not found", {"X-Error-Code": "RepoNotFound"}, body)
        rel = m["path"]
        if rel not in repo.files:
            return self._plain(h, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                           "X-Repo-Commit": repo.commit}, body)
        if any(rel.startswith(p) for p in self.fail):
            return self._plain(h, 500, b"Internal Error", {}, body)
        size, etag = repo.files[rel]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start, end, status = 0, size, 200
        rng = h.headers.get("Range")
        if rng:
            r = _RANGE.match(rng.strip())
            if not r or int(r.group(1)) >= size:
                return self._plain(h, 416, b"Range Not Satisfiable", {"Content-Range": f"bytes */{size}"}, body)
            start = int(r.group(1))
            end = min(size, int(r.group(2)) + 1) if r.group(2) else size
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if not body:
            return
        with open(os.path.join(repo.folder, rel), "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        if any(rel.startswith(p) for p in self.stall):
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            self.stalled.set()
            self.release.wait(60)
            h.close_connection = True
            return
        h.wfile.write(data)

    @staticmethod
    def _plain(h, status: int, data: bytes, headers: dict, body: bool = True):
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
