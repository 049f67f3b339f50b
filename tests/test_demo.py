"""The README's main command, ``python -m offload_compiler.demo``, on a CPU-only machine: a
checkpoint written, loaded offloaded, generating the resident model's tokens."""

from __future__ import annotations

import pytest
import torch

from offload_compiler import demo

pytest.importorskip("transformers")


def _small(tmp_path) -> list[str]:
    return ["--device", "cpu", "--layers", "2", "--prompt-tokens", "8", "--new-tokens", "4",
            "--cache-dir", str(tmp_path)]  # fmt: skip


def test_demo_generates_the_resident_models_tokens_from_its_checkpoint(tmp_path, capsys):
    assert demo.main(_small(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "tokens:      equal to the resident model's" in out
    assert "offloaded:   layers 1 of model.layers" in out  # group 2: the last of each
    (written,) = tmp_path.iterdir()
    assert (written / "config.json").is_file()
    # a given checkpoint is used as it is, nothing written
    assert demo.main([*_small(tmp_path), "--checkpoint", str(written)]) == 0
    assert list(tmp_path.iterdir()) == [written]


def test_demo_fails_when_the_tokens_differ(tmp_path, monkeypatch, capsys):
    """The check can fail: a model whose weights drift after loading generates other tokens."""
    load = demo.from_pretrained

    def load_and_perturb(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(-50.0)
        return model

    monkeypatch.setattr(demo, "from_pretrained", load_and_perturb)
    assert demo.main(_small(tmp_path)) == 1
    assert "DIFFERENT" in capsys.readouterr().out
