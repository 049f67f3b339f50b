"""Real transformers models, untouched, built from small configs with random weights.

Each is compiled with the offload backend and compared with the same model compiled by plain
Inductor over several calls (the first one included).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _llama():
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config), "model.layers"


def _gpt2():
    config = transformers.GPT2Config(
        n_embd=64,
        n_layer=4,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config), "transformer.h"


def _mixtral():
    config = transformers.MixtralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return transformers.MixtralForCausalLM(config), "model.layers"


@pytest.mark.parametrize(
    ("build", "prefetch"),
    [
        (_llama, {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1}),
        (_gpt2, {"offload_group_size": 1, "offload_num_in_group": 1, "offload_prefetch_step": 2}),
        (
            _mixtral,
            {
                "offload_group_size": 1,
                "offload_num_in_group": 1,
                "offload_prefetch_step": 2,
                "offload_params": ["experts"],
            },
        ),
    ],
    ids=["llama", "gpt2", "mixtral-experts"],
)
def test_real_model_equals_inductor(build, prefetch, caplog):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model, layers_path = build()
    model.eval()
    reference = torch.compile(copy.deepcopy(model))
    compiled = torch.compile(model, backend="offload", options={"prefetch": prefetch})
    with caplog.at_level(logging.INFO, logger="offload_compiler"), torch.no_grad():
        for _ in range(3):
            ids = torch.randint(0, VOCAB, (2, 16))
            got = compiled(ids, use_cache=False).logits
            expected = reference(ids, use_cache=False).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    summaries = [r.getMessage() for r in caplog.records if "layers offloaded" in r.getMessage()]
    assert summaries and summaries[0].startswith(f"offload: {layers_path}: ")
    torch._dynamo.reset()
