"""Safetensors files: finding a checkpoint's files, checking their headers, reading bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from offload_compiler.safetensors_files import (
    CheckpointError,
    checkpoint_files,
    read_gbps,
    read_index,
)


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a.weight": torch.randn(64, 32), "b.bias": torch.randn(7).to(torch.bfloat16)}


def test_the_index_gives_each_tensor_its_file_dtype_shape_and_bytes(tmp_path):
    tensors = _tensors()
    save_file({"a.weight": tensors["a.weight"]}, tmp_path / "one.safetensors")
    save_file({"b.bias": tensors["b.bias"]}, tmp_path / "two.safetensors")
    weight_map = {"a.weight": "one.safetensors", "b.bias": "two.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    stored = read_index(checkpoint_files(tmp_path))
    assert stored["a.weight"].file.name == "one.safetensors"
    assert (stored["b.bias"].dtype, stored["b.bias"].shape) == (torch.bfloat16, (7,))
    raw = (tmp_path / "one.safetensors").read_bytes()
    entry = stored["a.weight"]
    assert raw[entry.offset : entry.offset + entry.nbytes] == tensors["a.weight"].numpy().tobytes()
    assert read_gbps(checkpoint_files(tmp_path)) > 0


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "gone.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"gone\.safetensors"):
        checkpoint_files(tmp_path)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_a_truncated_or_corrupt_file_is_named(tmp_path, cut):
    file = tmp_path / "model.safetensors"
    save_file(_tensors(), file)
    raw = file.read_bytes()
    file.write_bytes(raw[:-100] if cut == "data" else raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        read_index(checkpoint_files(tmp_path))


def test_a_directory_without_a_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no safetensors checkpoint"):
        checkpoint_files(tmp_path)
