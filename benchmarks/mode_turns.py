"""Default mode against reduce-overhead on the very same offloaded weights, timed in turns.

    python -m benchmarks.mode_turns --out DIR --layers 32 --tokens 1,16 --config 2/1/2:pp

A paired cell of `benchmarks.offload_bench` builds one model per mode, so each mode copies from
its own pinned memory into its own slots: two models of one configuration and mode have
differed in step time by more than the 1% that issue #7 asks of the modes. Here one model is
offloaded once and compiled several times, each compile a torch.compile wrapper of its own over
the same model (so Dynamo compiles each afresh) sharing one runtime: the same host memory,
slots and copy stream. The variants, timed in this order turn after turn:

- ``reduce-overhead``, ``reduce-overhead.2`` to ``.4``: compiled with ``triton.cudagraphs`` on
  (what ``mode="reduce-overhead"`` sets); up to four recordings of the same graphs, to tell a
  slow recording from a slow process;
- ``reduce-overhead+replay``: ``reduce-overhead``'s own recording (its cudagraph trees node's
  ``torch.cuda.CUDAGraph``) replayed directly, without trees' Python around it (their input
  copy, checks and output bookkeeping): tells a slow recording from a slow replay path. This
  and the other variants made from a recording (down to ``+nocopy+sidestream``) exist for
  ``reduce-overhead.2`` to ``.4`` too (``reduce-overhead.3+replay``...);
- ``reduce-overhead+replay+copy``: the same with trees' one piece of device work before each
  replay, the copy of the inputs that are not static into the graph's own (a
  ``torch._foreach_copy_`` from copies of them made once); ``+memcpy``, ``+kernel``,
  ``+event``: other work between two replays instead (a ``copy_`` of those inputs, a
  cudaMemcpyAsync; a one-element fill of a tensor the graph does not read; an event recorded
  and waited on, no device work at all), and ``+sidecopy`` (trees' copy on a stream of its
  own that the replay waits for), to tell which work between replays costs time;
  ``+copy+hop``, ``+kernel+hop``: the copy or the fill, then a hop (the current stream waits
  on a side stream that waited on it: no device work, but the replay then follows a wait on
  another stream, as after ``+sidecopy``);
- ``reduce-overhead+replay+copy+sidestream``: the copy on the current stream, the replay on
  a stream of its own (which waits for the current one, and the current one for it);
- ``reduce-overhead+hop``: trees' own call of that recording, with the hop between their
  input copy and their replay (``CUDAGraphNode.run_graph`` patched during the call);
- ``reduce-overhead+sidestream``: trees' own call on a stream of its own (their input copy
  too); ``reduce-overhead+nocopy``, ``+nocopy+sidestream``: trees' own call with their input
  copy left out (the graph reads the ids it last got; mode_turns never changes them), on the
  current stream and on a stream of its own;
- ``reduce-overhead+partitioned``, ``.2``: compiled with Inductor's graph partitioning at
  every prefetch op and default mode's schedule (no rejoin): the copies and waits run eagerly
  between captured pieces of compute, as cudaMemcpyAsync calls on the copy stream, not as
  memcpy nodes of a CUDA graph (session 5's measured and reverted design; with per-layer
  streaming a forward has two pieces per offloaded layer instead of two per parameter);
- ``reduce-overhead+notrees``: the same compile, wrapped by Inductor's plain ``cudagraphify``
  (``triton.cudagraph_trees`` off: one graph per compiled graph, inputs that are not static
  copied in before each replay) instead of cudagraph trees;
- ``reduce-overhead+unstaged``: compiled with the backend's input staging off (`staging`:
  under CUDA graphs the backend copies the token ids into a static buffer on the caller's
  stream and launches the graphs on a stream of their own), so cudagraph trees copy the ids
  into their own buffer on the current stream before each replay, as they do without the
  backend; ``reduce-overhead+unstaged+sidecopy``: the same, with trees' copy moved to a
  side stream, forked from and joined into the current one (their call patched);
  ``reduce-overhead+unstaged.2``, ``.3``: more compiles and recordings of ``+unstaged``;
- ``reduce-overhead+nopartition``: compiled with Inductor's ``graph_partition`` off (on by
  default since torch 2.9: with CUDA graphs, Inductor may split a graph and reorders the nodes
  it splits at);
- ``default+rejoin+graph``: default mode compiled with the schedule the backend gives CUDA
  graphs (copies joined at the end, next-call copies at the top), each token count's call
  captured by hand into one ``torch.cuda.CUDAGraph`` and replayed: a CUDA graph without
  cudagraph trees (what ``prefetch.offload_capturable`` gives users; here the schedule is
  forced by a patch, as the variants must share one configuration and so one runtime);
- ``default+rejoin+graph+clear``: the same, captured with cuBLAS's workspaces cleared as
  cudagraph trees do;
- ``default+rejoin+graph+copy``: ``default+rejoin+graph`` with a copy into its captured input
  before each replay, as a serving loop that writes new inputs does (the same kernel as
  trees' input copy);
- ``default+rejoin+graph+trees``: the same, warmed up and captured in the context cudagraph
  trees record in (a stream of their own, a memory pool shared by the warm-up and the capture,
  cuBLAS's workspaces cleared around both, thread-local capture errors, the RNG state kept):
  if this is as slow as ``reduce-overhead`` while ``+clear`` is not, the cost is in that
  context and not in trees' replay; ``default+rejoin+graph+trees+copy``: the same with the
  copy into its captured input before each replay;
- ``default+rejoin+graph+copy+hop``: ``default+rejoin+graph+copy`` with the hop after the copy;
- ``reduce-overhead+nowrap+graph``, ``+copy``: the code Inductor generates for
  reduce-overhead (``triton.cudagraphs`` on: graph partitions), left unwrapped by cudagraph
  trees (Inductor's compiler bisector told to disable its cudagraphs subsystem) and captured
  by hand as ``default+rejoin+graph``: tells trees' recording from the code they record;
- ``default+rejoin``: the same compile run eagerly;
- ``default``: default mode.

With host copies (the default since session 12) every call of the backend's own graphs keeps
the runtime's bookkeeping exact, but a graph replayed or captured outside it would issue no
copies: the ``+replay``-style and ``+graph`` variants need ``--captured-copies`` (checked).
With captured copies, taking turns is safe only in this order, and with ``default+rejoin``
among the variants whenever a CUDA-graph variant is (both checked). The runtime's
bookkeeping of which layer each slot holds is then updated by the ops that run in Python, never
by a CUDA-graph replay; the two
CUDA-graph schedules (captured and ``default+rejoin``) end every forward in the same slot
state, ``default`` re-copies any slot that state does not give it, and every slot that a
replay after ``default`` reads without copying it is one that ``default`` leaves filled (the
``+partitioned`` variants, whose ops run in Python with default's schedule, take their turn
after ``default+rejoin`` as ``default`` does; right after the replays, one read a slot the
replays had refilled, and the output check caught it) (at a
cost: ``default`` copies its first offloaded layer again at the start of each run, about one
layer's copy per run, so compare it with long runs, ``--min-run-s 3``). After
the timed runs one more turn checks the outputs: every variant's must equal its own output
right after its warm-up (the layers' weights are scaled apart, so a slot that held another
layer's weights shows); its distance to the uncompiled model's and to default mode's output
(different compiles round differently) is recorded.

With ``--timeline copies`` (or ``compute``) the runtime's ops stamp a log on the device, in
the CUDA graphs too (`benchmarks.graph_timeline`): after the timed runs, back-to-back calls of
each variant are logged, and the copy engine's busy and idle time, the bandwidth of each copy
and the compute stream's waits per call go into ``mode_turns.json`` (``timeline``) and, per
unit with the raw logs, into ``timeline-<tokens>.json.gz``.

With ``--kernel-after-call`` every call of every variant is followed by a one-element fill on
the current stream, as a serving loop's sampling follows each step.

``mode_turns.json`` holds every run, the medians, the per-turn ratio of each variant to
``default``, the copy floor of the model's offloaded tensors, and per variant one more run's
time per call until the calls returned to Python and until the device finished. With
``--profile N``, N calls of each variant are then profiled in turn and ``profile-<tokens>.json``
holds, per variant, `benchmarks.profile_offload`'s summary of them (copy engine busy and idle,
memsets, the kernels run most often). With ``--dump-graphs``, every CUDA graph keeps its nodes
and CUDA's DOT print of ``reduce-overhead``'s recording and of each hand capture is written
(``graph-<tokens>-<variant>.dot.gz``), to compare what the graphs hold.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from torch._inductor import compiler_bisector, cudagraph_trees

from benchmarks.graph_timeline import Timeline
from benchmarks.graph_timeline import summarise as summarise_timeline
from benchmarks.offload_bench import (
    LLAMA_8B,
    _call,
    _configs,
    _ints,
    _layers,
    build_model,
    copy_floor_ms,
    time_calls,
)
from benchmarks.profile_offload import profiled_calls, return_ms, summarise
from offload_compiler import backend, place_model
from offload_compiler.pool import host_copy

# Suffixes of the variants made from reduce-overhead's own recording (`_tree_replay`), not
# compiled anew: ``+replay`` and the between-replay work after it, trees' own call altered.
_BETWEEN = ["", "copy", "memcpy", "kernel", "event", "sidecopy", "copy+hop", "kernel+hop"]
FROM_RECORDING = [
    *("+replay" + (f"+{kind}" if kind else "") for kind in _BETWEEN),
    "+replay+copy+sidestream",
    "+hop",
    "+sidestream",
    "+nocopy",
    "+nocopy+sidestream",
]
_Patch = contextlib.AbstractContextManager[object]

RECORDINGS = ["reduce-overhead", "reduce-overhead.2", "reduce-overhead.3", "reduce-overhead.4"]
VARIANTS = [
    *(recording + suffix for recording in RECORDINGS for suffix in ["", *FROM_RECORDING]),
    "reduce-overhead+unstaged",
    "reduce-overhead+unstaged.2",
    "reduce-overhead+unstaged.3",
    "reduce-overhead+unstaged+sidecopy",
    "reduce-overhead+notrees",
    "reduce-overhead+nopartition",
    "default+rejoin+graph",
    "default+rejoin+graph+clear",
    "default+rejoin+graph+trees",
    "default+rejoin+graph+copy",
    "default+rejoin+graph+trees+copy",
    "default+rejoin+graph+copy+hop",
    "reduce-overhead+nowrap+graph",
    "reduce-overhead+nowrap+graph+copy",
    "default+rejoin",
    "reduce-overhead+partitioned",
    "reduce-overhead+partitioned.2",
    "default",
]


def _patched(enabled: bool, owner: object, name: str, value: object) -> _Patch:
    """``owner.name`` replaced by ``value`` meanwhile if ``enabled``, else nothing."""
    return mock.patch.object(owner, name, value) if enabled else contextlib.nullcontext()


def _forced_rejoin(force: bool | None) -> _Patch:
    """Compile with the CUDA-graph schedule (``rejoin``) whatever the mode if ``force``
    (what ``prefetch.offload_capturable`` does, but without changing the configuration, which
    the variants must share: one configuration, one runtime), or with default mode's (the
    next forward's copies left running) if ``force`` is False; as the mode says if None."""
    original = backend.OffloadPrefetchPass

    class Rejoin(original):
        def __init__(self, reads: dict, rejoin: bool, per_param: bool = False) -> None:
            super().__init__(reads, bool(force), per_param)

    return _patched(force is not None, backend, "OffloadPrefetchPass", Rejoin)


