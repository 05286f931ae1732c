"""gpt-oss's routed experts paged from the published fused layout (float, and MXFP4 kept as MXFP4): each expert read
as its own slices, computed as transformers' GptOssExperts computes it, held and counted at its stored size; bad
headers refused with the tensor named.

Shape legend: t tokens, H hidden, E experts.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt_oss_support import reference, save_gpt_oss
from moepage.engine.gpt_oss_expert import ClampedSwiGLU, fused_expert_loader
from moepage.kernels.mxfp4 import Mxfp4Tensor
from moepage.paging.fused_experts import FusedExpertSource
from moepage.paging.safetensors_file import CheckpointError, SafetensorsFile
from moepage.paging.sources import TensorIndex


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_experts")
    return {"float": save_gpt_oss(root / "float"), "mxfp4": save_gpt_oss(root / "mxfp4", mxfp4_experts=True)}


def open_source(path) -> tuple[FusedExpertSource, dict]:
    cfg = json.loads((path / "config.json").read_text())
    index = TensorIndex([SafetensorsFile(str(path / "model.safetensors"))])
    src = FusedExpertSource(index)
    H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    src.expect({"gate": (I, H), "up": (I, H), "down": (H, I)}, list(range(cfg["num_hidden_layers"])), E)
    return src, cfg


def transformers_expert(model, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    """x [t, H] through one expert of transformers' GptOssExperts (every token routed to it with weight 1)."""
    experts = model.model.layers[layer].mlp.experts
    idx = torch.full((x.shape[0], 1), expert)
    return experts(x, idx, torch.ones(x.shape[0], 1, dtype=x.dtype))


@pytest.mark.parametrize("kind", ["float", "mxfp4"])
def test_each_expert_computes_what_transformers_does(checkpoints, kind):
    path = checkpoints[kind]
    src, cfg = open_source(path)
    model = reference(path)
    load, nbytes_of, _ = fused_expert_loader(src, list(range(cfg["num_hidden_layers"])),
                                             ClampedSwiGLU(cfg["swiglu_alpha"], cfg["swiglu_limit"]), torch.float32,
                                             "cpu")
    x = torch.randn(5, cfg["hidden_size"], generator=torch.Generator().manual_seed(3)) * 2
    for layer in range(cfg["num_hidden_layers"]):
        for e in (0, cfg["num_local_experts"] - 1):
            ex = load(layer, e)
            assert ex.w.mxfp4 == (kind == "mxfp4") and ex.nbytes == nbytes_of(layer)
            with torch.no_grad():
                want = transformers_expert(model, layer, e, x)
            got = ex.compute(x)
            if kind == "float":
                assert torch.equal(got, want)  # the same ops on the same tensors
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mxfp4_experts_are_held_and_counted_as_mxfp4(checkpoints):
    src, cfg = open_source(checkpoints["mxfp4"])
    H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    w = src.read_fused(0, 3)
    assert isinstance(w.gate_up, Mxfp4Tensor) and w.gate_up.shape == (2 * I, H)
    assert isinstance(w.down_proj, Mxfp4Tensor) and w.down_proj.shape == (H, I)
    weights = 3 * H * I
    biases = (2 * I + H) * 4  # float32 biases in this checkpoint
    assert src.stored_nbytes(0) == weights * 17 // 32 + biases == w.nbytes  # 4.25 bits a weight
    float_src, _ = open_source(checkpoints["float"])
    assert float_src.stored_nbytes(0) == weights * 4 + biases
    # read() gives the canonical float gate/up/down of the same expert, for tools
    canon = src.read(0, 3)
    gate_up, down = w.matrices()
    assert torch.equal(canon.gate, gate_up[0::2]) and torch.equal(canon.up, gate_up[1::2])
    assert torch.equal(canon.down, down) and canon.gate.shape == (I, H)


def rewrite(path, change):
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update({"model.layers.1.mlp.experts.down_proj_blocks":
                         t["model.layers.1.mlp.experts.down_proj_blocks"][:, :, :1].contiguous()}),
     r"down_proj_blocks.*shape"),
    (lambda t: t.update({"model.layers.0.mlp.experts.gate_up_proj_scales":
                         t["model.layers.0.mlp.experts.gate_up_proj_scales"].float()}), "not uint8 MXFP4 bytes"),
    (lambda t: t.pop("model.layers.2.mlp.experts.down_proj_bias"), "down_proj_bias.*missing"),
])
def test_bad_expert_headers_are_refused_naming_the_tensor(tmp_path, change, match):
    path = save_gpt_oss(tmp_path / "m", mxfp4_experts=True, num_hidden_layers=3)
    rewrite(path, change)
    with pytest.raises(CheckpointError, match=match):
        open_source(path)
