"""No request body takes a boolean for a number: pydantic's lax mode reads true as 1 and
false as 0 (a rollout's canary of false was accepted, schemathesis found). Every number
of every model a route reads from a body, nested ones included, is a whole number
(``WholeNumber``), a strict float, or in a model validated strictly."""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Annotated, Any, get_args

import pytest
from pydantic import BaseModel, BeforeValidator, TypeAdapter

import fleetline_api.routes
import fleetline_api.schemas
from fleetline_api.app import create_app
from fleetline_api.settings import ApiSettings
from tests.support import DEVICE_KEY_SECRET


def _models_by_name() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    for package in (fleetline_api.schemas, fleetline_api.routes):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for name, obj in vars(module).items():
                if isinstance(obj, type) and issubclass(obj, BaseModel):
                    found.setdefault(name, obj)
    return found


def request_models(monkeypatch: pytest.MonkeyPatch) -> set[type[BaseModel]]:
    """The models of every JSON request body in the OpenAPI document, and theirs."""
    monkeypatch.setenv("FLEETLINE_DEVICE_KEY_SECRET", DEVICE_KEY_SECRET)
    document = create_app(ApiSettings()).openapi()
    names = set()
    for path in document["paths"].values():
        for operation in path.values():
            body = operation.get("requestBody", {}).get("content", {})
            names |= set(re.findall(r"#/components/schemas/([^\"']+)", str(body)))
    by_name = _models_by_name()
    models: set[type[BaseModel]] = set()

    def collect(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in models:
                models.add(annotation)
                for field in annotation.model_fields.values():
                    collect(field.annotation)
        for arg in get_args(annotation):
            collect(arg)

    for name in names:
        # (Components that are no model, as the twin's JSON values, have no fields.)
        if name.removesuffix("-Input") in by_name:
            collect(by_name[name.removesuffix("-Input")])
    return models


def _numeric(annotation: Any) -> bool:
    return annotation in (int, float) or any(_numeric(a) for a in get_args(annotation))


def test_no_request_number_takes_a_boolean(monkeypatch: pytest.MonkeyPatch) -> None:
    models = request_models(monkeypatch)
    assert len(models) > 20  # the bodies were found
    lax = []
    for model in models:
        if model.model_config.get("strict"):
            continue
        for name, field in model.model_fields.items():
            if not _numeric(field.annotation):
                continue
            # The field's own "before" validators run first, as the model runs them.
            before = [
                BeforeValidator(getattr(model, decorator.cls_var_name))
                for decorator in model.__pydantic_decorators__.field_validators.values()
                if name in decorator.info.fields and decorator.info.mode == "before"
            ]
            metadata = [*before, *field.metadata]
            adapter: TypeAdapter[Any] = TypeAdapter(
                Annotated[field.annotation, *metadata] if metadata else field.annotation
            )
            for text in ("true", "false"):
                try:
                    adapter.validate_json(text)
                except ValueError:
                    continue
                lax.append(f"{model.__name__}.{name} takes {text}")
                break
    assert lax == []
