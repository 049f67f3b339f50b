"""The user's journey end to end: a checkpoint on disk, loaded offloaded, generating text.

Run ``python -m offload_compiler.demo`` (``--help`` lists the knobs; it needs transformers).
Without ``--checkpoint`` it first writes a random-weight Llama checkpoint (safetensors shards,
as ``save_pretrained`` writes them) under ``--cache-dir``, once. Then it:

  1. loads the checkpoint straight into its offloaded placement (`from_pretrained`: offloaded
     layers into pinned host memory, the rest to the device) and compares the load's speed
     with a plain read of the same files;
  2. compiles the model's forward with ``backend="offload"`` and generates greedily;
  3. loads the same checkpoint whole onto the device (transformers' ``from_pretrained``),
     compiles it with plain ``torch.compile`` and generates from the same prompt;
  4. checks that both produced the same tokens, and prints tokens/s, the GPU memory the
     offloading saved and the host memory it used.

On a CUDA machine the default model is ~1.8 GB in bf16; on a CPU-only machine a small fp32
one, where offloading runs with synchronous copies (a correctness check). Exits with status 1
if the tokens differ.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .loading import from_pretrained
from .runtime.registry import offloaded_stacks
from .safetensors_files import checkpoint_files, read_gbps

log = logging.getLogger("offload_compiler.demo")

# Llama shapes per device. CUDA: 16 x 90 MiB layers + 2 x 125 MiB embedding/head = 1.77 GB bf16.
_PRESETS: dict[str, dict[str, int]] = {
    "cuda": {"num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 5632,
             "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000},
    "cpu": {"num_hidden_layers": 8, "hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024},
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m offload_compiler.demo", description=__doc__)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--checkpoint", type=Path, help="a transformers checkpoint directory")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/offload_compiler")
    parser.add_argument("--layers", type=int, help="layers of the written checkpoint")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--group", type=int, default=2, help="offload_group_size (2)")
    parser.add_argument("--num-in-group", type=int, default=1, help="offload_num_in_group (1)")
    parser.add_argument("--prefetch-step", type=int, default=1, help="offload_prefetch_step (1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build or machine has no CUDA GPU")
    if min(args.prompt_tokens, args.new_tokens, args.layers or 1) < 1:
        parser.error("--prompt-tokens, --new-tokens and --layers must be >= 1")
    return args


def write_checkpoint(args: argparse.Namespace, dtype: torch.dtype) -> Path:
    """A random-weight Llama checkpoint under ``args.cache_dir``, written on first use."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(_PRESETS[args.device])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    key = hashlib.sha256(json.dumps([shape, str(dtype), args.seed]).encode()).hexdigest()[:12]
    path = args.cache_dir / f"llama-{key}"
    if (path / "config.json").is_file():
        return path
    log.info("writing a random-weight checkpoint to %s", path)
    torch.manual_seed(args.seed)
    config = LlamaConfig(**shape, max_position_embeddings=4096, dtype=dtype)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path, max_shard_size="500MB")
    return path


def generate(
    model: nn.Module, ids: torch.Tensor, new_tokens: int, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Greedy tokens and tokens/s over the decode (the first call, which compiles, excluded:
    it is timed from the second new token on)."""
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "min_new_tokens": new_tokens}
    with torch.no_grad():
        tokens = model.generate(ids, **kwargs)  # compiles, and the tokens to check
        _sync(device)
        begin = time.perf_counter()
        model.generate(ids, **kwargs)
        _sync(device)
    return tokens.cpu(), new_tokens / (time.perf_counter() - begin)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    path = args.checkpoint or write_checkpoint(args, dtype)
    options = {
        "prefetch": {
            "offload_group_size": args.group,
            "offload_num_in_group": args.num_in_group,
            "offload_prefetch_step": args.prefetch_step,
        }
    }
    read = read_gbps(checkpoint_files(path))
    base = _allocated(device)
    report: dict[str, float] = {}
    model = from_pretrained(path, options, device, dtype, report=report)
    model.forward = torch.compile(model.forward, backend="offload", options=options)
    torch.manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), device=device)
    got, offloaded_tps = generate(model, ids, args.new_tokens, device)
    offloaded_gpu = _allocated(device) - base
    (stack,) = offloaded_stacks(model)
    del model
    torch._dynamo.reset()
    gc.collect()

    from transformers import AutoModelForCausalLM

    base = _allocated(device)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    reference.forward = torch.compile(reference.forward)
    expected, resident_tps = generate(reference, ids, args.new_tokens, device)
    resident_gpu = _allocated(device) - base

    same = torch.equal(got, expected)
    lines = [
        "",
        "offload_compiler demo",
        f"  device:      {torch.cuda.get_device_name(device) if cuda else 'CPU, no GPU'}, "
        f"torch {torch.__version__}",
        f"  checkpoint:  {path} ({report['bytes'] / 2**20:,.1f} MiB, {dtype})",
        f"  load:        {report['GBps']:.2f} GB/s offloaded placement; plain read of the "
        f"files {read:.2f} GB/s",
        f"  offloaded:   layers {','.join(map(str, stack.layers))} of {stack.layers_path}, "
        f"{_mib(stack.host_bytes)} in {'pinned ' if cuda else ''}host memory, slots "
        f"{_mib(stack.slot_bytes)}",
        f"  host memory: +{_mib(report['host_peak_bytes'])} at the load's peak",
    ]
    if cuda:
        lines.append(
            f"  GPU memory:  {_mib(offloaded_gpu)} offloaded against {_mib(resident_gpu)} "
            f"resident: {_mib(resident_gpu - offloaded_gpu)} saved"
        )
    lines += [
        f"  generate:    {args.prompt_tokens} prompt tokens, {args.new_tokens} new, greedy: "
        f"{offloaded_tps:.1f} tokens/s offloaded, {resident_tps:.1f} resident",
        f"  tokens:      {'equal' if same else 'DIFFERENT'} to the resident model's",
    ]
    print("\n".join(lines), flush=True)
    if not same:
        print(f"error: tokens differ: {got.tolist()} vs {expected.tolist()}", file=sys.stderr)
        return 1
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    _sync(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


if __name__ == "__main__":
    raise SystemExit(main())
