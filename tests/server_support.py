"""Shared pieces of the server tests: small demo checkpoints written to tmp dirs (and damaged there), engines,
servers on loopback, `moepage serve` subprocesses."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

from moepage.demo import DemoSpec, build_demo_model
from moepage.engine.engine import Engine, EngineConfig
from moepage.server.app import create_app
from moepage.server.runner import BackgroundServer, free_port
from moepage.server.settings import ServerSettings

MODEL_ID = "hardening-test"
SMALL = DemoSpec(layers=2, experts=8, vocab=400)
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def small_demo(directory) -> str:
    return build_demo_model(directory, SMALL)


def copy_model(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def load_engine(path: str, ctx: int = 512, **over) -> Engine:
    return Engine.load(EngineConfig(model=path, ctx_size=ctx, threads=1, **over))


@contextmanager
def serving(engine: Engine, **settings):
    """(url, app) of a server on loopback for engine; settings are ServerSettings fields."""
    app = create_app(engine, ServerSettings(model_id=MODEL_ID, **settings))
    with BackgroundServer(app) as url:
        yield url, app


def wait_until(cond, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def tensor_span(path: str, name: str) -> tuple[int, int, str]:
    """(start, end, dtype) of a tensor's bytes in a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    info = header[name]
    a, b = info["data_offsets"]
    return 8 + n + a, 8 + n + b, info["dtype"]


def poke_float32(path: str, name: str, value: float, index: int = 0):
    """Overwrite element `index` of an F32 tensor in a safetensors file (a corrupted weight)."""
    start, _, dtype = tensor_span(path, name)
    assert dtype == "F32", dtype
    with open(path, "r+b") as f:
        f.seek(start + 4 * index)
        f.write(struct.pack("<f", value))


def sse_events(response) -> list[dict | str]:
    """The data of each server-sent event: parsed JSON, or the raw string ([DONE])."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


class ServeProcess:
    """`moepage serve ARGS` in a subprocess on a free port; `with ServeProcess(args) as p:` waits for /health."""

    def __init__(self, args: list[str], port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "moepage.cli", "serve", *args, "--port", str(self.port),
                     "--log-level", "warning"]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "ServeProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        if self.wait_healthy(timeout):
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"moepage serve exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
        raise RuntimeError(f"moepage serve did not answer /health on {self.url} within {timeout} s")

    def wait_healthy(self, timeout: float) -> bool:
        """Whether the process answers /health with 200 within timeout seconds (False at once if it exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def assert_stream_protocol(events, calls):
    """Each call starts once (with id and name) before any of its arguments; its argument deltas add up to it."""
    from moepage.server.tool_parsers import ToolCallArguments, ToolCallStart

    started = set()
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index not in started and e.id and e.name
            started.add(e.index)
        elif isinstance(e, ToolCallArguments):
            assert e.index in started
    for i, call in enumerate(calls):
        assert "".join(e.delta for e in events if isinstance(e, ToolCallArguments) and e.index == i) == call.arguments


def forced_sampling(engine: Engine, pieces: list[str]) -> dict:
    """Sampling that makes the small-logit demo model write exactly these pieces (each one token), then EOS."""
    ids = [engine.tokenizer.token_to_id(p) for p in pieces]
    assert None not in ids, pieces
    ids.append(engine.tokenizer.eos_id)
    step = 3.0 / max(1, len(ids) - 1)
    return dict(temperature=0, presence_penalty=2, frequency_penalty=2, max_tokens=len(ids) + 3,
                logit_bias={str(t): 100.0 - i * step for i, t in enumerate(ids)})


def ask_forced(url: str, engine: Engine, pieces: list[str], stream: bool, messages: list[dict], **kw):
    """(reasoning_content, content, [(name, arguments)] of the tool calls, finish_reason) of a chat request over the
    openai client whose output is forced to `pieces`; streamed, the deltas are joined (calls by their index)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    body = dict(model=MODEL_ID, messages=messages, **forced_sampling(engine, pieces), **kw)
    if not stream:
        r = client.chat.completions.create(**body)
        m = r.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in (m.tool_calls or [])]
        return getattr(m, "reasoning_content", None), m.content, calls, r.choices[0].finish_reason
    chunks = list(client.chat.completions.create(**body, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) or None
    content = "".join(d.content or "" for d in deltas) or None
    joined: dict[int, list[str]] = {}
    for d in deltas:
        for t in d.tool_calls or []:
            entry = joined.setdefault(t.index, ["", ""])
            entry[0] += t.function.name or ""
            entry[1] += t.function.arguments or ""
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return reasoning, content, [tuple(joined[i]) for i in sorted(joined)], finish[-1]
