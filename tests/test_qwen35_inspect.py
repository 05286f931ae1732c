"""`moepage inspect` on a directory holding only Qwen3.5-35B-A3B's config.json (tests/data/qwen3_5_35b_a3b: the
published multimodal layout, shapes from docs/qwen3_5-notes.md): parameter count, bytes per expert, the recurrent
state and KV per 1k tokens, and the fraction of experts that fits 8, 10 and 12 GiB, each worked out here by hand.
"""
from __future__ import annotations

import os
import re

import pytest

from moepage.cli import main as cli_main

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "data", "qwen3_5_35b_a3b")
H, L, V, E, K, I, S = 2048, 40, 248320, 256, 8, 512, 512
LINEAR, FULL = 30, 10


def by_hand():
    qkv = 2 * 16 * 128 + 32 * 128  # conv channels C = 2 Hk Dk + Hv Dv
    linear = qkv * H + 4096 * H + 2 * 32 * H + qkv * 4 + 2 * 32 + 128 + H * 4096  # in_proj_qkv, z, b, a, conv, ...
    full = 2 * 16 * 256 * H + 2 * (2 * 256 * H) + H * 16 * 256 + 2 * 256  # doubled q, k, v, o, q/k norms
    ffn = E * H + 3 * S * H + H + 2 * H  # router, shared expert, its gate, the two layer norms
    resident = 2 * V * H + H + LINEAR * linear + FULL * full + L * ffn
    expert = 3 * H * I
    return resident, expert


@pytest.fixture(scope="module")
def printed():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["inspect", CONFIG_DIR]) == 0
    return out.getvalue()


def test_parameter_count_and_expert_bytes(printed):
    resident, expert = by_hand()
    total, active = resident + L * E * expert, resident + L * K * expert
    assert f"{total / 1e9:.2f} B total" in printed and f"{active / 1e9:.2f} B active" in printed
    assert 34e9 < total < 36e9 and 3e9 < active < 4e9  # "35B-A3B"
    q4km = 2 * I * H * 144 / 256 + H * I * 210 / 256
    assert f"bytes per expert: {expert * 2 / 2**20:.1f} MiB bf16, {q4km / 2**20:.1f} MiB Q4_K_M" in printed


def test_state_per_sequence_is_counted(printed):
    recurrent = LINEAR * (3 * 8192 * 2 + 32 * 128 * 128 * 4)  # conv state bf16 + fp32 recurrent state
    kv_1k = FULL * 2 * 2 * 256 * 1000 * 2
    assert f"recurrent state {recurrent / 2**20:.1f} MiB" in printed
    assert f"KV {kv_1k / 2**20:.1f} MiB per 1k tokens" in printed


def test_budget_table_fractions(printed):
    resident, expert = by_hand()
    state = LINEAR * (3 * 8192 * 2 + 32 * 128 * 128 * 4) + FULL * 2 * 2 * 256 * 4096 * 2
    rows = {int(m[1]): (int(m[2]), int(m[3])) for m in re.finditer(r"^\s+(\d+) GiB\s+(\d+)%\s+(\d+)%$", printed, re.M)}
    assert sorted(rows) == [8, 10, 12]
    for gib, (bf16, q4) in rows.items():
        fits = (gib * 2**30 - 2 * resident - state) // (2 * expert) / (L * E)
        assert bf16 == round(100 * fits)
        assert 0 < bf16 < q4 < 100
