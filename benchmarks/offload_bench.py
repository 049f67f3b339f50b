"""Offloaded step time against the physical bound and against other offloaders.

    python -m benchmarks.offload_bench --out DIR            # on a CUDA machine
    python -m benchmarks.offload_bench --smoke --out DIR    # tiny CPU run (CI)

Each cell (a method, a configuration, an Inductor mode) runs in a fresh process, so offloaded
host copies and compile state never leak from one cell into the next; the cell times one
forward over each token count (batch 1) and prints one JSON line. The parent gathers them and
writes ``results.json``, ``results.md`` and ``results.png`` into ``--out``.

Bound of a cell: max(T_compute, copied bytes / H2D bandwidth), where T_compute is the same model
compiled without offloading in the same mode, and the bandwidth is measured in the same run.
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

from offload_compiler.config import PrefetchOffloadConfig
from offload_compiler.demo import h2d_gbps

LLAMA_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}
SMOKE = {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 256}


# --- one cell, in its own process ------------------------------------------------------------


def build_model(spec: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with random weights, else the package's LlamaShaped."""
    shape, layers = spec["shape"], spec["layers"]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if spec.get("transformers", True):
            try:
                from transformers import LlamaConfig, LlamaForCausalLM
            except ImportError:
                pass
            else:
                config = LlamaConfig(
                    hidden_size=shape["hidden"],
                    intermediate_size=shape["intermediate"],
                    num_attention_heads=shape["heads"],
                    num_key_value_heads=shape["kv_heads"],
                    num_hidden_layers=layers,
                    vocab_size=shape["vocab"],
                    max_position_embeddings=max(spec["tokens"]) + 1,
                )
                with torch.device(device):
                    return LlamaForCausalLM(config).eval()
        from offload_compiler.llama import LlamaShaped

        with torch.device(device):
            return LlamaShaped(
                layers,
                shape["hidden"],
                shape["heads"],
                shape["kv_heads"],
                shape["intermediate"],
                shape["vocab"],
            ).eval()
    finally:
        torch.set_default_dtype(previous)


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.layers


def _call(model: torch.nn.Module):
    takes_cache = hasattr(model, "model")  # transformers: no KV cache for a single forward

    def run(ids: torch.Tensor) -> torch.Tensor:
        out = model(ids, use_cache=False) if takes_cache else model(ids)
        return out.logits if hasattr(out, "logits") else out

    return run


