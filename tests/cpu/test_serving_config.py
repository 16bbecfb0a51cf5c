"""Serving config (`args:` of serve_config.yaml), its env overrides, and the request schemas."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from deployments.config import AppArgs, apply_env_overrides
from deployments.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SeedGenerateRequest,
)

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


@pytest.fixture
def yaml_args() -> dict[str, Any]:
    return yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]


def _two_models() -> dict[str, Any]:
    return {
        "models": [
            {"name": "stable", "source": "tiny:1", "batching": {"max_prefill_tokens": 256}},
            {"name": "canary", "source": "tiny:2"},
        ]
    }


def test_serve_config_yaml_args_validate_into_app_args(yaml_args: dict[str, Any]) -> None:
    args = AppArgs.model_validate(yaml_args)
    model = args.models[0]
    assert model.name == "smollm2-135m-instruct"
    assert model.max_model_len == 2048
    assert model.batching.max_batch_size == 16
    assert args.default_model == "smollm2-135m-instruct"


def _set_first_model(args: dict, **fields: Any) -> None:
    args["models"][0].update(fields)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda a: _set_first_model(a, max_model_len=-1), "models.0.max_model_len"),
        (lambda a: _set_first_model(a, device="tpu"), "models.0.device"),
        (lambda a: _set_first_model(a, colour="blue"), "models.0.colour"),
        (lambda a: a.update(listen_port=9000), "listen_port"),
        (
            lambda a: _set_first_model(a, autoscaling={"min_replicas": 3, "max_replicas": 2}),
            "models.0.autoscaling",
        ),
    ],
    ids=["negative-max-model-len", "device-tpu", "unknown-model-key", "unknown-key", "autoscale"],
)
def test_invalid_app_args_error_names_the_field(
    yaml_args: dict[str, Any], change, field: str
) -> None:
    change(yaml_args)
    with pytest.raises(ValidationError) as exc:
        AppArgs.model_validate(yaml_args)
    assert field in str(exc.value)


def test_autoscaling_error_says_min_must_not_exceed_max(yaml_args: dict[str, Any]) -> None:
    _set_first_model(yaml_args, autoscaling={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValidationError, match="min_replicas must not exceed max_replicas"):
        AppArgs.model_validate(yaml_args)


def test_duplicate_model_names_are_rejected_naming_them() -> None:
    raw = _two_models()
    raw["models"][1]["name"] = "stable"
    with pytest.raises(
        ValidationError, match=r"model names must be unique: \['stable', 'stable'\]"
    ):
        AppArgs.model_validate(raw)


def test_alias_naming_an_unknown_model_is_rejected_naming_it() -> None:
    raw = _two_models()
    raw["aliases"] = [{"name": "chat", "split": {"variants": {"stable": 90, "ghost": 10}}}]
    with pytest.raises(ValidationError, match=r"alias 'chat' names unknown models: \['ghost'\]"):
        AppArgs.model_validate(raw)


def test_alias_over_known_models_is_the_default_model() -> None:
    raw = _two_models()
    raw["aliases"] = [{"name": "chat", "split": {"variants": {"stable": 90, "canary": 10}}}]
    assert AppArgs.model_validate(raw).default_model == "chat"


def test_env_overrides_map_documented_variables_onto_first_model_and_log_level() -> None:
    raw = _two_models()
    before = copy.deepcopy(raw)
    env = {"MODEL_PATH": "/srv/model", "DEVICE": "cpu", "MAX_BATCH_SIZE": "8", "LOG_LEVEL": "DEBUG"}
    data = apply_env_overrides(raw, env)
    first, second = data["models"]
    assert first["source"] == "/srv/model"
    assert first["device"] == "cpu"
    assert first["batching"] == {"max_prefill_tokens": 256, "max_batch_size": 8, "max_running": 8}
    assert data["log_level"] == "DEBUG"
    assert second == before["models"][1]
    assert raw == before
    args = AppArgs.model_validate(data)
    assert args.models[0].batching.max_running == 8


def test_env_overrides_ignore_unrelated_and_empty_variables() -> None:
    raw = _two_models()
    env = {"API_PORT": "9000", "HOME": "/root", "MODEL_PATH": "", "DEVICE": ""}
    assert apply_env_overrides(raw, env) == raw


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"messages": []}, "messages"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
    ids=["empty-messages", "negative-max-tokens", "temperature-5", "n-2", "five-stops"],
)
def test_chat_request_rejects_out_of_range_fields(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate(_chat(**fields))
    assert [e["loc"][0] for e in exc.value.errors()] == [field]


def test_chat_request_accepts_openai_fields_at_their_no_op_values() -> None:
    request = ChatCompletionRequest.model_validate(_chat(presence_penalty=0, logprobs=False))
    assert request.model_extra == {"presence_penalty": 0, "logprobs": False}


def test_chat_request_refuses_openai_fields_that_would_change_the_answer() -> None:
    with pytest.raises(ValidationError, match="'presence_penalty' is not supported"):
        ChatCompletionRequest.model_validate(_chat(presence_penalty=0.5))


def test_chat_request_normalises_single_stop_string_to_list() -> None:
    assert ChatCompletionRequest.model_validate(_chat(stop="\n")).stop == ["\n"]


def test_completion_request_rejects_more_than_one_prompt() -> None:
    with pytest.raises(ValidationError, match="only one prompt per request"):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})


def test_completion_request_accepts_a_one_prompt_list() -> None:
    request = CompletionRequest.model_validate({"model": "m", "prompt": ["a"]})
    assert request.prompt_text() == "a"


def test_generate_request_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError) as exc:
        SeedGenerateRequest.model_validate({"prompt": "hi", "max_tokens": 10})
    assert [(e["loc"], e["type"]) for e in exc.value.errors()] == [
        (("max_tokens",), "extra_forbidden")
    ]


def test_model_settings_reach_the_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.config import ModelConfig
    from deployments.engine import scheduler
    from deployments.model_server import build_engine

    built: list[Any] = []
    monkeypatch.setattr(scheduler, "Engine", lambda cfg, on_step: built.append(cfg))
    model = ModelConfig(
        name="m", source="m", decode_step="eager", batch_invariant=False, lm_head_dtype="bfloat16"
    )
    build_engine(model, Path("/models/m"), lambda rows, seconds: None)
    [cfg] = built
    assert (cfg.decode_step, cfg.batch_invariant, cfg.lm_head_dtype) == ("eager", False, "bfloat16")
    assert cfg.model_dir == Path("/models/m")
    with pytest.raises(ValidationError, match="decode_step"):
        ModelConfig(name="m", source="m", decode_step="graphs")
