"""``skyrl-backends consistency``: its arguments become the run's configuration."""

from __future__ import annotations

import pytest

from skyrl_backends.cli import build_parser
from skyrl_backends.consistency.plan import Length
from skyrl_backends.errors import ConfigError

pytest.importorskip("torch")  # the run configuration resolves dtypes and devices with torch


def config_of(*argv: str):
    from skyrl_backends.consistency.cli import run_config

    return run_config(build_parser().parse_args(["consistency", *argv]))


def test_arguments_make_the_run_configuration(tmp_path) -> None:
    config = config_of("vllm", "--model", str(tmp_path), "--dtype", "bfloat16", "--trainer-lm-head", "float32",
                       "--label", "fp32-head", "--lengths", "32x2,64x1", "--unseeded",
                       "--engine-option", 'engine_init_kwargs={"hf_overrides": {"head_dtype": "float32"}}',
                       "--engine-option", "gpu_memory_utilization=0.2", "--engine-option", "device=cpu")
    assert config.backend == "vllm" and config.model == str(tmp_path.resolve())
    assert config.engine_options == {"engine_init_kwargs": {"hf_overrides": {"head_dtype": "float32"}},
                                     "gpu_memory_utilization": 0.2, "device": "cpu"}
    assert config.trainer_lm_head == "float32" and config.label == "fp32-head"
    assert config.plan.lengths == (Length(32, 2), Length(64, 1)) and not config.plan.seeded
    assert config.resolved_trainer_dtype() == "bfloat16"


@pytest.mark.parametrize(("argv", "field"), [
    (["--label", "FP32 head"], "--label"),
    (["--engine-option", "novalue"], "--engine-option"),
    (["--lengths", "1000xmany"], "lengths"),
])
def test_bad_arguments_name_the_option(tmp_path, argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_of("vllm", "--model", str(tmp_path), *argv)
    assert caught.value.field == field
