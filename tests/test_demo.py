"""The README's first command, ``python -m offload_compiler.demo``, on a CPU-only machine."""

from __future__ import annotations

import pytest
import torch

from offload_compiler import demo

SMALL = ["--device", "cpu", "--layers", "4", "--tokens", "8", "--iters", "1"]


def test_demo_checks_the_offloaded_model_against_the_resident_one(capsys):
    assert demo.main(SMALL) == 0
    out = capsys.readouterr().out
    assert "output matches: yes" in out
    assert "in layers 1,3;" in out  # group 2, the last of each offloaded


def test_demo_fails_when_the_outputs_differ(monkeypatch, capsys):
    """The check can fail: outputs of a model whose weights drift after placing differ."""
    place = demo.place_model

    def place_and_perturb(model, options, device):
        place(model, options, device)
        with torch.no_grad():
            next(model.layers[1].parameters()).add_(1.0)

    monkeypatch.setattr(demo, "place_model", place_and_perturb)
    assert demo.main(SMALL) == 1
    assert "output matches: no" in capsys.readouterr().out


def test_demo_refuses_bad_flags_before_building_a_model():
    with pytest.raises(SystemExit):
        demo.main([*SMALL, "--group", "2", "--num-in-group", "3"])
    with pytest.raises(SystemExit):
        demo.main(["--device", "cpu", "--mode", "reduce-overhead"])