def prepare(spec: dict, device: torch.device, dtype: torch.dtype):
    """The model set up for the cell's method: (callable, bytes copied per forward)."""
    from offload_compiler.pool import host_copy

    method, mode = spec["method"], spec.get("mode", "default")
    if method == "offload":
        options = {"prefetch": spec["prefetch"]}
        if mode != "default":
            options["mode"] = mode
        if spec.get("memory_fraction"):  # the model does not fit: place it from the CPU
            import offload_compiler

            model = build_model(spec, torch.device("cpu"), dtype)
            offload_compiler.place_model(model, options, device)
        else:  # the backend moves the offloaded weights off the GPU when it compiles
            model = build_model(spec, device, dtype)
        compiled = torch.compile(model, backend="offload", options=options)
        with torch.no_grad():
            _call(compiled)(torch.zeros(1, 1, dtype=torch.long, device=device))
        moved = sum(p.nbytes for p in model.parameters() if host_copy(p) is not None)
        return _call(compiled), moved
    model = build_model(spec, device, dtype)
    if method == "resident":
        return _call(torch.compile(model, mode=None if mode == "default" else mode)), 0
    if method == "uva":
        options = {"uva": {"cpu_offload_gb": spec["uva_gb"], **spec.get("uva", {})}}
        if mode != "default":
            options["mode"] = mode
        compiled = torch.compile(model, backend="offload", options=options)
        call = _call(compiled)
        with torch.no_grad():
            call(torch.zeros(1, 1, dtype=torch.long, device=device))  # offloads on compile
        moved = sum(p.nbytes for p in model.parameters() if host_copy(p) is not None)
        return call, moved
    if method == "hook":
        from benchmarks.hook_offloader import HookPrefetchOffloader

        p = spec["prefetch"]
        offloader = HookPrefetchOffloader(
            _layers(model),
            p["offload_group_size"],
            p["offload_num_in_group"],
            p["offload_prefetch_step"],
            device,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        compiled = torch.compile(model, mode=None if mode == "default" else mode)
        return _call(compiled), offloader.offloaded_bytes
    if method == "accelerate":
        from accelerate import cpu_offload

        layers = _layers(model)
        chosen = PrefetchOffloadConfig(**spec["prefetch"]).offloaded_layers(len(layers))
        moved = sum(q.nbytes for i in chosen for q in layers[i].parameters())
        for i in chosen:
            cpu_offload(layers[i], execution_device=device)
        torch.cuda.empty_cache()
        return _call(model), moved
    if method == "diffusers":
        from diffusers.hooks import apply_group_offloading

        moved = sum(q.nbytes for q in _layers(model).parameters())
        apply_group_offloading(
            _layers(model),
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
        torch.cuda.empty_cache()
        return _call(model), moved
    raise ValueError(f"unknown method {method!r}")


def run_cell(spec: dict) -> dict:
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if spec["method"] == "bandwidth":
        return {**spec, "h2d_GBps": h2d_gbps(device, 512 * 2**20)}
    if spec.get("memory_fraction"):
        torch.cuda.set_per_process_memory_fraction(spec["memory_fraction"], device)
    setup = time.perf_counter()
    call, moved = prepare(spec, device, dtype)
    resident = torch.cuda.memory_allocated(device) if cuda else 0
    results = []
    with torch.no_grad():
        for tokens in spec["tokens"]:
            ids = torch.randint(0, spec["shape"]["vocab"], (1, tokens), device=device)
            for _ in range(3):
                call(ids)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            # Back-to-back calls, as in serving, between two device-wide syncs: a sync per
            # call, or an end event on the compute stream alone, would leave the copies
            # started for the next call outside the timed window.
            calls = spec["iters"] if tokens < 2048 else max(3, spec["iters"] // 3)
            times = []
            for _ in range(3):
                if cuda:
                    torch.cuda.synchronize()
                begin = time.perf_counter()
                for _ in range(calls):
                    call(ids)
                if cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - begin) * 1e3 / calls)
            ms = statistics.median(times)
            results.append(
                {
                    "tokens": tokens,
                    "ms": ms,
                    "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else 0,
                    "achieved_GBps": moved / (ms * 1e6) if moved else 0.0,
                }
            )
    return {
        **spec,
        "copied_bytes_per_forward": moved,
        "resident_bytes_after_setup": resident,
        "setup_s": time.perf_counter() - setup,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "results": results,
    }


# --- the grid, in the parent ------------------------------------------------------------------


def grid(args: argparse.Namespace) -> list[dict]:
    device = "cpu" if args.smoke else "cuda"
    shape = SMOKE if args.smoke else LLAMA_8B
    base = {
        "device": device,
        "shape": shape,
        "layers": args.layers,
        "tokens": args.tokens,
        "iters": args.iters,
        "transformers": not args.smoke,
    }
    cells: list[dict] = [] if args.smoke else [{**base, "method": "bandwidth"}]
    for mode in args.modes:
        cells.append({**base, "method": "resident", "mode": mode})
        for group, num, step in args.configs:
            prefetch = {
                "offload_group_size": group,
                "offload_num_in_group": num,
                "offload_prefetch_step": step,
            }
            cells.append({**base, "method": "offload", "mode": mode, "prefetch": prefetch})
            if (group, num, step) in args.hook_configs:
                cells.append({**base, "method": "hook", "mode": mode, "prefetch": prefetch})
        for uva in args.uva:
            cells.append(
                {
                    **base,
                    "method": "uva",
                    "mode": mode,
                    "uva_gb": args.uva_gb,
                    "uva": {"use_unified_addressing": uva == "in-place"},
                }
            )
    for peer in args.peers:
        prefetch = {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1}
        cells.append({**base, "method": peer, "mode": "eager", "prefetch": prefetch})
    if args.cap:
        prefetch = {"offload_group_size": 1, "offload_num_in_group": 1, "offload_prefetch_step": 2}
        cells.append(
            {
                **base,
                "method": "offload",
                "mode": "reduce-overhead",
                "prefetch": prefetch,
                "memory_fraction": args.cap,
                "label": "capped",
            }
        )
    return cells


def label(cell: dict) -> str:
    if cell.get("label"):
        return f"{cell['label']} {cell['method']}"
    p = cell.get("prefetch")
    if cell["method"] in ("offload", "hook"):
        return (
            f"{cell['method']} {p['offload_group_size']}/{p['offload_num_in_group']} "
            f"step {p['offload_prefetch_step']}"
        )
    if cell["method"] == "uva":
        return f"uva {'in-place' if cell['uva']['use_unified_addressing'] else 'copies'}"
    if cell["method"] == "accelerate":
        return f"accelerate {p['offload_group_size']}/{p['offload_num_in_group']}"
    if cell["method"] == "diffusers":
        return "diffusers all layers"
    return cell["method"]


def analyse(cells: list[dict]) -> list[dict]:
    """Attach the bound and ratio to every timed result."""
    bandwidth = next((c["h2d_GBps"] for c in cells if c["method"] == "bandwidth"), None)
    compute = {
        (c["mode"], r["tokens"]): r["ms"]
        for c in cells
        if c["method"] == "resident" and "results" in c
        for r in c["results"]
    }
    for cell in cells:
        mode = cell.get("mode")
        for r in cell.get("results", []):
            t_compute = compute.get((mode, r["tokens"]), compute.get(("default", r["tokens"])))
            copy_ms = (
                cell["copied_bytes_per_forward"] / (bandwidth * 1e6)
                if bandwidth and cell["copied_bytes_per_forward"]
                else 0.0
            )
            r["bound_ms"] = max(t_compute or 0.0, copy_ms)
            r["ratio"] = r["ms"] / r["bound_ms"] if r["bound_ms"] else None
    return cells


def markdown(cells: list[dict], command: str) -> str:
    timed = [c for c in cells if c.get("results")]
    bandwidth = next((c["h2d_GBps"] for c in cells if c["method"] == "bandwidth"), None)
    first = timed[0] if timed else {}
    tokens = first.get("tokens", [])
    lines = [
        f"Device: {first.get('device_name')}, torch {first.get('torch')}, "
        f"{first.get('layers')} layers of hidden {first.get('shape', {}).get('hidden')}. "
        f"Measured H2D bandwidth: {f'{bandwidth:.1f} GB/s' if bandwidth else 'n/a'}.",
        f"Command: `{command}`",
        "",
        "Step time in ms (ratio to the bound max(T_compute, copied bytes / bandwidth)):",
        "",
        "| method | mode | copied MB | " + " | ".join(f"{t} tok" for t in tokens) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in tokens) + " |",
    ]
    for cell in timed:
        row = [label(cell), str(cell.get("mode")), f"{cell['copied_bytes_per_forward'] / 1e6:.0f}"]
        for r in cell["results"]:
            ratio = f" ({r['ratio']:.3f})" if r.get("ratio") else ""
            row.append(f"{r['ms']:.2f}{ratio}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Memory (GB): resident after setup; peak at the largest token count", ""]
    lines += ["| method | mode | resident | peak |", "| --- | --- | --- | --- |"]
    for cell in timed:
        lines.append(
            f"| {label(cell)} | {cell.get('mode')} | "
            f"{cell['resident_bytes_after_setup'] / 1e9:.2f} | "
            f"{cell['results'][-1]['peak_bytes'] / 1e9:.2f} |"
        )
    failed = [c for c in cells if c.get("error")]
    if failed:
        lines += ["", "Cells that failed:", ""]
        lines += [f"- {label(c)} ({c.get('mode')}): {c['error']}" for c in failed]
    return "\n".join(lines) + "\n"


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({c["mode"] for c in cells if c.get("results")})
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for cell in cells:
            if cell.get("mode") != mode or not cell.get("results"):
                continue
            xs = [r["tokens"] for r in cell["results"]]
            ax.plot(xs, [r["ms"] for r in cell["results"]], marker="o", label=label(cell))
            if cell["method"] == "offload":
                ax.plot(xs, [r["bound_ms"] for r in cell["results"]], "k:", alpha=0.4)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per forward", title=mode)
        ax.legend(fontsize=6)
    fig.suptitle("step time vs tokens (dotted: bound of each offload config)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--modes", type=lambda s: s.split(","))
    parser.add_argument("--configs", type=_configs, help="group/num/step,... e.g. 2/1/2,1/1/1")
    parser.add_argument("--hook-configs", type=_configs, default=[])
    parser.add_argument("--uva", type=lambda s: [u for u in s.split(",") if u], default=[])
    parser.add_argument("--uva-gb", type=float, default=1.0)
    parser.add_argument("--peers", type=lambda s: [p for p in s.split(",") if p], default=[])
    parser.add_argument("--cap", type=float, help="memory fraction for a capped run")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    if args.worker:
        try:
            result = run_cell(json.loads(args.worker))
        except Exception as err:  # a failed cell is reported, not fatal to the grid
            result = {**json.loads(args.worker), "error": f"{type(err).__name__}: {err}"[:500]}
        print("CELL " + json.dumps(result), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required")
    if args.smoke:
        args.layers = args.layers or 4
        args.tokens = args.tokens or [4, 16]
        args.modes = args.modes or ["default"]
        args.configs = args.configs or [(1, 1, 1), (2, 1, 2)]
        args.hook_configs = args.hook_configs or [(2, 1, 2)]
        args.uva = args.uva or ["copies"]
        args.uva_gb = 2e-4
        args.iters = 3
    else:
        args.layers = args.layers or 32
        args.tokens = args.tokens or [1, 16, 256, 2048, 8192]
        args.modes = args.modes or ["default", "reduce-overhead"]
        args.configs = args.configs or [(g, 1, s) for g in (1, 2, 4, 8) for s in (1, 2, 4)]
    args.out.mkdir(parents=True, exist_ok=True)
    cells = []
    for spec in grid(args):
        begin = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.offload_bench", "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CELL ")), None)
            cell = json.loads(line[5:]) if line else {**spec, "error": proc.stderr[-500:]}
        except subprocess.TimeoutExpired:
            cell = {**spec, "error": f"timed out after {args.timeout} s"}
        cells.append(cell)
        status = cell.get("error") or " ".join(
            f"{r['tokens']}:{r['ms']:.2f}" for r in cell.get("results", [])
        )
        print(
            f"[{time.perf_counter() - begin:5.0f} s] {label(cell)} {cell.get('mode', '')}: "
            f"{status}",
            flush=True,
        )
        (args.out / "results.json").write_text(json.dumps(analyse(cells), indent=1))
    cells = analyse(cells)
    command = "python -m benchmarks.offload_bench " + " ".join(sys.argv[1:])
    (args.out / "results.md").write_text(markdown(cells, command))
    plot(cells, args.out / "results.png")
    print((args.out / "results.md").read_text())
    return 0


def _configs(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in item.split("/")) for item in text.split(",") if item]


if __name__ == "__main__":
    raise SystemExit(main())
