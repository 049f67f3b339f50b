"""A transformers checkpoint loaded offloaded (`from_pretrained`) generates the resident model's
greedy tokens, first call included, with the dynamic and the static cache (CPU)."""

from __future__ import annotations

import pytest
import torch

import offload_compiler
from tests.common import prefetch_options

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama saved as transformers saves it, and that model (the reference)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    reference = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama")
    reference.save_pretrained(path)
    return path, reference


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_tokens_equal_the_resident_model(checkpoint, cache):
    path, reference = checkpoint
    options = prefetch_options(2, 1, 1)
    model = offload_compiler.from_pretrained(path, options, "cpu")
    model.forward = torch.compile(model.forward, backend="offload", options=options)
    ids = torch.randint(0, 128, (1, 8))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": cache}
    with torch.no_grad():
        got = model.generate(ids, **kwargs)
        expected = reference.generate(ids, **kwargs)
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    (stack,) = offload_compiler.offloaded_stacks(model)
    assert stack.layers == (1, 3)  # the compiled forward read offloaded layers


def test_transformers_compile_config_path_generates_the_resident_tokens(checkpoint):
    """transformers' own compile path: `from_pretrained` names the offload backend in
    ``generation_config.compile_config``, and a plain ``generate`` with the static cache compiles
    the decode step with it (the prefill runs eagerly, reading the offloaded weights in place)."""
    path, reference = checkpoint
    options = prefetch_options(2, 1, 1)
    model = offload_compiler.from_pretrained(path, options, "cpu")
    config = model.generation_config.compile_config
    assert (config.backend, config.mode) == ("offload", None)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    ids = torch.randint(0, 128, (1, 8))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": "static"}
    with torch.no_grad():
        got = model.generate(ids, **kwargs)
        expected = reference.generate(ids, **kwargs)
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    (stack,) = offload_compiler.offloaded_stacks(model)  # the decode step ran compiled
    assert stack.layers == (1, 3)


def test_a_budget_places_a_transformers_checkpoint_and_generates_the_resident_tokens(checkpoint):
    path, reference = checkpoint
    total = sum(p.nbytes for p in reference.parameters())
    options = {"gpu_memory_budget": int(total * 0.75), "plan_tokens": (1, 8)}
    model = offload_compiler.from_pretrained(path, options, "cpu")
    model.forward = torch.compile(model.forward, backend="offload", options=options)
    ids = torch.randint(0, 128, (1, 8))
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        got = model.generate(ids, **kwargs)
        expected = reference.generate(ids, **kwargs)
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    (stack,) = offload_compiler.offloaded_stacks(model)
    assert 0 < len(stack.layers) < 4 and stack.layers[-1] == 3
