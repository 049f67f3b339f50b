"""Configuration of weight offloading for the ``offload`` torch.compile backend.

Field names, defaults, bounds and cross-field rules mirror vLLM's ``vllm/config/offload.py``.
The models are frozen and reject unknown keys: a config is part of the compile cache key, and a
misspelled option must fail loudly rather than compile a model that offloads nothing.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from .budget import MemoryAmount, check_amount

OffloadBackend = Literal["auto", "uva", "prefetch"]
InductorMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

_HASH_SCHEMA = "offload_compiler.config.v1"
"""Mixed into every hash; bump it when the meaning of an existing field changes."""


def _check_pattern(pattern: str) -> str:
    if any(segment == "" for segment in pattern.split(".")):
        raise ValueError(
            f"segment pattern {pattern!r} must be non-empty, without a leading, trailing "
            "or doubled '.'"
        )
    return pattern


SegmentPatterns = Annotated[
    frozenset[Annotated[str, AfterValidator(_check_pattern)]],
    # sorted so that dumps, and so compute_hash, do not depend on PYTHONHASHSEED
    PlainSerializer(sorted, return_type=list[str], when_used="json"),
]
"""Dotted parameter-name segment patterns, matched by ``matches_segments``."""


def matches_segments(name: str, patterns: Iterable[str]) -> bool:
    """Whether some pattern equals a run of whole dot-separated segments of ``name``:
    ``"w13_weight"`` selects ``"mlp.experts.w13_weight"``, not ``"...w13_weight_scale"``."""
    dotted = f".{name}."
    return any(f".{pattern}." in dotted for pattern in patterns)


class _FrozenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class UVAOffloadConfig(_FrozenConfig):
    """UVA (Unified Virtual Addressing) offloading: weights stay in pinned host memory, read
    zero-copy by every forward; each step pays the host link bandwidth."""

    cpu_offload_gb: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    """GiB of parameters to keep in pinned host memory, per GPU; 0 disables UVA offloading.
    Finite, so that it is a real budget and hashes unambiguously."""

    cpu_offload_params: SegmentPatterns = frozenset()
    """Segment patterns choosing which parameters may be offloaded; empty means any parameter,
    in order, until ``cpu_offload_gb`` is used up."""

    use_unified_addressing: bool = True
    """Read offloaded parameters in place through a device view of the pinned memory. False (or
    ``OFFLOAD_COMPILER_DISABLE_UVA=1``, or a machine without unified addressing) makes the graph
    copy each offloaded parameter to the device right before its use instead."""


class PrefetchOffloadConfig(_FrozenConfig):
    """Prefetch offloading: whole layers live on the host and are copied into a few shared GPU
    slot buffers on a side stream, ``offload_prefetch_step`` layers ahead of use."""

    offload_group_size: int = Field(default=0, ge=0)
    """Split the repeated layers into groups of this many; 0 disables prefetch offloading.
    E.g. group 8 with 2 offloaded per group offloads layers 6, 7, 14, 15, ..."""

    offload_num_in_group: int = Field(default=1, ge=1)
    """How many layers at the end of each group are offloaded; at most ``offload_group_size``.
    The resident layers before them hide the copy latency."""

    offload_prefetch_step: int = Field(default=1, ge=0)
    """How many offloaded layers ahead to prefetch, which is also the number of GPU slots (one
    slot of GPU memory each); >= 1 whenever prefetch offloading is enabled."""

    offload_params: SegmentPatterns = frozenset()
    """Segment patterns choosing which parameters of an offloaded layer are offloaded; empty
    means all of them (e.g. ``{"experts"}`` keeps attention weights resident)."""

    offload_layers: tuple[int, ...] = ()
    """Offload exactly these repeated blocks (indices, ascending) instead of the group pattern;
    what the planner writes for a ``gpu_memory_budget``. Needs ``offload_group_size`` 0."""

    offload_layer_params: tuple[tuple[int, SegmentPatterns], ...] = ()
    """Per layer of ``offload_layers``, the segment patterns of its offloaded parameters, where
    only a part of it is offloaded (the planner's partial layer); other layers follow
    ``offload_params``."""

    offload_per_param: bool = True
    """Stream each parameter on its own: parameter j of a slot's next layer is copied as soon as
    this layer's last read of j is done, and waited for right before its first read, so one slot
    behaves almost like two. False gives one wait and one start per layer."""

    offload_capturable: bool = False
    """Compile every offloaded graph with the schedule a CUDA graph needs (copies rejoined
    before it returns, the next forward's first ones started at its top, as under
    ``mode="reduce-overhead"``), so that it can be captured outside Inductor
    (``torch.cuda.graph``, a serving framework's wrapper). Such replays run no Python: after
    changing weights, call ``offload_compiler.reload_weights``."""

    offload_host_copies: bool = True
    """Under CUDA graphs (``mode="reduce-overhead"``), leave the prefetch copies out of the
    graphs (captured, some recordings' copies run slower): the host issues them after each
    replay, ordered with the graph's reads by counters in device memory. False captures them.
    ``offload_capturable`` implies False (its replays have no host step); no effect on CPU."""

    @model_validator(mode="after")
    def _check_layers(self) -> PrefetchOffloadConfig:
        if self.offload_layers:
            if self.offload_group_size:
                raise ValueError(
                    f"offload_layers {list(self.offload_layers)} and offload_group_size "
                    f"{self.offload_group_size} both choose layers; set one of them"
                )
            if (
                list(self.offload_layers) != sorted(set(self.offload_layers))
                or min(self.offload_layers) < 0
            ):
                raise ValueError(
                    f"offload_layers {list(self.offload_layers)} must be distinct non-negative "
                    "indices in ascending order"
                )
        unknown = [i for i, _ in self.offload_layer_params if i not in self.offload_layers]
        if unknown:
            raise ValueError(f"offload_layer_params names layers {unknown} not in offload_layers")
        return self

    @property
    def enabled(self) -> bool:
        """Whether this config offloads any layer."""
        return self.offload_group_size > 0 or bool(self.offload_layers)

    def is_offloaded_layer(self, index: int) -> bool:
        """Whether repeated block ``index`` is offloaded: listed in ``offload_layers``, or among
        the last of its group."""
        if self.offload_layers:
            return index in self.offload_layers
        group = self.offload_group_size
        return group > 0 and index % group >= group - self.offload_num_in_group

    def offloaded_layers(self, num_layers: int) -> list[int]:
        """Indices, ascending, of the offloaded layers among ``num_layers`` repeated blocks."""
        beyond = [i for i in self.offload_layers if i >= num_layers]
        if beyond:
            raise ValueError(
                f"offload_layers names layers {beyond}, but the model has {num_layers} layers"
            )
        return [index for index in range(num_layers) if self.is_offloaded_layer(index)]

    def layer_params(self, index: int) -> frozenset[str]:
        """The segment patterns choosing layer ``index``'s offloaded parameters (empty: all)."""
        return dict(self.offload_layer_params).get(index, self.offload_params)


class OffloadConfig(_FrozenConfig):
    """Everything the ``offload`` backend reads from ``torch.compile(options=...)``."""

    offload_backend: OffloadBackend = "auto"
    """Which offloading mechanism to use. ``"auto"`` picks prefetch when
    ``prefetch.offload_group_size > 0``, else UVA when ``uva.cpu_offload_gb > 0``."""

    uva: UVAOffloadConfig = Field(default_factory=UVAOffloadConfig)
    """Settings used by the UVA backend."""

    prefetch: PrefetchOffloadConfig = Field(default_factory=PrefetchOffloadConfig)
    """Settings used by the prefetch backend."""

    layers_path: str | tuple[str, ...] | None = None
    """Dotted path, relative to the compiled module, of the ``nn.ModuleList`` (or
    ``nn.Sequential``) of repeated blocks (``"model.layers"``), or several paths in execution
    order (``["encoder.block", "decoder.block"]``), whose blocks are then numbered as one
    concatenated stack with one prefetch ring. ``None`` takes every stack of blocks found, in
    registration order."""

    mode: InductorMode | None = None
    """Inductor mode to compile with (``torch.compile`` refuses ``mode=`` with ``options=``)."""

    poison_slots: bool = False
    """Debugging aid: fill a slot with NaN on the compute stream before each prefetch copy, so
    that a missing wait shows up as NaN in the output instead of as silently stale weights."""

    gpu_memory_budget: Annotated[MemoryAmount, AfterValidator(check_amount)] | None = None
    """Device memory the offloaded model may use: bytes, a string with a unit (``"10GiB"``) or
    a fraction of the device's memory. The planner (`offload_compiler.plan`) then chooses the
    offloaded layers and parameters; leave the prefetch layer choice and UVA unset."""

    memory_reserve: Annotated[MemoryAmount, AfterValidator(check_amount)] = 0
    """Part of ``gpu_memory_budget`` the planner leaves free for the caller (a KV cache)."""

    plan_tokens: tuple[Annotated[int, Field(ge=1)], ...] = Field(default=(1, 2048), min_length=1)
    """Token counts the planner predicts times for; the largest sizes the activation
    workspace it counts in the budget."""

    @field_validator("layers_path")
    @classmethod
    def _check_layers_path(cls, path: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        paths = (path,) if isinstance(path, str) else path or ()
        if path is not None and not paths:
            raise ValueError("layers_path must name at least one path (or be None)")
        for one in paths:
            if not all(
                segment.isidentifier() or (segment.isascii() and segment.isdigit())
                for segment in one.split(".")
            ):
                raise ValueError(
                    f"layers_path {one!r} must be a non-empty dotted path whose segments are "
                    "Python identifiers or decimal integers, e.g. 'model.layers'"
                )
        if len(set(paths)) < len(paths):
            raise ValueError(f"layers_path names a path twice: {list(paths)}")
        return path[0] if isinstance(path, tuple) and len(path) == 1 else path

    @model_validator(mode="after")
    def _check_backends(self) -> OffloadConfig:
        prefetch = self.prefetch
        if self.offload_backend == "prefetch" or prefetch.enabled:
            if (
                not prefetch.offload_layers
                and prefetch.offload_num_in_group > prefetch.offload_group_size
            ):
                raise ValueError(
                    f"offload_num_in_group ({prefetch.offload_num_in_group}) must be "
                    f"<= offload_group_size ({prefetch.offload_group_size})"
                )
            if prefetch.offload_prefetch_step < 1:
                raise ValueError(
                    f"offload_prefetch_step ({prefetch.offload_prefetch_step}) must be >= 1 "
                    "when prefetch offloading is enabled"
                )

        if self.gpu_memory_budget is not None and (
            prefetch.enabled or self.uva.cpu_offload_gb > 0 or self.offload_backend == "uva"
        ):
            raise ValueError(
                "gpu_memory_budget lets the planner choose what is offloaded; leave "
                "prefetch.offload_group_size, prefetch.offload_layers, uva.cpu_offload_gb and "
                "offload_backend='uva' unset with it"
            )
        # mismatches are honoured (the chosen backend wins), so they only warn
        uva_active = self.uva.cpu_offload_gb > 0
        prefetch_active = prefetch.enabled
        ignored = None
        if self.offload_backend == "uva" and prefetch_active:
            ignored = "Prefetch"
        elif self.offload_backend == "prefetch" and uva_active:
            ignored = "UVA"
        if ignored is not None:
            warnings.warn(
                f"{ignored} offload fields are set but offload_backend={self.offload_backend!r}. "
                f"{ignored} settings will be ignored.",
                UserWarning,
                stacklevel=2,
            )
        elif self.offload_backend == "auto" and uva_active and prefetch_active:
            warnings.warn(
                "Both UVA and prefetch offload fields are set with offload_backend='auto'. "
                "Prefetch backend will be selected. "
                "Set offload_backend explicitly to suppress this warning.",
                UserWarning,
                stacklevel=2,
            )
        return self

    @property
    def selected_backend(self) -> Literal["prefetch", "uva"] | None:
        """The backend that will run, or ``None`` when ``"auto"`` finds nothing to offload."""
        if self.offload_backend != "auto":
            return self.offload_backend
        if self.prefetch.enabled:
            return "prefetch"
        if self.uva.cpu_offload_gb > 0:
            return "uva"
        return None

    def compute_hash(self) -> str:
        """SHA-256 hex digest of every field, for the compile cache key; the same in every
        process, whatever ``PYTHONHASHSEED``."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(f"{_HASH_SCHEMA}:{canonical}".encode()).hexdigest()

    @classmethod
    def from_options(cls, options: OffloadConfig | Mapping[str, Any] | None) -> OffloadConfig:
        """Build the config from what was passed as ``torch.compile(options=...)``."""
        if options is None:
            return cls()
        if isinstance(options, OffloadConfig):
            return options
        if isinstance(options, Mapping):
            return cls.model_validate(dict(options))
        raise TypeError(
            "offload options must be an OffloadConfig, a Mapping of its fields or None, "
            f"got {type(options).__qualname__}"
        )
