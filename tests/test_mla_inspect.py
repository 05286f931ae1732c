"""`moepage inspect` on directories holding only DeepSeek-V3's and Kimi K2's config.json (tests/data/deepseek_v3,
tests/data/kimi_k2, written by hand from the published files): parameter counts (671 B / 37 B active; 1.03 T /
33 B active), the MLA latent cache per 1k tokens (576 values a token and layer) and the budget table at 16, 32 and
64 GiB, each worked out here by hand."""
from __future__ import annotations

import contextlib
import io
import os
import re

import pytest

from moepage.cli import main as cli_main

DATA = os.path.join(os.path.dirname(__file__), "data")
H, C, DR, DN, DV, RQ, I, F = 7168, 512, 64, 128, 128, 1536, 2048, 18432
MODELS = {  # vocab, layers, dense layers, heads, experts, total / active (B) as published
    "deepseek_v3": dict(V=129280, L=61, dense=3, N=128, E=256, total=671.0, active=37.0),
    "kimi_k2": dict(V=163840, L=61, dense=1, N=64, E=384, total=1026.0, active=32.0),
}


def by_hand(m):
    attn = RQ * H + RQ + m["N"] * (DN + DR) * RQ + (C + DR) * H + C + m["N"] * (DN + DV) * C + H * m["N"] * DV
    moe = m["L"] - m["dense"]
    resident = 2 * m["V"] * H + H + m["L"] * (attn + 2 * H) + m["dense"] * 3 * F * H \
        + moe * (m["E"] * H + m["E"] + 3 * I * H)  # router, correction bias, one shared expert
    return resident, 3 * H * I, moe * m["E"]


def resident_bytes_by_hand(m, resident):
    """bf16, but float32 where the engine holds it so: kv_b (the absorbed decode's matrix) and the float32-logits
    router with its correction bias."""
    float32 = m["L"] * m["N"] * (DN + DV) * C + (m["L"] - m["dense"]) * (m["E"] * H + m["E"])
    return 2 * resident + 2 * float32


def inspect(name):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["inspect", os.path.join(DATA, name)]) == 0
    return out.getvalue()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameters_latent_cache_and_budget_table(name):
    m, printed = MODELS[name], inspect(name)
    resident, expert, experts = by_hand(m)
    total, active = resident + experts * expert, resident + (m["L"] - m["dense"]) * 8 * expert
    assert f"{total / 1e9:.2f} B total" in printed and f"{active / 1e9:.2f} B active" in printed
    assert abs(total / 1e9 - m["total"]) / m["total"] < 0.01 and abs(active / 1e9 - m["active"]) < 1.0
    latent_1k = m["L"] * (C + DR) * 2 * 1000  # bf16 latent + rope key, per layer and token
    assert f"latent KV {latent_1k / 2**20:.1f} MiB per 1k tokens ({m['L']} MLA layers x 576 values" in printed
    rows = {int(r[1]): (int(r[2]), int(r[3])) for r in re.finditer(r"^\s+(\d+) GiB\s+(\d+)%\s+(\d+)%$", printed,
                                                                     re.M)}
    assert sorted(rows) == [16, 32, 64]
    state = m["L"] * (C + DR) * 2 * 4096
    for gib, (bf16, q4) in rows.items():
        fits = max(0, (gib * 2**30 - resident_bytes_by_hand(m, resident) - state) // (2 * expert)) / experts
        assert bf16 == round(100 * fits)
        assert bf16 < q4 < 100
