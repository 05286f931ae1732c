"""Every command shown in README.md and clients/README.md runs as written: a newcomer's first hour, in CI.

How a command is read (these are all the rules):
1. Commands are the lines of the ```bash blocks; a trailing backslash joins the next line, `#` starts a comment,
   and `a && b` is two commands, run in order.
2. Every command runs in one scratch directory, where the example paths are fixtures built once: ./Qwen3-30B-A3B
   is a copy of the demo model, ./qwen3-30b-a3b-Q4_K_M.gguf and ./model-Q4_K_M.gguf are the demo model written as
   GGUF (Q8_0), DENSE is a tiny dense Qwen2 with a tokenizer, FILES a held-out text file, src/ and docs/ small text
   trees, clients/ the repository's. The one word replaced is MODEL, by `demo` (the built-in demo model).
3. Optional parts `[...]` are run: only the brackets are dropped.
4. `moepage serve ...` runs in the background with `--port P` (a free port) appended and must answer /health and
   /v1/models; the client commands after it in the same README run against it (MOEPAGE_URL=http://127.0.0.1:P); it
   is stopped with SIGTERM before the next serve and at the end, and must then exit.
5. SKIPPED lists what is not run and why (network, a Docker daemon, hours of benchmark, the suite itself); each
   appears as a skipped test. A command that is neither run nor skipped fails. A command shown twice runs once.
A command passes when it exits 0 within its time limit and prints no Python traceback.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import save_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
READMES = ("README.md", "clients/README.md")
COMMAND_TIMEOUT_S = 120
SERVE_START_TIMEOUT_S = 90
PLACEHOLDERS = {"MODEL": "demo"}
HUB_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?"
SKIPPED = [
    (r"^pip (install|download) ", "installs from the network (.ci/run runs exactly this in a fresh venv)"),
    (r"^python -m pytest\b", "the test suite itself"),
    (r"^python bench/", "the full benchmark: a 2.4 GiB model, cgroups as root and llama.cpp, about an hour"),
    (r"^python -c .import llama_cpp", "quantizes the 2.4 GiB bench model: part of the benchmark's set-up"),
    (r"^docker ", "needs a Docker daemon and the network (docker/Dockerfile is not built in CI)"),
    (r"^opencode ", "needs the opencode-ai npm package; its agent loop talks to the server for minutes"),
    (rf"^moepage \w+ {HUB_ID}(\s|$)", "a Hugging Face Hub id: needs the network (nothing is downloaded in tests)"),
]
CLIENT = re.compile(r"^(bash|python) clients/")


OPTIONAL = re.compile(r"\[(--[^\[\]]*)\]")  # `[--dense]`, `[--eval FILES]`; not `'.[test]'`


@dataclass
class Command:
    readme: str
    words: list[str]  # as written, comment dropped

    @property
    def text(self) -> str:
        return shlex.join(self.words)

    @property
    def skip_reason(self) -> str | None:
        return next((why for pattern, why in SKIPPED if re.search(pattern, self.text)), None)

    def argv(self) -> list[str]:
        return [PLACEHOLDERS.get(w, w) for w in self.words]


def commands_in(readme: str) -> list[Command]:
    """The commands of readme's ```bash blocks (rules 1 and 3)."""
    text = (REPO / readme).read_text()
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(OPTIONAL.sub(r"\1", line), comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                if words[:cut]:
                    out.append(Command(readme, words[:cut]))
                words = words[cut + 1:]
    return out


ALL = [c for r in READMES for c in commands_in(r)]


def test_commands_are_read_as_written():
    """Rule 1 on the README's own lines: continuations joined, comments dropped, && split."""
    texts = [c.text for c in commands_in("README.md")]
    assert "moepage serve" in texts and "moepage verify ./q3-split" in texts
    assert any(t.startswith("python bench/bench.py --model") and t.endswith("--lossless") for t in texts)
    assert "python -m pytest -q tests" in texts  # the third part of the test command
    assert all("#" not in t for t in texts)
    prof = next(c for c in ALL if c.text.startswith("moepage profile"))
    assert prof.argv()[:3] == ["moepage", "profile", "demo"] and "code=src/**/*.py" in prof.argv()


@pytest.mark.parametrize("cmd", [c for c in ALL if c.skip_reason], ids=lambda c: c.text[:60])
def test_skipped_command(cmd):
    pytest.skip(f"{cmd.readme}: `{cmd.text[:80]}`: {cmd.skip_reason}")


# ---- fixtures: the example paths of the READMEs ------------------------------------------------------------
def write_text_trees(root: Path):
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "stack.py").write_text(
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
        "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n" * 3)
    (root / "src" / "main.py").write_text("import sys\n\n\ndef main(argv):\n    print(argv)\n    return 0\n" * 3)
    (root / "docs").mkdir()
    (root / "docs" / "guide.md").write_text("# Guide\n\nThe fox watched the boats on the river go by.\n" * 6)
    (root / "docs" / "notes.txt").write_text("A quiet morning; the town slept under a grey sky.\n" * 6)
    (root / "FILES").write_text("def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 4)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tokenizer_dir):
    from transformers import Qwen2Config

    from moepage.demo import demo_model_path
    from moepage.kernels import native
    from moepage.surgery.gguf_export import write_gguf

    native.build_all()  # here, once: a command killed at its time limit must not be the one building a kernel
    root = tmp_path_factory.mktemp("readme")
    demo = demo_model_path()
    shutil.copytree(demo, root / "Qwen3-30B-A3B")
    write_gguf(demo, str(root / "qwen3-30b-a3b-Q4_K_M.gguf"), "q8_0")
    shutil.copyfile(root / "qwen3-30b-a3b-Q4_K_M.gguf", root / "model-Q4_K_M.gguf")
    info = json.loads((tokenizer_dir / "info.json").read_text())
    dense = Qwen2Config(vocab_size=info["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        eos_token_id=info["eos_token_id"], bos_token_id=None, tie_word_embeddings=True)
    (root / "DENSE").mkdir()
    save_random_checkpoint(dense, root / "DENSE", tokenizer_dir)
    write_text_trees(root)
    (root / "clients").symlink_to(REPO / "clients")
    return root


# ---- running ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_env(port: int | None) -> dict:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if port is not None:
        env["MOEPAGE_URL"] = f"http://127.0.0.1:{port}"
    return env


def problem(cmd: Command, rc: int | None, out: str) -> str | None:
    if rc == 0 and "Traceback (most recent call last)" not in out:
        return None
    return f"{cmd.readme}: `{cmd.text}` exited {rc}:\n{out[-3000:]}"


class Server:
    """One `moepage serve ...` command in the background (rule 4)."""

    def __init__(self, cmd: Command, cwd: Path):
        self.cmd, self.port = cmd, free_port()
        self.log = open(cwd / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd.argv() + ["--port", str(self.port)], cwd=cwd, env=command_env(None),
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self) -> str | None:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return problem(self.cmd, self.proc.returncode, self.output())
            try:
                for path in ("/health", "/v1/models"):
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                        json.loads(r.read())
                return None
            except OSError:
                time.sleep(0.3)
        return f"{self.cmd.readme}: `{self.cmd.text}` did not answer /health within {SERVE_START_TIMEOUT_S} s:\n" \
               f"{self.output()[-3000:]}"

    def stop(self) -> str | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return f"{self.cmd.readme}: `{self.cmd.text}` did not exit within 30 s of SIGTERM"
        self.log.close()
        out = open(self.log.name).read()
        return f"{self.cmd.readme}: `{self.cmd.text}` printed a traceback:\n{out[-3000:]}" \
            if "Traceback (most recent call last)" in out else None


def run_readme(readme: str, cwd: Path) -> list[str]:
    failures, server, seen = [], None, set()
    try:
        for cmd in commands_in(readme):
            if cmd.skip_reason or cmd.text in seen:
                continue
            seen.add(cmd.text)
            argv = cmd.argv()
            t0 = time.monotonic()
            if argv[:2] == ["moepage", "serve"]:
                if server is not None:
                    failures.append(server.stop())
                server = Server(cmd, cwd)
                failures.append(server.wait_ready())
            elif argv[0] == "moepage" or CLIENT.match(cmd.text):
                if CLIENT.match(cmd.text) and server is None:
                    failures.append(f"{readme}: `{cmd.text}` needs a `moepage serve` command before it")
                    continue
                try:
                    done = subprocess.run(argv, cwd=cwd, env=command_env(server.port if server else None),
                                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
                    failures.append(problem(cmd, done.returncode, done.stdout + done.stderr))
                except subprocess.TimeoutExpired:
                    failures.append(f"{readme}: `{cmd.text}` ran past {COMMAND_TIMEOUT_S} s")
            else:
                failures.append(f"{readme}: `{cmd.text}` is neither run by this test nor listed in SKIPPED")
            print(f"{time.monotonic() - t0:6.1f} s  {cmd.text}")
    finally:
        if server is not None:
            failures.append(server.stop())
    return [f for f in failures if f]


@pytest.mark.parametrize("readme", READMES)
def test_readme_commands_run_as_written(readme, scratch):
    failures = run_readme(readme, scratch)
    assert not failures, "\n\n".join(failures)
