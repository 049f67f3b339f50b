"""Models with several stacks of blocks (encoder-decoder transformers, Flux): every stack is
offloaded, the offloaded layers form one ring in execution order, and the compiled model equals
plain Inductor on every call, the first included (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

import offload_compiler

transformers = pytest.importorskip("transformers")

OPTIONS = {"prefetch": {"offload_group_size": 2, "offload_num_in_group": 1,
                        "offload_prefetch_step": 2}}  # fmt: skip


def _t5():
    config = transformers.T5Config(
        vocab_size=96,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(config).eval()


def _whisper():
    config = transformers.WhisperConfig(
        vocab_size=96,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=32,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=0,
    )
    return transformers.WhisperForConditionalGeneration(config).eval()


def _check_every_call(model, reference, make_inputs, output, stack_name, names):
    compiled = torch.compile(model, backend="offload", options=OPTIONS)
    with torch.no_grad():
        for _ in range(3):
            inputs = make_inputs()
            got, expected = output(compiled(**inputs)), output(reference(**inputs))
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    (stack,) = offload_compiler.offloaded_stacks(model)
    assert (stack.layers_path, stack.layer_names) == (stack_name, names)


@pytest.mark.parametrize("model_name", ["t5", "whisper"])
def test_encoder_decoder_stacks_offloaded_equal_inductor_on_every_call(model_name):
    torch.manual_seed(0)
    torch._dynamo.reset()
    if model_name == "t5":
        model = _t5()

        def make_inputs():
            return {
                "input_ids": torch.randint(2, 96, (2, 10)),
                "decoder_input_ids": torch.randint(2, 96, (2, 5)),
            }

        name = "encoder.block+decoder.block"
        names = ("encoder.block.1", "decoder.block.0", "decoder.block.2")
    else:
        model = _whisper()

        def make_inputs():
            return {
                "input_features": torch.randn(2, 8, 32),
                "decoder_input_ids": torch.randint(2, 96, (2, 5)),
            }

        name = "model.encoder.layers+model.decoder.layers"
        names = ("model.encoder.layers.1", "model.decoder.layers.0", "model.decoder.layers.2")
    reference = torch.compile(copy.deepcopy(model))
    _check_every_call(model, reference, make_inputs, lambda out: out.logits, name, names)
    torch._dynamo.reset()


def test_t5_generate_with_both_stacks_offloaded_gives_the_resident_tokens():
    """generate() runs the encoder once and the decoder per token; both compiled, placed first so
    that the encoder's graph and the decoder's share one ring."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _t5()
    reference = copy.deepcopy(model)
    offload_compiler.place_model(model, OPTIONS, "cpu")
    model.forward = torch.compile(model.forward, backend="offload", options=OPTIONS)
    encoder = model.get_encoder()
    encoder.forward = torch.compile(encoder.forward, backend="offload", options=OPTIONS)
    ids = torch.randint(2, 96, (2, 10))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "min_new_tokens": 6,
              "output_scores": True, "return_dict_in_generate": True}  # fmt: skip
    with torch.no_grad():
        got = model.generate(ids, **kwargs)
        expected = reference.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    # the scores too: a tiny random T5's greedy tokens can survive wrong weights
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-4, atol=1e-4)
    (stack,) = offload_compiler.offloaded_stacks(model)
    assert stack.layer_names == ("encoder.block.1", "decoder.block.0", "decoder.block.2")
    torch._dynamo.reset()


def test_flux_transformer_both_block_lists_offloaded_equal_inductor_on_every_call():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    reference = torch.compile(copy.deepcopy(model))

    def make_inputs():
        return {
            "hidden_states": torch.randn(1, 16, 8),
            "encoder_hidden_states": torch.randn(1, 6, 16),
            "pooled_projections": torch.randn(1, 16),
            "timestep": torch.rand(1),
            "img_ids": torch.randint(0, 4, (16, 3)).float(),
            "txt_ids": torch.zeros(6, 3),
            "return_dict": False,
        }

    _check_every_call(
        model,
        reference,
        make_inputs,
        lambda out: out[0],
        "transformer_blocks+single_transformer_blocks",
        ("transformer_blocks.1", "single_transformer_blocks.1"),
    )
    torch._dynamo.reset()


def test_a_part_compiled_before_its_model_is_placed_is_refused_when_the_model_compiles():
    """A part compiled on its own (an encoder) claims the stacks it holds; the whole model's
    stacks would share their blocks, which is refused with the advice to place it first."""
    from tests.models import BiasBlock, TwoStacks

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.part = TwoStacks(encoder=2, decoder=2)
            self.head = torch.nn.ModuleList(BiasBlock(8) for _ in range(2))

        def forward(self, x):
            x = self.part(x)
            for block in self.head:
                x = block(x)
            return x

    torch._dynamo.reset()
    model = Outer()
    options = {"prefetch": {"offload_group_size": 1, "offload_num_in_group": 1}}
    with torch.no_grad():
        torch.compile(model.part, backend="offload", options=options)(torch.randn(2, 8))
        with pytest.raises(Exception, match=r"part\.encoder\+part\.decoder\+head shares blocks"):
            torch.compile(model, backend="offload", options=options)(torch.randn(2, 8))
    torch._dynamo.reset()
