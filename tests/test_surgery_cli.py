"""`moepage profile | extract | prune | publish` end to end through the CLI (no network: publish is faked)."""
from __future__ import annotations

import json

import pytest

from moepage.cli import main
from moepage.surgery.publish import publish

CODE = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 4
PROSE = "Once upon a time a small fox lived by the river and watched the boats go by.\n" * 4


@pytest.fixture(scope="module")
def profiled(checkpoints, tmp_path_factory):
    model = checkpoints("qwen3_moe")
    d = tmp_path_factory.mktemp("cli")
    (d / "code").mkdir()
    (d / "code" / "a.py").write_text(CODE)
    (d / "code" / "b.py").write_text(CODE[::-1])
    (d / "prose.txt").write_text(PROSE)
    out = d / "prof.json"
    rc = main(["profile", str(model), "--domain", f"code={d / 'code'}", "--domain", f"prose={d / 'prose.txt'}",
               "-o", str(out), "--max-seq", "32", "--max-tokens", "128"])
    assert rc == 0
    return model, d, out


def test_profile_cli_writes_json_and_png(profiled, capsys):
    model, d, out = profiled
    prof = json.loads(out.read_text())
    assert sorted(prof["domains"]) == ["code", "prose"]
    used = prof["domains"]["code"]["sources"]  # in path order, and only as far as the 128-token cap needed
    assert 1 <= len(used) <= 2 and all(s["path"].endswith(n) for s, n in zip(used, ["a.py", "b.py"]))
    assert all(prof["domains"][n]["tokens"] <= 128 for n in prof["domains"])
    png = d / "prof.png"  # matplotlib is a test dependency: the heatmap must be there
    assert png.is_file(), "profile did not write its heatmap PNG"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert min(matplotlib.image.imread(str(png)).shape[:2]) > 50  # a decodable image, not just a header


def test_profile_cli_bad_domain_spec(profiled, capsys):
    model, d, _ = profiled
    assert main(["profile", str(model), "--domain", "nofile", "-o", str(d / "x.json")]) == 2
    assert "NAME=FILE" in capsys.readouterr().err
    assert main(["profile", str(model), "--domain", f"code={d / 'missing.py'}", "-o", str(d / "x.json")]) == 2
    assert "no such text file" in capsys.readouterr().err


def test_extract_prune_publish_cli(profiled, tmp_path, capsys, monkeypatch):
    model, _, prof = profiled
    out = tmp_path / "code4"
    held_out = tmp_path / "held_out.py"
    held_out.write_text(CODE[:120])
    assert main(["extract", str(model), str(out), "--profile", str(prof), "--domain", "code", "--keep", "4",
                 "--eval", str(held_out)]) == 0
    assert "experts per layer" in capsys.readouterr().out
    assert "| base | held_out.py |" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    assert main(["extract", str(model), str(tmp_path / "d"), "--profile", str(prof), "--domain", "code", "--keep", "2",
                 "--dense"]) == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == "qwen3"
    assert main(["extract", str(model), str(tmp_path / "e"), "--profile", str(prof), "--domain", "math", "--keep", "2"]) == 2
    assert "unknown domain 'math'" in capsys.readouterr().err
    assert main(["prune", str(model), str(tmp_path / "p"), "--profile", str(prof), "--ratio", "0.25"]) == 0
    assert "2 experts per layer" in capsys.readouterr().out

    # publish --dry-run lists the files and never touches the network
    def no_network(*a, **k):
        raise AssertionError("network used in a dry run")

    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", no_network)
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", no_network)
    assert main(["publish", str(out), "--repo-id", "me/toy-code-4e", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    for f in ("config.json", "model.safetensors", "README.md", "tokenizer.json", "moepage_surgery.json"):
        assert f"  {f}  " in listing
    assert main(["publish", str(out), "--repo-id", "not a repo", "--dry-run"]) == 2


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return "https://huggingface.co/me/toy/commit/abc"


def test_publish_uploads_through_the_api(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "junk").write_text("x")
    api = FakeApi()
    r = publish(str(tmp_path), "me/toy", api=api, private=True)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is True and api.calls[1][1]["repo_id"] == "me/toy"
    assert [f for f, _ in r["files"]] == ["config.json", "model.safetensors"]
    assert "no README.md model card (moepage extract/prune write one)" in r["warnings"]
    assert r["url"].endswith("abc")
    with pytest.raises(ValueError, match="no config.json"):
        publish(str(tmp_path / ".cache"), "me/toy", dry_run=True)


def test_dense_eval_scores_the_dense_model(profiled, tmp_path):
    """`extract --dense --eval`: the card's perplexity of the dense result equals transformers' on the same tokens."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from moepage.engine.tokenizer import Tokenizer

    model, _, prof = profiled
    held = tmp_path / "held.py"
    held.write_text(CODE)
    out = tmp_path / "dense"
    assert main(["extract", str(model), str(out), "--profile", str(prof), "--domain", "code", "--keep", "2", "--dense",
                 "--eval", str(held)]) == 0
    record = json.loads((out / "moepage_surgery.json").read_text())
    base, new = record["quality"]["rows"]
    assert base["model"] == "base" and base["scored_by"] == "moepage engine (fp32)"
    assert new["model"] == record["name"] and new["scored_by"].startswith("moepage dense forward")
    ids = Tokenizer.from_dir(str(out)).encode(CODE)
    assert new["tokens"] == base["tokens"] == len(ids) - 1
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(torch.tensor([ids])).logits[0]
    want = math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert abs(new["perplexity"] - want) / want < 1e-4, (new["perplexity"], want)
    card = (out / "README.md").read_text()
    assert f"| {record['name']} | held.py | {len(ids) - 1} |" in card and "| base | held.py |" in card
