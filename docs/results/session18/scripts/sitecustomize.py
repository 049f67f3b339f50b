"""Session 18 experiment (not product code): when cudagraph trees' manager is created.

OFFLOAD_EXP=trees-first: a benchmark worker records a tiny reduce-overhead function before
anything else, so the trees' manager (its stream, its memory pool) exists before any model.
OFFLOAD_EXP=trees-before-ro: the same, right before the first reduce-overhead model is placed.
"""

import os
import sys

_EXP = os.environ.get("OFFLOAD_EXP", "")


def _tiny_trees() -> None:
    import torch

    f = torch.compile(lambda x: x * 2 + 1, mode="reduce-overhead")
    x = torch.ones(1 << 20, device="cuda")
    for _ in range(3):
        f(x)
    torch.cuda.synchronize()
    from torch._inductor import cudagraph_trees

    print(f"[exp] trees manager created: {cudagraph_trees.get_manager(0, False)}", flush=True)


if _EXP and "--worker" in sys.argv:
    if _EXP == "trees-first":
        _tiny_trees()
    elif _EXP == "trees-before-ro":
        import offload_compiler

        _place = offload_compiler.place_model
        _done = []

        def place_model(model, options=None, device="cuda"):
            if not _done and isinstance(options, dict) and options.get("mode") == "reduce-overhead":
                _done.append(True)
                _tiny_trees()
            return _place(model, options, device)

        offload_compiler.place_model = place_model


# OFFLOAD_STREAMS=shift<N> | high: the first reduce-overhead model's copy stream (the first pool
# stream runtime.py asks for once that model is being placed) comes N pool streams later, or
# from the high-priority pool. Every pool stream created is printed with its caller.
_STREAMS = os.environ.get("OFFLOAD_STREAMS", "")
if "--worker" in sys.argv and (_STREAMS or _EXP):
    import inspect

    import torch

    import offload_compiler

    _state = {"ro_placing": False, "done": False, "n": 0}
    _original_new = torch.cuda.Stream.__new__

    def _new(cls, device=None, priority=0, **kwargs):
        caller = ""
        if not kwargs:
            frame = next((f for f in inspect.stack()[1:] if "torch/cuda" not in f.filename), None)
            caller = f"{os.path.basename(frame.filename)}:{frame.function}" if frame else ""
            if _state["ro_placing"] and not _state["done"] and caller.startswith("runtime.py"):
                _state["done"] = True
                if _STREAMS.startswith("shift"):
                    for _ in range(int(_STREAMS[5:])):
                        extra = _original_new(cls, device, 0)
                        print(f"[exp] stream {_state['n']}: dummy id={extra.stream_id}", flush=True)
                        _state["n"] += 1
                elif _STREAMS == "high":
                    priority = -1
        stream = _original_new(cls, device, priority, **kwargs)
        if not kwargs:
            print(
                f"[exp] stream {_state['n']}: id={stream.stream_id} prio={priority} by {caller}"
                f" ro_placing={_state['ro_placing']}",
                flush=True,
            )
            _state["n"] += 1
        return stream

    torch.cuda.Stream.__new__ = staticmethod(_new)
    _place_s = offload_compiler.place_model

    def _place_logged(model, options=None, device="cuda"):
        if isinstance(options, dict) and options.get("mode") == "reduce-overhead":
            _state["ro_placing"] = True
        return _place_s(model, options, device)

    offload_compiler.place_model = _place_logged
