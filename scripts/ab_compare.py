"""Speed of two commits of the package, A against B, on one machine in one run.

    python scripts/ab_compare.py --before 1162485 --after HEAD --out DIR     # CUDA, 8 layers
    python scripts/ab_compare.py --before HEAD~1 --after HEAD --out DIR --smoke   # tiny, CPU

Each commit's ``offload_compiler/`` is extracted with ``git archive``; one worker process per
(commit, config, mode) imports it, builds the Llama-3-8B-shaped model (random weights), places,
compiles and warms it, then waits. The parent measures the workers one at a time in interleaved
rounds (the order reversed every other round), so drift of the machine reaches both commits
alike, and writes ``ab.md`` (medians over rounds, the after/before ratio, the spread of each) and
``ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "2/1 step1": {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1},
    "1/1 step2": {"offload_group_size": 1, "offload_num_in_group": 1, "offload_prefetch_step": 2},
}
LLAMA_8B_LAYERS = {"dim": 4096, "heads": 32, "kv_heads": 8, "hidden": 14336, "vocab": 128256}
SMOKE = {"dim": 64, "heads": 4, "kv_heads": 2, "hidden": 128, "vocab": 256}

WORKER = r"""
import json, statistics, sys, time, torch
import offload_compiler
from offload_compiler.llama import LlamaShaped
spec = json.loads(sys.argv[1])
device = torch.device(spec["device"])
cuda = device.type == "cuda"
with torch.device("meta"):
    model = LlamaShaped(**spec["shape"]).to(torch.bfloat16)
model = model.to_empty(device="cpu")
block = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)).mul_(0.02)
block = block.to(torch.bfloat16)
with torch.no_grad():
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
            continue
        flat = param.view(-1)
        for start in range(0, flat.numel(), block.numel()):
            end = min(flat.numel(), start + block.numel())
            flat[start:end].copy_(block[: end - start])
options = {"prefetch": spec["prefetch"]}
if spec["mode"] != "default":
    options["mode"] = spec["mode"]
offload_compiler.place_model(model, options, device)
compiled = torch.compile(model, backend="offload", options=options)
vocab = spec["shape"]["vocab"]
ids = {t: torch.randint(0, vocab, (1, t), device=device) for t in spec["tokens"]}
sync = torch.cuda.synchronize if cuda else (lambda: None)
with torch.no_grad():
    for t in spec["tokens"]:
        for _ in range(4):
            compiled(ids[t])
    sync()
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        out = {}
        for t in spec["tokens"]:
            times, begin = [], time.perf_counter()
            while time.perf_counter() - begin < spec["min_run_s"] or len(times) < 5:
                start = time.perf_counter()
                compiled(ids[t])
                sync()
                times.append((time.perf_counter() - start) * 1e3)
            out[t] = statistics.median(times)
        print("RESULT " + json.dumps(out), flush=True)
"""


def extract(commit: str, into: Path) -> Path:
    """``offload_compiler/`` of ``commit`` under ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", commit, "offload_compiler"], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="commit A")
    parser.add_argument("--after", default="HEAD", help="commit B")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", default="1,2048")
    parser.add_argument("--modes", default="default,reduce-overhead")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-s", type=float, default=1.0)
    parser.add_argument("--site", default="", help="extra PYTHONPATH entries (wheels)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    shape = {**(SMOKE if args.smoke else LLAMA_8B_LAYERS), "layers": args.layers}
    trees = tempfile.mkdtemp(prefix="ab_compare_")
    commits = {"before": args.before, "after": args.after}
    roots = {name: extract(commit, Path(trees) / name) for name, commit in commits.items()}
    workers: dict[tuple[str, str, str], subprocess.Popen] = {}
    begin = time.time()
    for tree, root in roots.items():
        for config, prefetch in CONFIGS.items():
            for mode in args.modes.split(","):
                spec = {
                    "prefetch": prefetch,
                    "mode": mode,
                    "tokens": tokens,
                    "min_run_s": args.min_run_s,
                    "device": "cpu" if args.smoke else "cuda",
                    "shape": shape,
                }
                path = os.pathsep.join(p for p in (str(root), args.site) if p)
                label = f"{tree}_{config.replace('/', '-').replace(' ', '_')}_{mode}"
                workers[(tree, config, mode)] = subprocess.Popen(
                    [sys.executable, "-c", WORKER, json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=(args.out / f"{label}.log").open("w"),
                    text=True,
                    cwd=trees,  # not the checkout: the extracted tree is the package imported
                    env={**os.environ, "PYTHONPATH": path},
                )
    for key, worker in workers.items():
        if not worker.stdout.readline().startswith("READY"):
            raise SystemExit(f"{key} failed to start; see its log in {args.out}")
    print(f"all ready after {time.time() - begin:.0f} s", file=sys.stderr, flush=True)
    results = {key: {t: [] for t in tokens} for key in workers}
    keys = list(workers)
    for round_ in range(args.rounds):
        for key in keys if round_ % 2 == 0 else keys[::-1]:
            workers[key].stdin.write("go\n")
            workers[key].stdin.flush()
            got = json.loads(workers[key].stdout.readline().split(" ", 1)[1])
            for t in tokens:
                results[key][t].append(got[str(t)])
        print(f"round {round_} done at {time.time() - begin:.0f} s", file=sys.stderr, flush=True)
    for worker in workers.values():
        worker.stdin.close()
    lines = [
        f"before {args.before}, after {args.after}; {args.layers} layers {shape}; medians over "
        f"{args.rounds} rounds",
        "",
        "| config | mode | tokens | before ms | after ms | after/before | spread before | "
        "spread after |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for config in CONFIGS:
        for mode in args.modes.split(","):
            for t in tokens:
                b, a = results[("before", config, mode)][t], results[("after", config, mode)][t]
                mb, ma = statistics.median(b), statistics.median(a)
                lines.append(
                    f"| {config} | {mode} | {t} | {mb:.2f} | {ma:.2f} | {ma / mb:.3f} | "
                    f"{(max(b) - min(b)) / mb:.1%} | {(max(a) - min(a)) / ma:.1%} |"
                )
    table = "\n".join(lines) + "\n"
    (args.out / "ab.md").write_text(table)
    (args.out / "ab.json").write_text(json.dumps({repr(k): v for k, v in results.items()}))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