# Inductor's graph partitioning at every prefetch op: the ops run eagerly between the captured
# pieces (the backend's schedule under reduce-overhead from 88b6105 to 511691f, session 5)
_PARTITIONED = {
    "graph_partition": True,
    "custom_should_partition_ops": [
        "offload::wait_prefetch",
        "offload::start_prefetch",
        "offload::join_after_forward",
    ],
}


def _debug_graphs(enabled: bool) -> _Patch:
    """Every ``torch.cuda.CUDAGraph`` made meanwhile, cudagraph trees' included, keeps its
    graph for ``debug_dump`` (CUDA's DOT print of its nodes and edges): made with
    ``keep_graph=True`` (instantiated on its first replay), as ``enable_debug_mode`` does not
    keep it on torch 2.11."""
    original = torch.cuda.CUDAGraph

    class Debug(original):  # type: ignore[misc, valid-type]
        # pybind11 constructs in __init__, called with the caller's arguments after __new__
        def __new__(cls, keep_graph: bool = False) -> Debug:
            return super().__new__(cls, True)

        def __init__(self, keep_graph: bool = False) -> None:
            super().__init__(True)

    return _patched(enabled, torch.cuda, "CUDAGraph", Debug)


def dump_graphs(graphs: dict[str, torch.cuda.CUDAGraph], out: Path, tokens: int) -> None:
    """Each graph's DOT print, gzipped, as ``graph-<tokens>-<variant>.dot.gz`` (``+`` as
    ``_``)."""
    with tempfile.TemporaryDirectory() as tmp:
        for variant, graph in graphs.items():
            dot = Path(tmp) / "graph.dot"
            graph.debug_dump(str(dot))
            name = f"graph-{tokens}-{variant.replace('+', '_')}.dot.gz"
            (out / name).write_bytes(gzip.compress(dot.read_bytes()))


