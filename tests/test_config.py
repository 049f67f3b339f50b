"""Tests of offload_compiler.config: defaults, validation, warnings, matching and hashing."""

from __future__ import annotations

import copy
import itertools
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from offload_compiler.config import (
    OffloadConfig,
    PrefetchOffloadConfig,
    UVAOffloadConfig,
    matches_segments,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _quietly(**kwargs: Any) -> OffloadConfig:
    """Build a config whose cross-backend warning is not what the test is about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return OffloadConfig.model_validate(kwargs)


# --- defaults and layer selection -----------------------------------------------------


def test_defaults() -> None:
    config = OffloadConfig()
    assert config.offload_backend == "auto"
    assert config.uva == UVAOffloadConfig()
    assert config.uva.cpu_offload_gb == 0
    assert config.uva.cpu_offload_params == frozenset()
    assert config.prefetch == PrefetchOffloadConfig()
    assert config.prefetch.offload_group_size == 0
    assert config.prefetch.offload_num_in_group == 1
    assert config.prefetch.offload_prefetch_step == 1
    assert config.prefetch.offload_params == frozenset()
    assert config.layers_path is None
    assert config.mode is None
    assert config.poison_slots is False
    assert config.selected_backend is None


def test_configs_are_frozen() -> None:
    config = OffloadConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.poison_slots = True  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        config.prefetch.offload_group_size = 4  # type: ignore[misc]


def test_set_fields_accept_lists_and_sets_and_become_frozensets() -> None:
    config = OffloadConfig.model_validate(
        {
            "uva": {"cpu_offload_params": ["experts", "w2_weight"]},
            "prefetch": {"offload_params": {"a"}},
        }
    )
    assert config.uva.cpu_offload_params == frozenset({"experts", "w2_weight"})
    assert isinstance(config.uva.cpu_offload_params, frozenset)
    assert config.prefetch.offload_params == frozenset({"a"})
    assert isinstance(config.prefetch.offload_params, frozenset)


@pytest.mark.parametrize(
    ("group_size", "num_in_group", "expected"),
    [(8, 2, [6, 7, 14, 15]), (4, 1, [3, 7, 11, 15]), (4, 4, list(range(16))), (0, 1, [])],
)
def test_is_offloaded_layer(group_size: int, num_in_group: int, expected: list[int]) -> None:
    prefetch = PrefetchOffloadConfig(
        offload_group_size=group_size, offload_num_in_group=num_in_group
    )
    assert [i for i in range(16) if prefetch.is_offloaded_layer(i)] == expected
    assert prefetch.offloaded_layers(16) == expected


def test_offloaded_layers_counts() -> None:
    assert PrefetchOffloadConfig(offload_group_size=4).offloaded_layers(8) == [3, 7]
    assert PrefetchOffloadConfig(offload_group_size=4).offloaded_layers(7) == [3]
    assert PrefetchOffloadConfig(offload_group_size=8, offload_num_in_group=2).offloaded_layers(
        24
    ) == [6, 7, 14, 15, 22, 23]
    assert PrefetchOffloadConfig(offload_group_size=4).offloaded_layers(0) == []
    assert PrefetchOffloadConfig().offloaded_layers(32) == []


# --- validation -------------------------------------------------------------------------


def test_num_in_group_larger_than_group_size_is_rejected() -> None:
    with pytest.raises(
        ValidationError, match=r"offload_num_in_group \(3\).*offload_group_size \(2\)"
    ):
        OffloadConfig(prefetch=PrefetchOffloadConfig(offload_group_size=2, offload_num_in_group=3))


def test_prefetch_backend_without_group_size_is_rejected() -> None:
    # As in vLLM: the explicit backend enables the checks, and num_in_group >= 1 > 0.
    with pytest.raises(ValidationError, match="offload_num_in_group"):
        OffloadConfig(offload_backend="prefetch")


def test_explicit_layers_select_the_prefetch_backend() -> None:
    config = OffloadConfig(prefetch=PrefetchOffloadConfig(offload_layers=(0, 5)))
    assert config.selected_backend == "prefetch"
    assert config.prefetch.offloaded_layers(8) == [0, 5]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"offload_layers": (1, 3), "offload_group_size": 2}, "both choose layers"),
        ({"offload_layers": (3, 1)}, "distinct non-negative indices in ascending order"),
        ({"offload_layers": (1, 1)}, "distinct non-negative indices in ascending order"),
        ({"offload_layers": (-1, 2)}, "distinct non-negative indices in ascending order"),
        ({"offload_layer_params": ((2, frozenset({"w"})),)}, r"names layers \[2\] not in"),
    ],
)
def test_explicit_layers_are_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PrefetchOffloadConfig(**fields)


def test_prefetch_step_zero_is_rejected_when_prefetch_is_enabled() -> None:
    with pytest.raises(ValidationError, match=r"offload_prefetch_step \(0\) must be >= 1"):
        OffloadConfig.model_validate(
            {"prefetch": {"offload_group_size": 4, "offload_prefetch_step": 0}}
        )
    # Step 0 is fine while prefetch offloading is off.
    assert OffloadConfig.model_validate({"prefetch": {"offload_prefetch_step": 0}})


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"prefetch": {"offload_group_size": -1}}, "prefetch.offload_group_size"),
        (
            {"prefetch": {"offload_group_size": 4, "offload_num_in_group": 0}},
            "offload_num_in_group",
        ),
        ({"prefetch": {"offload_prefetch_step": -1}}, "prefetch.offload_prefetch_step"),
        ({"uva": {"cpu_offload_gb": -0.5}}, "uva.cpu_offload_gb"),
        ({"uva": {"cpu_offload_gb": float("inf")}}, "uva.cpu_offload_gb"),
        ({"offload_backend": "cuda"}, "offload_backend"),
        ({"mode": "fast"}, "mode"),
        ({"poison_slots": "maybe"}, "poison_slots"),
    ],
)
def test_out_of_range_values_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        OffloadConfig.model_validate(options)
    assert field in str(excinfo.value)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"offload_group_size": 8}, "offload_group_size"),
        ({"prefetch": {"offload_group": 8}}, "prefetch.offload_group"),
        ({"uva": {"cpu_offload_gib": 1}}, "uva.cpu_offload_gib"),
    ],
)
def test_unknown_keys_are_rejected(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted") as excinfo:
        OffloadConfig.model_validate(options)
    assert key in str(excinfo.value)


@pytest.mark.parametrize("pattern", ["", ".experts", "experts.", "mlp..experts", "."])
@pytest.mark.parametrize("section", ["uva.cpu_offload_params", "prefetch.offload_params"])
def test_bad_segment_patterns_are_rejected(pattern: str, section: str) -> None:
    sub, field = section.split(".")
    with pytest.raises(ValidationError, match="segment pattern") as excinfo:
        OffloadConfig.model_validate({sub: {field: ["ok", pattern]}})
    assert section in str(excinfo.value)


def test_a_bare_string_is_not_a_pattern_set() -> None:
    # set("experts") would silently become single characters.
    with pytest.raises(ValidationError, match=r"prefetch\.offload_params"):
        OffloadConfig.model_validate({"prefetch": {"offload_params": "experts"}})


@pytest.mark.parametrize(
    "path", ["", ".", "model.", ".layers", "model..layers", "model.layers-0", "1x", "model. layers"]
)
def test_bad_layers_path_is_rejected(path: str) -> None:
    with pytest.raises(ValidationError, match="layers_path"):
        OffloadConfig(layers_path=path)


@pytest.mark.parametrize(
    "path", ["layers", "model.layers", "transformer.h", "blocks.0.layers", "_x"]
)
def test_good_layers_path_is_kept(path: str) -> None:
    assert OffloadConfig(layers_path=path).layers_path == path


@pytest.mark.parametrize(
    "mode", ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
)
def test_inductor_modes_are_accepted(mode: str) -> None:
    assert OffloadConfig.model_validate({"mode": mode}).mode == mode


# --- cross-backend warnings -----------------------------------------------------------


def test_uva_backend_with_prefetch_settings_warns() -> None:
    with pytest.warns(UserWarning, match="Prefetch settings will be ignored"):
        OffloadConfig(offload_backend="uva", prefetch=PrefetchOffloadConfig(offload_group_size=4))


def test_prefetch_backend_with_uva_settings_warns() -> None:
    with pytest.warns(UserWarning, match="UVA settings will be ignored"):
        OffloadConfig(
            offload_backend="prefetch",
            uva=UVAOffloadConfig(cpu_offload_gb=2),
            prefetch=PrefetchOffloadConfig(offload_group_size=4),
        )


def test_auto_backend_with_both_settings_warns() -> None:
    with pytest.warns(
        UserWarning,
        match=re.escape(
            "Prefetch backend will be selected. "
            "Set offload_backend explicitly to suppress this warning."
        ),
    ):
        OffloadConfig(
            uva=UVAOffloadConfig(cpu_offload_gb=2),
            prefetch=PrefetchOffloadConfig(offload_group_size=4),
        )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"prefetch": {"offload_group_size": 8, "offload_num_in_group": 2}},
        {"offload_backend": "prefetch", "prefetch": {"offload_group_size": 4}},
        {"offload_backend": "uva", "uva": {"cpu_offload_gb": 4}},
        {"uva": {"cpu_offload_gb": 4, "cpu_offload_params": ["experts"]}},
    ],
)
def test_consistent_configs_do_not_warn(options: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OffloadConfig.model_validate(options)


# --- backend selection ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, None),
        ({"prefetch": {"offload_group_size": 4}}, "prefetch"),
        ({"uva": {"cpu_offload_gb": 1}}, "uva"),
        ({"uva": {"cpu_offload_gb": 1}, "prefetch": {"offload_group_size": 4}}, "prefetch"),
        ({"offload_backend": "uva"}, "uva"),
        ({"offload_backend": "uva", "prefetch": {"offload_group_size": 4}}, "uva"),
        ({"offload_backend": "prefetch", "prefetch": {"offload_group_size": 4}}, "prefetch"),
        (
            {
                "offload_backend": "prefetch",
                "uva": {"cpu_offload_gb": 1},
                "prefetch": {"offload_group_size": 4},
            },
            "prefetch",
        ),
    ],
)
def test_selected_backend(options: dict[str, Any], expected: str | None) -> None:
    assert _quietly(**options).selected_backend == expected


# --- segment matching -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("mlp.experts.w13_weight", ["w13_weight"], True),
        ("mlp.experts.w13_weight", ["experts.w13_weight"], True),
        ("mlp.experts.w13_weight", ["mlp.experts.w13_weight"], True),
        ("mlp.experts.w13_weight", ["mlp"], True),
        ("mlp.experts.w13_weight", ["w13"], False),
        ("mlp.experts.w13_weight", ["expert"], False),
        ("mlp.experts.w13_weight", ["mlp.w13_weight"], False),
        ("mlp.experts.w13_weight", ["w13_weight.experts"], False),
        ("mlp.experts.w13_weight", ["p.experts"], False),
        ("mlp.experts.w13_weight_scale", ["w13_weight"], False),
        ("mlp.experts.w13_weight_scale", ["w13", "w13_weight", "experts.w13_weight"], False),
        ("mlp.experts.w13_weight_scale", ["w13", "experts"], True),
        ("layers.3.self_attn.qkv_proj.weight", ["self_attn.qkv_proj"], True),
        ("layers.3.self_attn.qkv_proj.weight", ["3.self_attn"], True),
        ("layers.13.self_attn.weight", ["3.self_attn"], False),
        ("weight", ["weight"], True),
        ("mlp.experts.w13_weight", [], False),
    ],
)
def test_matches_segments(name: str, patterns: list[str], expected: bool) -> None:
    assert matches_segments(name, patterns) is expected


def test_matches_segments_accepts_any_iterable() -> None:
    assert matches_segments("mlp.experts.w2_weight", frozenset({"experts"}))
    assert matches_segments("mlp.experts.w2_weight", (p for p in ["x", "w2_weight"]))


# --- from_options -----------------------------------------------------------------------


def test_from_options_none_gives_defaults() -> None:
    assert OffloadConfig.from_options(None) == OffloadConfig()


def test_from_options_mapping() -> None:
    options = {"layers_path": "model.layers", "prefetch": {"offload_group_size": 4}}
    config = OffloadConfig.from_options(options)
    assert config.layers_path == "model.layers"
    assert config.prefetch.offload_group_size == 4
    assert OffloadConfig.from_options(types.MappingProxyType(options)) == config


def test_from_options_mapping_is_validated() -> None:
    with pytest.raises(ValidationError, match="bogus"):
        OffloadConfig.from_options({"bogus": 1})


def test_from_options_instance_is_returned_unchanged() -> None:
    config = OffloadConfig(poison_slots=True)
    assert OffloadConfig.from_options(config) is config


@pytest.mark.parametrize("bad", [[("mode", "default")], "mode=default", 3])
def test_from_options_rejects_other_types(bad: object) -> None:
    with pytest.raises(TypeError, match=type(bad).__qualname__) as excinfo:
        OffloadConfig.from_options(bad)  # type: ignore[arg-type]
    assert "OffloadConfig" in str(excinfo.value)
    assert "Mapping" in str(excinfo.value)


# --- compute_hash -----------------------------------------------------------------------

_HASH_BASE: dict[str, Any] = {
    "offload_backend": "auto",
    "uva": {
        "cpu_offload_gb": 0.0,
        "cpu_offload_params": ["experts"],
        "use_unified_addressing": True,
    },
    "prefetch": {
        "offload_group_size": 4,
        "offload_num_in_group": 1,
        "offload_prefetch_step": 1,
        "offload_params": ["w13_weight"],
        "offload_per_param": False,
        "offload_capturable": False,
        "offload_host_copies": True,
        "offload_layers": [],
        "offload_layer_params": [],
    },
    "layers_path": None,
    "mode": None,
    "poison_slots": False,
    "gpu_memory_budget": None,
    "memory_reserve": 0,
    "plan_tokens": [1, 2048],
}

# One entry per field, each changed on its own.
_HASH_CHANGES: list[tuple[str, Any]] = [
    ("offload_backend", "prefetch"),
    ("uva.cpu_offload_gb", 2.5),
    ("uva.cpu_offload_params", ["experts", "w2_weight"]),
    ("uva.use_unified_addressing", False),
    ("prefetch.offload_group_size", 8),
    ("prefetch.offload_num_in_group", 2),
    ("prefetch.offload_prefetch_step", 2),
    ("prefetch.offload_params", ["w13_weight", "w2_weight"]),
    ("prefetch.offload_per_param", True),
    ("prefetch.offload_capturable", True),
    ("prefetch.offload_host_copies", False),
    ("prefetch.offload_layers", [1, 3]),
    ("prefetch.offload_layer_params", [(3, ["up_proj"])]),
    ("layers_path", "model.layers"),
    ("mode", "max-autotune"),
    ("poison_slots", True),
    ("gpu_memory_budget", "10GiB"),
    ("memory_reserve", "1GiB"),
    ("plan_tokens", [1, 16]),
]

# Further changes that must not collide with the ones above.
_HASH_EXTRA_CHANGES: list[tuple[str, Any]] = [
    ("offload_backend", "uva"),
    ("uva.cpu_offload_params", []),
    ("uva.cpu_offload_params", ["w13_weight"]),
    ("prefetch.offload_params", ["experts"]),
    ("layers_path", "model.layers.0"),
    ("mode", "default"),
    ("gpu_memory_budget", 0.5),
    ("gpu_memory_budget", 10 * 2**30),
]


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    fields: set[str] = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields |= _leaf_fields(annotation, f"{prefix}{name}.")
        else:
            fields.add(prefix + name)
    return fields


# Fields that need others changed with them to make a valid config.
_COMPANIONS: dict[str, dict[str, Any]] = {
    "gpu_memory_budget": {"prefetch.offload_group_size": 0},
    "prefetch.offload_layers": {"prefetch.offload_group_size": 0},
    "prefetch.offload_layer_params": {
        "prefetch.offload_group_size": 0,
        "prefetch.offload_layers": [1, 3],
    },
}


def _changed(path: str, value: Any) -> OffloadConfig:
    options = copy.deepcopy(_HASH_BASE)
    for where, what in {**_COMPANIONS.get(path, {}), path: value}.items():
        *parents, leaf = where.split(".")
        target = options
        for parent in parents:
            target = target[parent]
        assert leaf in target
        target[leaf] = what
    return _quietly(**options)


def test_hash_changes_cover_every_field() -> None:
    assert {path for path, _ in _HASH_CHANGES} == _leaf_fields(OffloadConfig)


def test_hash_changes_when_any_field_changes() -> None:
    configs = [_quietly(**_HASH_BASE)] + [
        _changed(path, value) for path, value in _HASH_CHANGES + _HASH_EXTRA_CHANGES
    ]
    assert len(set(configs)) == len(configs), "the variants themselves must differ"
    hashes = [config.compute_hash() for config in configs]
    for (i, a), (j, b) in itertools.combinations(enumerate(hashes), 2):
        assert a != b, f"configs {i} and {j} hash equal: {configs[i]!r} / {configs[j]!r}"


def test_hash_is_deterministic_and_hex() -> None:
    first = OffloadConfig.model_validate(_HASH_BASE).compute_hash()
    assert first == OffloadConfig.model_validate(copy.deepcopy(_HASH_BASE)).compute_hash()
    assert len(first) == 64
    assert int(first, 16) >= 0


def test_hash_ignores_how_defaults_and_numbers_were_spelled() -> None:
    explicit = OffloadConfig.model_validate(
        {
            "offload_backend": "auto",
            "uva": {"cpu_offload_gb": 0, "cpu_offload_params": []},
            "prefetch": {"offload_group_size": 0, "offload_num_in_group": 1},
            "layers_path": None,
        }
    )
    assert explicit.compute_hash() == OffloadConfig().compute_hash()
    assert (
        OffloadConfig.model_validate({"uva": {"cpu_offload_gb": 2}}).compute_hash()
        == OffloadConfig.model_validate({"uva": {"cpu_offload_gb": 2.0}}).compute_hash()
    )


def test_hash_is_independent_of_set_order() -> None:
    as_set = OffloadConfig.model_validate(
        {"uva": {"cpu_offload_params": {"a", "b"}}, "prefetch": {"offload_params": {"x", "y"}}}
    )
    as_list = OffloadConfig.model_validate(
        {"uva": {"cpu_offload_params": ["b", "a"]}, "prefetch": {"offload_params": ["y", "x"]}}
    )
    assert as_set.compute_hash() == as_list.compute_hash()


_CROSS_PROCESS_OPTIONS: dict[str, Any] = {
    "layers_path": "model.layers",
    "uva": {"cpu_offload_params": ["experts", "gate_up_proj", "down_proj"]},
    "prefetch": {
        "offload_group_size": 8,
        "offload_num_in_group": 2,
        "offload_params": [
            "w13_weight",
            "w2_weight",
            "w13_weight_scale",
            "w2_weight_scale",
            "self_attn.qkv_proj",
            "self_attn.o_proj",
            "mlp.gate",
        ],
    },
}


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_hash_is_stable_across_processes(seed: str) -> None:
    code = (
        "from offload_compiler.config import OffloadConfig\n"
        f"print(OffloadConfig.model_validate({_CROSS_PROCESS_OPTIONS!r}).compute_hash())\n"
    )
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = seed
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    expected = OffloadConfig.model_validate(_CROSS_PROCESS_OPTIONS).compute_hash()
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(("tokens", "message"), [((), "at least 1 item"), ((1, 0), "greater than")])
def test_plan_tokens_must_name_positive_token_counts(tokens, message) -> None:
    with pytest.raises(ValidationError, match=message):
        OffloadConfig(plan_tokens=tokens)


def test_layers_path_takes_several_paths_in_order_and_one_path_as_a_string() -> None:
    config = OffloadConfig(layers_path=["encoder.block", "decoder.block"])
    assert config.layers_path == ("encoder.block", "decoder.block")
    assert OffloadConfig(layers_path=["model.layers"]).layers_path == "model.layers"
    assert (
        config.compute_hash()
        != OffloadConfig(layers_path=["decoder.block", "encoder.block"]).compute_hash()
    )


@pytest.mark.parametrize(
    ("paths", "message"),
    [([], "at least one path"), (["a.b", "a.b"], "names a path twice"), (["a", "b c"], "'b c'")],
)
def test_bad_lists_of_layers_paths_are_rejected(paths: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        OffloadConfig(layers_path=paths)
