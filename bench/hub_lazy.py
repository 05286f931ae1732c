"""`serve owner/repo --lazy` against the local Hub stand-in (tests/hub_standin.py) with a round trip added to every
answer: how many bytes and requests a start and a first request cost, and how long each takes, with a cold disk
tier, a warm one, and the model on local disk. Run by hand (not in CI); numbers go in docs/performance.md.

    python bench/hub_lazy.py MODEL_DIR [--latency-ms 30] [--max-tokens 16] [--prompt TEXT]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from hub_standin import HubStandIn  # noqa: E402

REPO = "bench/lazy"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "moepage.cli", "serve", *args, "--port", str(port), "--log-level",
                          "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if p.poll() is not None:
            raise RuntimeError(p.stderr.read()[-2000:])
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return p, url, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def request(url: str, prompt: str, n: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0}, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["text"], time.perf_counter() - t0


def sent(hub: HubStandIn) -> tuple[int, int]:
    """(requests of any kind, bytes of files asked for) so far."""
    total = 0
    for _, rng in hub.gets():
        a, b = rng.split("=")[1].split("-")
        total += int(b) - int(a) + 1
    return len(hub.requests), total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a safetensors checkpoint or `moepage split` directory")
    ap.add_argument("--latency-ms", type=float, default=30.0, help="added to every Hub answer")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt", default="Write a function that adds two numbers.")
    ap.add_argument("--threads", default="2")
    a = ap.parse_args()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a.model) for f in fs)
    flags = ["--threads", a.threads, "--ctx-size", "512"]
    out = {"model": os.path.abspath(a.model), "model_bytes": size, "latency_ms": a.latency_ms}
    with tempfile.TemporaryDirectory() as cache, HubStandIn({REPO: a.model}) as hub:
        hub.latency_s = a.latency_ms / 1000
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=cache, TQDM_DISABLE="1")
        env.pop("HF_HUB_OFFLINE", None)
        p, url, t_start = start([REPO, "--lazy", *flags], env)
        n0, b0 = sent(hub)
        text, t_cold = request(url, a.prompt, a.max_tokens)
        n1, b1 = sent(hub)
        _, t_mem = request(url, a.prompt, a.max_tokens)
        p.kill()
        p.wait()
        out["cold"] = {"start_s": t_start, "start_requests": n0, "start_bytes": b0, "first_request_s": t_cold,
                       "request_fetches": n1 - n0, "request_bytes": b1 - b0, "again_from_memory_s": t_mem}
        p, url, t_start = start([REPO, "--lazy", *flags], env)
        text2, t_warm = request(url, a.prompt, a.max_tokens)
        n2, b2 = sent(hub)
        p.kill()
        p.wait()
        out["warm_disk_tier"] = {"start_s": t_start, "first_request_s": t_warm, "new_requests": n2 - n1,
                                 "new_bytes": b2 - b1}
    p, url, t_start = start([a.model, *flags], dict(os.environ))
    text3, t_local = request(url, a.prompt, a.max_tokens)
    p.kill()
    p.wait()
    out["local"] = {"start_s": t_start, "first_request_s": t_local}
    out["same_text"] = text == text2 == text3
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