def _unwrapped(enabled: bool) -> _Patch:
    """Inductor compiles as for CUDA graphs but does not wrap the result in them (its bisector's
    switch for the cudagraphs subsystem, checked before any wrapping)."""
    bisector = compiler_bisector.CompilerBisector
    original = bisector.disable_subsystem

    def disable_subsystem(backend_name: str, subsystem_name: str, *args: object) -> bool:
        if (backend_name, subsystem_name) == ("inductor", "cudagraphs"):
            return True
        return original(backend_name, subsystem_name, *args)

    return _patched(enabled, bisector, "disable_subsystem", staticmethod(disable_subsystem))


@contextlib.contextmanager
def compiling_as(variant: str) -> Iterator[None]:
    """The global settings a variant's compiles run under."""
    graphs = variant.startswith("reduce-overhead")
    partitioned = "+partitioned" in variant
    patches = {
        "triton.cudagraphs": graphs,
        "triton.cudagraph_trees": not variant.endswith("+notrees"),
        "graph_partition": torch._inductor.config.graph_partition
        and not variant.endswith("+nopartition"),
        **(_PARTITIONED if partitioned else {}),
    }
    with (
        torch._inductor.config.patch(patches),
        _forced_rejoin(True if "+rejoin" in variant else False if partitioned else None),
        _unwrapped("+nowrap" in variant),
        _patched("+unstaged" in variant, backend, "stage_inputs", lambda gm, examples: None),
    ):
        yield


