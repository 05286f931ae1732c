"""A real agent round trip: `opencode run` (npm opencode-ai, pinned; .ci/run installs it) against moepage's server
with the shipped demo model, which was taught tool calls (scripts/teach_tool_calls.py). OpenCode offers its glob
tool, the model answers with a well-formed call, OpenCode runs it in the project folder and sends the result back:
the next request carries the assistant's call and a `tool` message listing the folder's files (a recorder in front
of the app keeps every request body). A second test sends OpenCode's recorded first request through the openai
client, so the model's half of the round trip is checked where npm is unreachable too."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import openai

from moepage.demo import demo_model_path
from moepage.surgery.tool_transcripts import OPENCODE_GLOB
from moepage.engine.engine import Engine, EngineConfig
from moepage.server.app import create_app
from moepage.server.runner import BackgroundServer
from moepage.server.settings import ServerSettings

OPENCODE_VERSION = "1.18.33"
MODEL_ID = "moepage-demo"
FILES = ("alpha_notes.txt", "beta_tool.py", "gamma.md")
CLIENT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "clients", "opencode-demo.json")


def opencode_binary() -> str | None:
    """The pinned opencode: $MOEPAGE_OPENCODE, or where .ci/run installs it (~/.cache/moepage/opencode)."""
    path = os.environ.get("MOEPAGE_OPENCODE") or os.path.expanduser(
        "~/.cache/moepage/opencode/node_modules/.bin/opencode")
    if not os.path.exists(path):
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    return path if out.stdout.strip() == OPENCODE_VERSION else None


class Recorder:
    """ASGI wrapper: every POST body to /v1/chat/completions, parsed, in arrival order."""

    def __init__(self, app):
        self.app, self.bodies = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        chunks = []

        async def recording():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(chunks)))
            return message

        return await self.app(scope, recording, send)


def opencode_config(url: str) -> dict:
    """clients/opencode-demo.json pointed at url: every built-in tool but glob off and a short agent prompt (the
    demo model is a 4-layer toy with a 2,048-token context: OpenCode's own prompt, all ten tools, is ~10k tokens;
    with glob alone and this agent prompt it is ~640)."""
    with open(CLIENT_CONFIG) as f:
        config = json.load(f)
    config["provider"]["local"]["options"]["baseURL"] = url + "/v1"
    return config


def test_opencode_runs_the_models_tool_call_and_sends_the_result_back(tmp_path):
    binary = opencode_binary()
    if shutil.which("rg", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])) is None:
        pytest.skip("ripgrep (rg), which OpenCode's glob runs, is not installed (pip install ripgrep==14.1.0)")
    if binary is None:
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed, so opencode-ai cannot be")
        pytest.skip(f"opencode-ai@{OPENCODE_VERSION} is not installed (.ci/run installs it with npm into "
                    "~/.cache/moepage/opencode; npm was unreachable)")
    project = tmp_path / "project"
    project.mkdir()
    for name in FILES:
        (project / name).write_text(f"{name}\n")
    engine = Engine.load(EngineConfig(model=demo_model_path(), ctx_size=2048, threads=1, prefix_cache=True))
    app = Recorder(create_app(engine, ServerSettings(model_id=MODEL_ID)))
    try:
        with BackgroundServer(app) as url:
            (project / "opencode.json").write_text(json.dumps(opencode_config(url)))
            # OpenCode's glob runs ripgrep: the `ripgrep` wheel's rg sits beside this Python (pyproject's test extra)
            path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
            env = {**os.environ, "PWD": str(project), "XDG_DATA_HOME": str(tmp_path / "data"),
                   "XDG_STATE_HOME": str(tmp_path / "state"), "PATH": path}
            run = subprocess.run([binary, "run", "-m", f"local/{MODEL_ID}", "List the files in this folder."],
                                 cwd=project, env=env, capture_output=True, text=True, timeout=240)
    finally:
        engine.close()
    agent = [b for b in app.bodies if b.get("tools")]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert agent and [t["function"]["name"] for t in agent[0]["tools"]] == ["glob"], app.bodies
    assert [m["role"] for m in agent[0]["messages"]] == ["system", "user"]
    follow = next((b for b in agent if any(m["role"] == "tool" for m in b["messages"])), None)
    assert follow is not None, f"no request carried a tool result; opencode printed: {run.stdout[-1500:]}"
    called = next(m for m in follow["messages"] if m["role"] == "assistant" and m.get("tool_calls"))
    assert called["tool_calls"][0]["function"]["name"] == "glob"
    assert "pattern" in json.loads(called["tool_calls"][0]["function"]["arguments"])
    result = next(m for m in follow["messages"] if m["role"] == "tool")
    text = result["content"] if isinstance(result["content"], str) else json.dumps(result["content"])
    assert all(name in text for name in FILES), text  # OpenCode ran glob in the project folder


# OpenCode's first agent request as recorded from `opencode run -m local/moepage-demo "List the files in this
# folder."` with clients/opencode-demo.json (its system prompt verbatim; the folder and date are the run's).
OPENCODE_SYSTEM = (
    "You are a coding agent. Use the tools to answer.\nYou are powered by the model named moepage-demo. The exact "
    "model ID is local/moepage-demo\nHere is some useful information about the environment you are running in:\n"
    "<env>\n  Working directory: /tmp/pytest-of-root/pytest-7/test_opencode_runs0/project\n  Workspace root "
    "folder: /\n  Is directory a git repo: no\n  Platform: linux\n  Today's date: Tue Dec 01 2026\n</env>")


@pytest.mark.parametrize("request_text, pattern", [('"List the files in this folder."', "*"),
                                                   ("What files are in this directory?", None)])
def test_the_demo_model_answers_opencodes_request_with_a_glob_call(request_text, pattern):
    """The recorded request gets glob("*"); a reworded one a glob call too (the pattern it picks may differ)."""
    engine = Engine.load(EngineConfig(model=demo_model_path(), ctx_size=2048, threads=1))
    try:
        with BackgroundServer(create_app(engine, ServerSettings(model_id=MODEL_ID))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            r = client.chat.completions.create(
                model=MODEL_ID, temperature=0, max_tokens=64, tools=[OPENCODE_GLOB], tool_choice="auto",
                messages=[{"role": "system", "content": OPENCODE_SYSTEM}, {"role": "user", "content": request_text}])
    finally:
        engine.close()
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "glob" and set(args) == {"pattern"} and pattern in (None, args["pattern"])
