"""Text generation from a checkpoint on disk: the offloaded model against its bound and a peer.

    python -m benchmarks.generate_bench --out DIR             # CUDA: Llama-3-8B shape, 32 layers
    python -m benchmarks.generate_bench --smoke --out DIR     # tiny CPU run (CI)

The user's journey, each phase in a fresh process (peaks and caches start clean):

  write       a random-weight Llama checkpoint (config.json, safetensors shards and their
              index, as ``save_pretrained`` lays them out), under ``--checkpoint``, once;
  resident    the whole model on the device, no memory cap: the reference tokens, and its speed;
  offload     `offload_compiler.from_pretrained` under the cap (``--budget-gib``, through
              ``torch.cuda.set_per_process_memory_fraction``), then generate, for each path:
              ``hand`` (the forward compiled with ``backend="offload"``, prefill included) and
              ``generate`` (transformers compiles the decode step itself through the
              ``compile_config`` that `from_pretrained` sets; the prefill runs eagerly);
  accelerate  transformers + accelerate ``from_pretrained(device_map="auto", max_memory=...)``
              under the same cap, generating from the same prompt (GPU only).

Greedy decoding with the static cache. Prefill and decode are timed apart by a streamer that
syncs the device as each token arrives: prefill is prompt to first new token, decode the mean
over the tokens after it. The decode bound is the copy floor of one forward's offloaded host
tensors (the same pinned tensors, copied back to back, measured in the same process), since a
decode step's resident compute is far below its copies. Writes ``results.json`` and
``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.timing import copy_floor_ms, h2d_gbps, sync

LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "num_hidden_layers": 32,
}
SMOKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "num_hidden_layers": 4,
}
SHARD_BYTES = 2 * 10**9


# --- phases, each in its own process ---------------------------------------------------------


def write_checkpoint(spec: dict) -> dict:
    """Random bf16 (GPU) or fp32 (CPU) weights: norms 1, matrices N(0, 0.02), drawn on the
    device (drawing 8B numbers on a few CPU cores takes minutes) and written shard by shard."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    path, device = Path(spec["checkpoint"]), torch.device(spec["device"])
    if (path / "config.json").is_file():
        return {"written": False}
    path.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, spec["dtype"])
    config = LlamaConfig(**spec["shape"], max_position_embeddings=4096, tie_word_embeddings=False)
    config.dtype = dtype
    with torch.device("meta"):
        names = {k: (v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator(device).manual_seed(0)
    begin, shard, shard_bytes, weight_map, total = time.perf_counter(), {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for name, shape in names.items():
        if len(shape) == 1:
            value = torch.ones(shape, dtype=dtype)
        else:
            value = torch.randn(shape, generator=generator, device=device).mul_(0.02)
            value = value.to(dtype).cpu()
        shard[name], shard_bytes, total = value, shard_bytes + value.nbytes, total + value.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(path)
    return {"written": True, "bytes": total, "write_s": time.perf_counter() - begin}


class _TokenClock:
    """A generate streamer that records when each token arrives (device synced first)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, _: torch.Tensor) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def split(self) -> tuple[float, float]:
        """Prefill ms (prompt to first new token) and mean decode ms per token after it."""
        prompt, first, last = self.times[0], self.times[1], self.times[-1]
        decode = (last - first) * 1e3 / max(1, len(self.times) - 2)
        return (first - prompt) * 1e3, decode


def _generate(model, ids: torch.Tensor, spec: dict, new: int, **extra) -> tuple:
    """Greedy tokens, prefill ms and decode ms/token of one ``generate``."""
    clock = _TokenClock(ids.device)
    kwargs = {
        "max_new_tokens": new,
        "min_new_tokens": new,
        "do_sample": False,
        "attention_mask": torch.ones_like(ids),
        "streamer": clock,
        **extra,
    }
    with torch.no_grad():
        tokens = model.generate(ids, **kwargs)
    prefill, decode = clock.split()
    return tokens[0, ids.shape[1] :].tolist(), prefill, decode


def _prompt(spec: dict, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    vocab = spec["shape"]["vocab_size"]
    return torch.randint(0, vocab, (1, spec["prompt"]), generator=generator).to(device)


def _cap(spec: dict, device: torch.device) -> None:
    if device.type == "cuda" and spec.get("budget_gib"):
        total = torch.cuda.mem_get_info(device)[1]
        torch.cuda.set_per_process_memory_fraction(spec["budget_gib"] * 2**30 / total, device)


def _host_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _timed_runs(model, ids: torch.Tensor, spec: dict, **extra) -> dict:
    """One warm-up generate (compiles), then the timed one."""
    _generate(model, ids, spec, spec["new"], **extra)
    tokens, prefill, decode = _generate(model, ids, spec, spec["new"], **extra)
    return {"tokens": tokens, "prefill_ms": prefill, "decode_ms": decode}


def resident(spec: dict) -> dict:
    """The reference: the same path and Inductor mode without offloading."""
    from transformers import AutoModelForCausalLM, CompileConfig

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    placed = {"device_map": spec["device"]} if device.type == "cuda" else {}  # needs accelerate
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype, **placed).eval()
    ids = _prompt(spec, device)
    mode = None if spec["mode"] == "default" else spec["mode"]
    if spec["path"] == "hand":
        model.forward = torch.compile(model.forward, mode=mode)
        result = _timed_runs(model, ids, spec, cache_implementation="static", disable_compile=True)
    else:
        config = CompileConfig(mode=mode)
        config._compile_all_devices = device.type != "cuda"
        model.generation_config.compile_config = config
        result = _timed_runs(model, ids, spec, cache_implementation="static")
    cuda = device.type == "cuda"
    result["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device) if cuda else 0
    return {**result, "host_peak_bytes": _host_peak()}


def offload(spec: dict) -> dict:
    import offload_compiler
    from offload_compiler.safetensors_files import checkpoint_files, read_gbps

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    _cap(spec, device)
    options = {"prefetch": spec["prefetch"]}
    if spec["mode"] != "default":
        options["mode"] = spec["mode"]
    read = read_gbps(checkpoint_files(spec["checkpoint"]))
    report: dict[str, float] = {}
    model = offload_compiler.from_pretrained(spec["checkpoint"], options, device, dtype, report)
    ids = _prompt(spec, device)
    if spec["path"] == "hand":
        model.forward = torch.compile(model.forward, backend="offload", options=options)
        result = _timed_runs(model, ids, spec, cache_implementation="static", disable_compile=True)
    else:
        model.generation_config.compile_config._compile_all_devices = device.type != "cuda"
        result = _timed_runs(model, ids, spec, cache_implementation="static")
    stacks = offload_compiler.offloaded_stacks(model)
    hosts = [t for s in stacks for t in s.host_tensors]
    cuda = device.type == "cuda"
    return {
        **result,
        "load_s": report["seconds"],
        "load_GBps": report["GBps"],
        "read_GBps": read,
        "load_host_peak_bytes": report["host_peak_bytes"],
        "load_gpu_peak_bytes": report["gpu_peak_bytes"],
        "offloaded_bytes": sum(s.host_bytes for s in stacks),
        "slot_bytes": sum(s.slot_bytes for s in stacks),
        "offloaded_layers": [list(s.layers) for s in stacks],
        "bound_ms": copy_floor_ms(hosts, device) if hosts else None,
        "h2d_GBps": h2d_gbps(device) if cuda else None,
        "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else 0,
        "host_peak_bytes": _host_peak(),
    }


def accelerate(spec: dict) -> dict:
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    _cap(spec, device)
    begin = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        spec["checkpoint"],
        dtype=dtype,
        device_map="auto",
        max_memory={device.index or 0: f"{spec['budget_gib']}GiB", "cpu": "400GiB"},
    ).eval()
    load_s = time.perf_counter() - begin
    ids = _prompt(spec, device)
    tokens, prefill, decode = _generate(model, ids, spec, spec["peer_new"])
    placed = list(model.hf_device_map.values())
    return {
        "tokens": tokens,
        "prefill_ms": prefill,
        "decode_ms": decode,
        "load_s": load_s,
        "modules_on_cpu": sum(1 for d in placed if d == "cpu"),
        "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "host_peak_bytes": _host_peak(),
    }


PHASES = {"write": write_checkpoint, "resident": resident, "offload": offload}
PHASES["accelerate"] = accelerate
_RUNS = ("resident", "offload")  # per path and mode, the reference first


# --- the parent --------------------------------------------------------------------------------


def run_phase(spec: dict, out: Path, timeout: float) -> dict:
    """Run one phase in a fresh process; its result, or the error it ended with."""
    name = "-".join(str(spec[k]) for k in ("phase", "path", "mode") if k in spec)
    log = out / f"{name}.log"
    command = [sys.executable, "-m", "benchmarks.generate_bench", "--phase", json.dumps(spec)]
    begin = time.perf_counter()
    try:
        with log.open("w") as err:
            done = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout
            )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = log.read_text()[-2000:]
        return {**spec, "error": f"exit {done.returncode}: {tail}"}
    result = {**spec, **json.loads(lines[-1][7:]), "wall_s": time.perf_counter() - begin}
    print(f"{name}: done in {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return result


def markdown(results: list[dict], command: str) -> str:
    gib = 2**30
    refs = {
        (r["path"], r["mode"]): r for r in results if r["phase"] == "resident" and "error" not in r
    }
    first = results[0]
    lines = [
        f"`{command}`",
        "",
        f"{first['device_name']}, torch {first['torch']}; {first['shape']['num_hidden_layers']} "
        f"Llama layers (hidden {first['shape']['hidden_size']}), {first['dtype']}; prompt "
        f"{first['prompt']} tokens, {first['new']} new (peer: {first['peer_new']}), greedy, "
        f"static cache; memory cap {first.get('budget_gib') or 'none'} GiB.",
        "",
        "| run | load s (GB/s; raw read) | prefill ms | decode ms/token | bound ms | "
        "decode / bound | tokens/s | GPU peak GiB | host peak GiB | tokens equal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["phase"] == "write":
            continue
        name = " ".join(str(r[k]) for k in ("phase", "path", "mode") if k in r)
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'].splitlines()[-1][:120]} |")
            continue
        load = f"{r['load_s']:.1f}" if "load_s" in r else ""
        if "load_GBps" in r:
            load += f" ({r['load_GBps']:.2f}; {r['read_GBps']:.2f})"
        bound = r.get("bound_ms")
        against = f"{bound:.2f} | {r['decode_ms'] / bound:.3f}" if bound else " | "
        equal = ""
        ref = refs.get((r.get("path"), r.get("mode")), next(iter(refs.values()), None))
        if ref is not None and r is not ref:
            n = len(r["tokens"])
            same = r["tokens"] == ref["tokens"][:n]
            equal = f"{'yes' if same else 'NO'} ({n})"
        lines.append(
            f"| {name} | {load} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | "
            f"{against} | {1e3 / r['decode_ms']:.1f} | "
            f"{r.get('gpu_peak_reserved_bytes', 0) / gib:.2f} | "
            f"{r.get('host_peak_bytes', 0) / gib:.2f} | {equal} |"
        )
    offloaded = [r for r in results if "offloaded_layers" in r]
    for r in offloaded[:1]:
        lines += [
            "",
            f"Offloaded: layers {r['offloaded_layers']}, {r['offloaded_bytes'] / gib:.2f} GiB "
            f"in pinned host memory, slots {r['slot_bytes'] / gib:.2f} GiB; H2D "
            f"{r['h2d_GBps'] or 0:.1f} GB/s. The load's peaks: host "
            f"+{r['load_host_peak_bytes'] / gib:.2f} GiB, GPU {r['load_gpu_peak_bytes'] / gib:.2f} "
            "GiB allocated.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    parser.add_argument("--checkpoint", type=Path, help="where the checkpoint is (or goes)")
    parser.add_argument("--layers", type=int, help="layers (default 32; smoke 4)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128, help="new tokens")
    parser.add_argument("--peer-new", type=int, default=32, help="the peer's new tokens")
    parser.add_argument("--budget-gib", type=float, default=10.0, help="GPU memory cap")
    parser.add_argument("--config", default="2/1/1", help="group/num/step of the offloading")
    parser.add_argument("--paths", default="hand,generate", help="hand, generate or both")
    parser.add_argument("--modes", default="default", help="Inductor modes of the offload runs")
    parser.add_argument("--no-peer", action="store_true", help="skip the accelerate peer")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per phase")
    args = parser.parse_args(argv)
    if args.phase:
        spec = json.loads(args.phase)
        print("RESULT " + json.dumps(PHASES[spec["phase"]](spec)), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required")
    cuda = torch.cuda.is_available() and not args.smoke
    shape = dict(SMOKE if args.smoke else LLAMA_8B)
    shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
    if args.smoke:
        args.prompt, args.new, args.peer_new = min(args.prompt, 8), min(args.new, 6), 4
    dtype = "bfloat16" if cuda else "float32"
    checkpoint = args.checkpoint or Path.home() / ".cache/offload_compiler" / (
        f"generate-bench-{shape['num_hidden_layers']}x{shape['hidden_size']}-{dtype}"
    )
    group, num, step = (int(x) for x in args.config.split("/"))
    base = {
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "checkpoint": str(checkpoint),
        "shape": shape,
        "dtype": dtype,
        "prompt": args.prompt,
        "new": args.new,
        "peer_new": args.peer_new,
        "budget_gib": args.budget_gib if cuda else None,
        "prefetch": {
            "offload_group_size": group,
            "offload_num_in_group": num,
            "offload_prefetch_step": step,
        },
    }
    specs = [{**base, "phase": "write"}]
    for mode in args.modes.split(","):
        for path in args.paths.split(","):
            specs += [{**base, "phase": p, "path": path, "mode": mode} for p in _RUNS]
    if cuda and not args.no_peer:
        specs.append({**base, "phase": "accelerate"})
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in specs:  # results.json grows phase by phase: a cut run keeps what finished
        results.append(run_phase(spec, args.out, args.timeout))
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    command = "python -m benchmarks.generate_bench " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    table = markdown(results, command)
    (args.out / "results.md").write_text(table)
    print(table)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