def _trees_copy_on_a_side_stream(
    call: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``call`` (a reduce-overhead compile) with cudagraph trees' input copy issued on a side
    stream, forked from the current one before it and joined into it after it."""
    node_class = cudagraph_trees.CUDAGraphNode
    copy_inputs = node_class._copy_inputs_and_remove_from_src
    side = torch.cuda.Stream()

    def on_the_side(self: cudagraph_trees.CUDAGraphNode, dsts: list, srcs: list) -> None:
        _forked(side, lambda: copy_inputs(self, dsts, srcs))

    def run(ids: torch.Tensor) -> torch.Tensor:
        with _patched(True, node_class, "_copy_inputs_and_remove_from_src", on_the_side):
            return call(ids)

    return run


def _kernel_after(
    call: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``call`` followed by a one-element fill on the current stream, of memory no variant
    reads: a stand-in for a serving loop's work between two steps (its sampling)."""
    kernel = _between("kernel", [])

    def run(ids: torch.Tensor) -> torch.Tensor:
        out = call(ids)
        kernel()
        return out

    return run


def _in_nvtx_range(
    variant: str, run: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run`` with each call inside an NVTX range named ``variant``."""

    def ranged(ids: torch.Tensor) -> torch.Tensor:
        with torch.cuda.nvtx.range(variant):
            return run(ids)

    return ranged


def _distance(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    """Largest difference of two outputs, relative to the largest magnitude of the reference."""
    return ((a - b).abs().max() / scale).item()


def _forked(side: torch.cuda.Stream, work: Callable[[], object]) -> None:
    """``work`` issued on ``side``, which waits for the current stream before it and which the
    current stream waits for after it."""
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream().wait_stream(side)


def graphs_before(count: int, fork: bool, device: torch.device) -> list[torch.cuda.CUDAGraph]:
    """``count`` small CUDA graphs, captured (and replayed once) before any variant records its
    own and kept alive meanwhile: whether a recording is slow for its place among the process's
    graphs. Each scales a small tensor and, if ``fork``, copies 1 MiB of pinned memory on a
    forked side stream, as the model's graphs copy their weights."""
    host = torch.ones(2**18, pin_memory=True)
    dst = torch.zeros(2**18, device=device)
    side = torch.cuda.Stream(device)
    graphs = []
    for _ in range(count):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dst.mul_(1.0)
            if fork:
                _forked(side, lambda: dst.copy_(host, non_blocking=True))
        graph.replay()
        graphs.append(graph)
    torch.cuda.synchronize()
    return graphs


def _between(kind: str, inputs: list[torch.Tensor]) -> Callable[[], None]:
    """Work on the current stream between two replays of a graph that reads ``inputs``: the
    steps of ``kind`` (``+``-joined, in order; ``""`` is none).

    ``"copy"``: ``torch._foreach_copy_`` into ``inputs`` from copies of them made once (one
    kernel: what cudagraph trees do before each replay); ``"memcpy"``: ``copy_`` of each (a
    cudaMemcpyAsync); ``"kernel"``: a one-element fill of a tensor the graph does not read;
    ``"event"``: an event recorded and waited on (no device work); ``"sidecopy"``: the
    ``"copy"`` on a stream of its own, forked from and joined into the current one; ``"hop"``:
    the current stream waits on a side stream that waited on it (no device work, but the
    replay then follows a wait on another stream instead of the work before it)."""
    sources = [t.clone() for t in inputs]
    scratch = torch.empty(1, device=torch.device("cuda", torch.cuda.current_device()))
    event = torch.cuda.Event()
    side = torch.cuda.Stream()

    def copy() -> None:
        if inputs:  # torch._foreach_copy_ refuses empty lists
            torch._foreach_copy_(inputs, sources)

    def memcpy() -> None:
        for dst, src in zip(inputs, sources, strict=True):
            dst.copy_(src)

    def sidecopy() -> None:
        _forked(side, copy)

    def mark() -> None:
        event.record()
        torch.cuda.current_stream().wait_event(event)

    def hop() -> None:
        side.wait_stream(torch.cuda.current_stream())
        torch.cuda.current_stream().wait_stream(side)

    kinds = {
        "copy": copy,
        "memcpy": memcpy,
        "kernel": lambda: scratch.fill_(0.0),
        "event": mark,
        "sidecopy": sidecopy,
        "hop": hop,
    }
    steps = [kinds[step] for step in kind.split("+") if step]

    def run() -> None:
        for step in steps:
            step()

    return run


def captured(
    call: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, how: set[str]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.cuda.CUDAGraph]:
    """``call(ids)`` recorded into one CUDA graph by hand, and a callable that replays it
    (whatever ids it is given) and returns the recording's output tensor. ``how`` holds none
    (a plain ``torch.cuda.graph``) or some of ``"clear"`` (cuBLAS's workspaces cleared around
    the capture), ``"trees"`` (one more warm-up and the capture in cudagraph trees' recording
    context) and ``"copy"`` (a copy into ``ids`` before each replay)."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    if "trees" in how:  # as CUDAGraphTreeManager.__init__, CUDAWarmupNode.run and _record do
        stream, pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        empty = torch.cuda.CUDAGraph()  # the pool exists once a capture used it
        with torch.cuda.graph(empty, pool=pool, stream=stream, capture_error_mode="thread_local"):
            pass
        # the warm-up allocates from the pool on trees' stream (_use_cuda_memory_pool_manager,
        # less its torch.device context, which would make Dynamo recompile the model)
        device = torch.cuda.current_device()
        stream.wait_stream(torch.cuda.current_stream())
        with cudagraph_trees.clear_cublas_manager(), torch.cuda.stream(stream):
            torch._C._cuda_beginAllocateCurrentThreadToPool(device, pool)
            try:
                call(ids)
            finally:
                torch._C._cuda_endAllocateToPool(device, pool)
                torch._C._cuda_releasePool(device, pool)
        torch.cuda.synchronize()
        capture = torch.cuda.graph(
            graph, stream=stream, pool=pool, capture_error_mode="thread_local"
        )
        context = [cudagraph_trees.preserve_rng_state(), cudagraph_trees.clear_cublas_manager()]
    else:
        capture = torch.cuda.graph(graph)
        context = [cudagraph_trees.clear_cublas_manager()] if "clear" in how else []
    with contextlib.ExitStack() as stack:
        for manager in context:
            stack.enter_context(manager)
        stack.enter_context(capture)
        out = call(ids)
    between = _between("+".join(step for step in ("copy", "hop") if step in how), [ids])

    def replay(_: torch.Tensor) -> torch.Tensor:
        between()
        graph.replay()
        return out

    return replay, graph


def _tree_replay(
    device: torch.device, call: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[
    Callable[[torch.Tensor], torch.Tensor], dict[str, Callable[[torch.Tensor], torch.Tensor]]
]:
    """``call`` (a reduce-overhead compile, just replayed by cudagraph trees) and replays of
    the graph trees replayed, their current node's ``torch.cuda.CUDAGraph``, keyed by variant
    suffix: with nothing of trees' replay path around them (``+replay``) or with only some
    work before each (``+replay+copy``, trees' input copy, and the others of `_between`).
    They return ``call``'s last output, whose memory (trees' pool) they rewrite: trees do not
    know of them, so that output stays readable."""
    node = cudagraph_trees.get_manager(device.index).current_node
    if not isinstance(node, cudagraph_trees.CUDAGraphNode) or node.graph is None:
        raise RuntimeError(f"cudagraph trees' current node is not a recorded graph: {node}")
    inputs = [node.reconstructed_inputs[i] for i in node.non_static_input_idx]
    dsts = [t for t in inputs if isinstance(t, torch.Tensor)]
    print(f"trees copy {len(dsts)} inputs before each replay: {[tuple(t.shape) for t in dsts]}")
    last: list[torch.Tensor] = []

    def remembering(ids: torch.Tensor) -> torch.Tensor:
        last[:] = [call(ids)]
        return last[0]

    def replaying(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        own_stream = kind.endswith("sidestream")
        between = _between(kind.removesuffix("sidestream").rstrip("+"), dsts)

        def replay(_: torch.Tensor) -> torch.Tensor:
            between()
            node.graph.replay()
            return last[0]

        return _on_a_stream_of_its_own(replay) if own_stream else replay

    hop = _between("hop", [])

    node_class = cudagraph_trees.CUDAGraphNode
    run_graph = node_class.run_graph

    def hopping(ids: torch.Tensor) -> torch.Tensor:
        """Trees' own call, with the hop between their input copy and their replay."""

        def hop_then_run(self: cudagraph_trees.CUDAGraphNode) -> None:
            hop()
            run_graph(self)

        with _patched(True, node_class, "run_graph", hop_then_run):
            return remembering(ids)

    def without_copy(ids: torch.Tensor) -> torch.Tensor:
        """Trees' own call with their input copy left out (the graph reads the ids it was
        last given, which mode_turns never changes)."""

        def drop(self: cudagraph_trees.CUDAGraphNode, dsts: list, srcs: list) -> None:
            for index in self.non_static_input_idx:
                srcs[index] = None

        with _patched(True, node_class, "_copy_inputs_and_remove_from_src", drop):
            return remembering(ids)

    kinds = [*_BETWEEN, "copy+sidestream"]
    direct = {"+replay" + (f"+{k}" if k else ""): replaying(k) for k in kinds}
    return remembering, {
        **direct,
        "+hop": hopping,
        "+sidestream": _on_a_stream_of_its_own(remembering),
        "+nocopy": without_copy,
        "+nocopy+sidestream": _on_a_stream_of_its_own(without_copy),
    }


def _on_a_stream_of_its_own(
    call: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``call`` issued on a stream of its own, which waits for the current stream before it
    and which the current stream waits for after it: the work between two calls (on the current
    stream) then never sits on the stream the calls' graphs are launched on."""
    own = torch.cuda.Stream()

    def run(ids: torch.Tensor) -> torch.Tensor:
        current = torch.cuda.current_stream()
        own.wait_stream(current)
        with torch.cuda.stream(own):
            out = call(ids)
        current.wait_stream(own)
        return out

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=_ints, default=[1])
    parser.add_argument("--config", type=_configs, default=_configs("2/1/2:pp"))
    parser.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=VARIANTS,
        help=f"a subsequence of {','.join(VARIANTS)} (the order is kept); default is needed",
    )
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument(
        "--min-run-s",
        type=lambda s: [float(t) for t in s.split(",")],
        default=[0.5],
        help="shortest timed run, seconds; several (comma-separated) time the turns again",
    )
    parser.add_argument(
        "--profile", type=int, default=0, help="calls of each variant to profile after timing"
    )
    parser.add_argument(
        "--dump-graphs",
        action="store_true",
        help="keep every CUDA graph's nodes and write reduce-overhead's and the hand "
        "captures' DOT prints (graph-<tokens>-<variant>.dot.gz) after the output check",
    )
    parser.add_argument(
        "--kernel-after-call",
        action="store_true",
        help="every call of every variant is followed by a one-element fill on the current "
        "stream, as a serving loop's sampling follows each step",
    )
    parser.add_argument(
        "--graphs-before",
        default="0",
        help="N or N:fork: N small CUDA graphs (with a forked copy branch) captured and kept "
        "alive before the variants record theirs",
    )
    parser.add_argument(
        "--timeline",
        choices=["copies", "compute"],
        help="the runtime's ops stamp a device-side log (benchmarks.graph_timeline), in the "
        "CUDA graphs too; after timing, --timeline-calls back-to-back calls of each variant are "
        "logged and summarised (timeline-<tokens>.json.gz). `compute` leaves the copy stream "
        "free of the stamps after each copy",
    )
    parser.add_argument("--timeline-calls", type=int, default=40)
    parser.add_argument(
        "--captured-copies",
        action="store_true",
        help="prefetch.offload_host_copies=False: the CUDA graphs capture the copies (as before "
        "session 12); needed by the variants that replay or capture graphs by hand",
    )
    parser.add_argument(
        "--nvtx",
        action="store_true",
        help="every call of every variant in an NVTX range named after it, for an Nsight "
        "Systems trace that benchmarks.graph_trace summarises",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if "default" not in args.variants or not set(args.variants) <= set(VARIANTS):
        parser.error(f"--variants: a subsequence of {VARIANTS} with default")
    replays = {  # variant -> the recording it is made from
        v: recording
        for recording in RECORDINGS
        for v in VARIANTS
        if v in args.variants and v.startswith(recording + "+")
        if v.removeprefix(recording) in FROM_RECORDING
    }
    if not set(replays.values()) <= set(args.variants):
        parser.error("--variants: reduce-overhead[.N]+replay... needs reduce-overhead[.N]")
    graphs = [v for v in args.variants if v.startswith("reduce-overhead") or "+graph" in v]
    if args.captured_copies and graphs and "default+rejoin" not in args.variants:
        # a captured replay leaves its slots as the CUDA-graph schedule does without telling
        # the runtime; default+rejoin, run in Python, brings the runtime's bookkeeping back in
        # line before default's turn (without it default reads a slot it thinks it filled).
        # Host copies keep the bookkeeping exact at every call of the backend's graphs.
        parser.error(f"--variants: {graphs} need default+rejoin between them and default")
    by_hand = [v for v in args.variants if v in replays or "+graph" in v]
    if by_hand and not args.captured_copies:
        # with host copies only the backend's own call of a graph issues its copies
        parser.error(f"--variants: {by_hand} need --captured-copies")
    if args.timeline == "copies" and not args.captured_copies:
        parser.error("--timeline copies needs --captured-copies (host copies are not stamped)")
    device = torch.device("cuda", torch.cuda.current_device())
    spec = {"shape": LLAMA_8B, "layers": args.layers, "tokens": args.tokens}
    options = {"prefetch": {**args.config[0], "offload_host_copies": not args.captured_copies}}
    model = build_model(spec, torch.device("cpu"), torch.bfloat16)
    with torch.no_grad():  # the builder fills every layer alike; a slot mix-up must show
        for i, layer in enumerate(_layers(model)):
            for param in layer.parameters():
                param.mul_(1 + 0.02 * i)
    place_model(model, options, device)
    hosts = [h for h in map(host_copy, model.parameters()) if h is not None]
    calls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for variant in [v for v in VARIANTS if v in args.variants]:
        if variant in replays:
            continue  # reduce-overhead's recording, taken from trees below
        # a backend object of its own, so Dynamo does not reuse another variant's compile
        compiled = torch.compile(
            model, backend=functools.partial(backend.offload_backend, options=options)
        )
        calls[variant] = _call(compiled)
    inputs = {t: torch.randint(0, LLAMA_8B["vocab"], (1, t), device=device) for t in args.tokens}
    count, _, kind = args.graphs_before.partition(":")
    kept = graphs_before(int(count), kind == "fork", device)  # alive until the summary
    results = []
    timeline = Timeline(device, copies=args.timeline == "copies") if args.timeline else None
    with torch.no_grad(), timeline.patched() if timeline else contextlib.nullcontext():
        for tokens, ids in inputs.items():
            expected = _call(model)(ids).float()  # reads the offloaded weights in place
            runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
            first: dict[str, torch.Tensor] = {}
            graphs: dict[str, torch.cuda.CUDAGraph] = {}
            for variant, call in calls.items():
                with compiling_as(variant), _debug_graphs(args.dump_graphs):
                    for _ in range(3):  # compile, cudagraph warm-up, recording
                        call(ids)
                if variant in RECORDINGS:
                    graphs[variant] = cudagraph_trees.get_manager(device.index).current_node.graph
                # captured right after its own warm-up, which joined its copies: nothing
                # another variant started is pending
                if "+graph" in variant:
                    how = set(variant.rpartition("+graph")[2].split("+")) - {""}
                    with _debug_graphs(args.dump_graphs):
                        runs[variant], graphs[variant] = captured(call, ids, how)
                elif variant == "reduce-overhead+unstaged+sidecopy":
                    runs[variant] = _trees_copy_on_a_side_stream(call)
                else:
                    runs[variant] = call
                first[variant] = runs[variant](ids).float()
                derived = [name for name, recording in replays.items() if recording == variant]
                if derived:
                    runs[variant], direct = _tree_replay(device, call)
                    first[variant] = runs[variant](ids).float()
                    for name in derived:
                        runs[name] = direct[name.removeprefix(variant)]
                        first[name] = runs[name](ids).float()
                partitions = torch._dynamo.utils.counters["inductor"]["cudagraph_partitions"]
                print(f"{variant}: {partitions} cudagraph partitions so far", flush=True)
            if args.kernel_after_call:
                runs = {variant: _kernel_after(run) for variant, run in runs.items()}
            if args.nvtx:
                runs = {variant: _in_nvtx_range(variant, run) for variant, run in runs.items()}
            timed = {}
            for min_run_s in args.min_run_s:
                floor_before = copy_floor_ms(hosts, device)
                times = time_calls(runs, ids, True, args.runs, min_run_s)
                timed[min_run_s] = (times, (floor_before + copy_floor_ms(hosts, device)) / 2)
            returns = {  # in turn order, as timed
                variant: return_ms(run, ids, statistics.median(times[variant]), min_run_s)
                for variant, run in runs.items()
            }
            if args.profile:
                profiles = {}
                for variant, run in runs.items():  # in turn order, as timed
                    prof = profiled_calls(functools.partial(run, ids), args.profile)
                    profiles[variant] = summarise(prof, args.profile, top=40)
                (args.out / f"profile-{tokens}.json").write_text(json.dumps(profiles, indent=1))
            timelines = {}
            if timeline:
                logs = {}
                for variant, run in runs.items():  # in turn order, as timed
                    timeline.reset()
                    for _ in range(args.timeline_calls):
                        run(ids)
                    logs[variant] = timeline.read()
                    timelines[variant] = summarise_timeline(logs[variant], timeline.unit_bytes)
                    print(variant, json.dumps({**timelines[variant], "units": "..."}), flush=True)
                dump = {"unit_bytes": timeline.unit_bytes, "summaries": timelines, "logs": logs}
                name = f"timeline-{tokens}.json.gz"
                (args.out / name).write_bytes(gzip.compress(json.dumps(dump).encode()))
            # one more turn: each variant's output must not have changed since its warm-up
            # (the same kernels; the layers' weights are scaled apart, so a slot that held
            # another layer's weights shows)
            outputs = {variant: run(ids).float() for variant, run in runs.items()}
            distance = functools.partial(_distance, scale=expected.abs().max())
            changed = {v: d for v, o in outputs.items() if (d := distance(o, first[v])) > 1e-6}
            if args.dump_graphs:
                dump_graphs(graphs, args.out, tokens)
            for min_run_s, (times, floor) in timed.items():
                for variant, ms in times.items():
                    turns = [x / y - 1 for x, y in zip(ms, times["default"], strict=True)]
                    results.append(
                        {
                            "tokens": tokens,
                            "min_run_s": min_run_s,
                            "variant": variant,
                            "ms": statistics.median(ms),
                            "ms_runs": ms,
                            "vs_default_median_turn": statistics.median(turns),
                            "vs_default_fastest_runs": min(ms) / min(times["default"]) - 1,
                            "max_error_vs_uncompiled": distance(outputs[variant], expected),
                            "max_difference_vs_default": distance(
                                outputs[variant], outputs["default"]
                            ),
                            "copy_floor_ms": floor,
                            "output_changed_by": changed.get(variant, 0.0),
                            **returns[variant],
                            "timeline": {
                                k: v for k, v in timelines.get(variant, {}).items() if k != "units"
                            },
                        }
                    )
                    print(json.dumps({k: v for k, v in results[-1].items() if k != "ms_runs"}))
            summary = {  # rewritten after each token count: a run cut short keeps those
                "device": torch.cuda.get_device_name(device),
                "torch": torch.__version__,
                "layers": args.layers,
                "config": options["prefetch"],
                "copied_bytes_per_forward": sum(h.nbytes for h in hosts),
                "kernel_after_call": args.kernel_after_call,
                "graphs_before": {"count": len(kept), "fork": kind == "fork"},
                "results": results,
            }
            (args.out / "mode_turns.json").write_text(json.dumps(summary, indent=1))
    changed = {r["variant"] for r in results if r["output_changed_by"]}
    if changed:
        raise SystemExit(f"outputs changed after taking turns: {sorted(changed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
