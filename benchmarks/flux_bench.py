"""A diffusion client: a Flux-shaped transformer denoising under a GPU memory cap it does not fit
in, offloaded by the backend against diffusers' own group offloading.

    python -m benchmarks.flux_bench --out DIR                 # CUDA: Flux.1 blocks, 1024x1024
    python -m benchmarks.flux_bench --smoke --out DIR         # tiny CPU run (CI)

Each run is a fresh process (peaks and caches start clean), on the same random bf16 weights
(diffusers' ``FluxTransformer2DModel``, full-size blocks, ``--double`` and ``--single`` of them):

  resident            the whole model on the device, compiled by Inductor, no cap: the compute
                      term of the bound and the reference output;
  offload             every block of both stacks offloaded (``--config``, one prefetch ring),
                      `place_model` then ``torch.compile(backend="offload")``, under the cap; its
                      waits timed by `measure_stalls`;
  diffusers           ``apply_group_offloading`` (block level, one block per group,
                      ``use_stream=True``) on the same blocks, under the cap, eager;
  diffusers-compiled  the same, then ``torch.compile`` (where it runs).

A step is one transformer forward at the latent size of a 1024x1024 image (4096 image tokens,
512 text tokens); s/step is the median of ``--runs`` runs of back-to-back steps. The bound is
max(resident compiled step, copy floor of the offloaded host tensors). Writes ``results.json``
and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.offload_bench import fill_from_block
from benchmarks.timing import copy_floor_ms, h2d_gbps, wall_ms

FLUX = {  # FLUX.1-dev's transformer
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
SMOKE = {
    **FLUX,
    "in_channels": 8,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 16,
    "axes_dims_rope": (2, 2, 4),
}


def build(spec: dict) -> torch.nn.Module:
    """The Flux-shaped transformer on the CPU with deterministic random weights (norms 1, the
    rest a repeated N(0, 0.02) block: drawing billions of numbers on the CPU takes minutes)."""
    from diffusers import FluxTransformer2DModel

    dtype = getattr(torch, spec["dtype"])
    with torch.device("meta"):
        model = FluxTransformer2DModel(**spec["shape"]).to(dtype)
    model = model.to_empty(device="cpu").eval()
    block = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" in name:
                param.fill_(1.0)
                continue
            fill_from_block(param.view(-1), block)
    for module in model.modules():  # rotary tables and other buffers
        for key, buffer in module.named_buffers(recurse=False):
            if buffer.device.type == "meta":
                raise RuntimeError(f"buffer {key} of {type(module).__name__} left on meta")
    return model


def inputs(spec: dict, device: torch.device) -> dict:
    """One denoising step's inputs: packed latents of ``spec["image"]`` pixels and a prompt."""
    shape, dtype = spec["shape"], getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(1)
    side = spec["image"] // 16  # VAE /8, then 2x2 patches packed
    image, text = side * side, spec["text"]
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(image, 1), ids.reshape(image, 2).float()], 1)
    made = {
        "hidden_states": torch.randn(1, image, shape["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(1, text, shape["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, shape["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3),
    }
    if shape["guidance_embeds"]:
        made["guidance"] = torch.tensor([3.5])
    out = {k: v.to(device, dtype if v.is_floating_point() and "ids" not in k else None)
           for k, v in made.items()}  # fmt: skip
    return {**out, "return_dict": False}


def _cap(spec: dict, device: torch.device) -> None:
    if device.type == "cuda" and spec.get("cap_gib"):
        total = torch.cuda.mem_get_info(device)[1]
        torch.cuda.set_per_process_memory_fraction(spec["cap_gib"] * 2**30 / total, device)


def _host_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(spec: dict) -> dict:
    """One run (in its own process): build, place, compile, time the steps."""
    import offload_compiler

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    method = spec["method"]
    if method != "resident":
        _cap(spec, device)
    begin = time.perf_counter()
    model = build(spec)
    weight_bytes = sum(p.nbytes for p in model.parameters())
    extra: dict = {}
    stalls = None
    if method == "resident":
        model = model.to(device)
        step = torch.compile(model)
    elif method == "offload":
        options = {"prefetch": spec["prefetch"]}
        offload_compiler.place_model(model, options, device)
        step = torch.compile(model, backend="offload", options=options)
    else:
        from diffusers.hooks import apply_group_offloading

        for child in model.children():  # what is not a block list stays resident
            if not isinstance(child, torch.nn.ModuleList):
                child.to(device)
        holder = torch.nn.Module()  # block level takes the ModuleLists of what it is given
        holder.transformer_blocks = model.transformer_blocks
        holder.single_transformer_blocks = model.single_transformer_blocks
        apply_group_offloading(
            holder,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=cuda,
        )
        step = torch.compile(model) if method == "diffusers-compiled" else model
    if cuda:
        torch.cuda.empty_cache()
    x = inputs(spec, device)
    with torch.no_grad():
        first = step(**x)[0]
        step(**x)
        setup_s = time.perf_counter() - begin

        def call() -> None:
            step(**x)

        count = max(1, round(spec["min_run_s"] * 1e3 / wall_ms(call, device)))
        if method == "offload":
            with offload_compiler.measure_stalls(model) as meter:
                times = [wall_ms(call, device, count) for _ in range(spec["runs"])]
            stalls = meter.report()
        else:
            times = [wall_ms(call, device, count) for _ in range(spec["runs"])]
    if method == "offload":
        offloaded = offload_compiler.offloaded_stacks(model)
        hosts = [t for s in offloaded for t in s.host_tensors]
        (stack,) = stalls.stacks
        extra = {
            "offloaded_bytes": sum(s.host_bytes for s in offloaded),
            "slot_bytes": sum(s.slot_bytes for s in offloaded),
            "offloaded_layers": [list(s.layer_names) for s in offloaded],
            "copy_floor_ms": copy_floor_ms(hosts, device),
            "h2d_GBps": h2d_gbps(device) if cuda else None,
            "stalled_ms_per_step": sum(x.total_ms for x in stack.layers) / max(1, stack.forwards),
            "stalls": str(stalls),
        }
    torch.save(first.float().cpu(), Path(spec["out"]) / f"{method}.pt")
    return {
        **extra,
        "ms_per_step": statistics.median(times),
        "runs_ms": times,
        "setup_s": setup_s,
        "weight_bytes": weight_bytes,
        "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else 0,
        "host_peak_bytes": _host_peak(),
    }


def run_process(spec: dict, out: Path, timeout: float) -> dict:
    """`run` in a fresh process; its result, or the error it ended with."""
    log = out / f"{spec['method']}.log"
    command = [sys.executable, "-m", "benchmarks.flux_bench", "--run", json.dumps(spec)]
    try:
        with log.open("w") as err:
            done = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout
            )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        return {**spec, "error": f"exit {done.returncode}: {log.read_text()[-2000:]}"}
    return {**spec, **json.loads(lines[-1][7:])}


def analyse(results: list[dict], out: Path) -> None:
    """Adds the bound, the ratio to it, and the output's difference from the resident run."""
    done = {r["method"]: r for r in results if "error" not in r}
    resident = done.get("resident")
    floor = done.get("offload", {}).get("copy_floor_ms")
    reference = torch.load(out / "resident.pt") if resident else None
    for r in done.values():
        if resident and floor:
            r["bound_ms"] = max(resident["ms_per_step"], floor)
            r["vs_bound"] = r["ms_per_step"] / r["bound_ms"]
        if reference is not None and r is not resident:
            got = torch.load(out / f"{r['method']}.pt")
            r["max_rel_diff"] = float((got - reference).abs().max() / reference.abs().max())


def markdown(results: list[dict], command: str) -> str:
    gib = 2**30
    first = results[0]
    shape = first["shape"]
    lines = [
        f"`{command}`",
        "",
        f"{first['device_name']}, torch {first['torch']}; Flux-shaped transformer "
        f"({shape['num_layers']} double + {shape['num_single_layers']} single blocks, "
        f"{first['dtype']}), {first['image']}x{first['image']} image, {first['text']} text "
        f"tokens; memory cap for the offloaded runs: "
        f"{str(first['cap_gib']) + ' GiB' if first.get('cap_gib') else 'none'}.",
        "",
        "| run | s/step | bound s | step / bound | stalled ms/step | GPU peak GiB | "
        "host peak GiB | max rel. diff to resident |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'].splitlines()[-1][:120]} |")
            continue
        bound = f"{r['bound_ms'] / 1e3:.3f} | {r['vs_bound']:.3f}" if "bound_ms" in r else " | "
        stalled = f"{r['stalled_ms_per_step']:.1f}" if "stalled_ms_per_step" in r else ""
        diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else ""
        lines.append(
            f"| {r['method']} | {r['ms_per_step'] / 1e3:.3f} | {bound} | {stalled} | "
            f"{r['gpu_peak_reserved_bytes'] / gib:.2f} | {r['host_peak_bytes'] / gib:.2f} | "
            f"{diff} |"
        )
    for r in results:
        if "offloaded_bytes" in r:
            lines += [
                "",
                f"Weights {r['weight_bytes'] / gib:.2f} GiB, offloaded "
                f"{r['offloaded_bytes'] / gib:.2f} GiB ({len(r['offloaded_layers'][0])} blocks "
                f"of both stacks, one ring), slots "
                f"{r['slot_bytes'] / gib:.2f} GiB; copy floor {r['copy_floor_ms']:.1f} ms, H2D "
                f"{r['h2d_GBps'] or 0:.1f} GB/s.",
                "",
                "```",
                r["stalls"],
                "```",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    parser.add_argument("--double", type=int, help="double-stream blocks (default 19)")
    parser.add_argument("--single", type=int, help="single-stream blocks (default 38)")
    parser.add_argument("--cap-gib", type=float, default=8.0, help="GPU memory cap when offloaded")
    parser.add_argument("--config", default="1/1/2", help="group/num/step of the offloading")
    parser.add_argument("--methods", default="resident,offload,diffusers,diffusers-compiled")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--min-run-s", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = parser.parse_args(argv)
    if args.run:
        spec = json.loads(args.run)
        print("RESULT " + json.dumps(run(spec)), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required")
    cuda = torch.cuda.is_available() and not args.smoke
    shape = dict(SMOKE if args.smoke else FLUX)
    shape["num_layers"] = args.double or shape["num_layers"]
    shape["num_single_layers"] = args.single or shape["num_single_layers"]
    group, num, step = (int(x) for x in args.config.split("/"))
    methods = args.methods.split(",")
    if not cuda:  # diffusers' group offloading moves blocks to a GPU and back
        methods = [m for m in methods if not m.startswith("diffusers")]
    args.out.mkdir(parents=True, exist_ok=True)
    base = {
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "shape": shape,
        "dtype": "bfloat16" if cuda else "float32",
        "image": 1024 if cuda else 64,
        "text": 512 if cuda else 6,
        "cap_gib": args.cap_gib if cuda else None,
        "prefetch": {
            "offload_group_size": group,
            "offload_num_in_group": num,
            "offload_prefetch_step": step,
        },
        "runs": args.runs,
        "min_run_s": args.min_run_s if cuda else 0.0,
        "out": str(args.out),
    }
    results = []
    for method in methods:  # results.json grows run by run: a cut run keeps what finished
        begin = time.perf_counter()
        results.append(run_process({**base, "method": method}, args.out, args.timeout))
        print(f"{method}: {time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    analyse(results, args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    command = "python -m benchmarks.flux_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    table = markdown(results, command)
    (args.out / "results.md").write_text(table)
    print(table)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
