"""Workflow input schemas: a pydantic model, a msgspec Struct, or a JSON Schema dict.

Input is validated before anything is written (at enqueue, when the definition is local) and again in
the worker, which hands the validated object to the handler as ``ctx.input``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import msgspec

from .errors import ConfigurationError, InputValidationError


def json_schema_issues(schema: dict[str, Any], value: Any) -> list[dict[str, Any]]:
    """Every way ``value`` breaks a JSON Schema (Draft 2020-12, formats checked), sorted by path."""
    from jsonschema import Draft202012Validator, FormatChecker

    errors = sorted(
        Draft202012Validator(schema, format_checker=FormatChecker()).iter_errors(value),
        key=lambda e: list(e.absolute_path),
    )
    return [
        {"path": "/".join(str(p) for p in e.absolute_path), "message": e.message, "keyword": e.validator}
        for e in errors
    ]


def validation_error(what: str, issues: list[dict[str, Any]]) -> InputValidationError:
    summary = "; ".join(f"{i['path'] or '<root>'}: {i['message']}" for i in issues[:5])
    return InputValidationError(f"{what} is invalid: {summary}", issues)


class InputSchema(ABC):
    """Validates input against one schema; subclasses adapt each schema library."""

    def __init__(self, workflow: str) -> None:
        self.workflow = workflow

    @abstractmethod
    def validate(self, value: Any) -> Any:
        """The validated input (a model or Struct instance, or the value itself); raises InputValidationError."""

    def to_json(self, validated: Any) -> Any:
        """The JSON-compatible form of a validated input, as stored."""
        return validated

    @abstractmethod
    def json_schema(self) -> dict[str, Any]:
        """The schema as JSON Schema, published with the workflow's metadata."""

    def _fail(self, issues: list[dict[str, Any]]) -> InputValidationError:
        return validation_error(f"input of workflow {self.workflow!r}", issues)


class _PydanticSchema(InputSchema):
    def __init__(self, workflow: str, model: Any) -> None:
        super().__init__(workflow)
        self.model = model

    def validate(self, value: Any) -> Any:
        import pydantic

        try:
            return self.model.model_validate(value)
        except pydantic.ValidationError as exc:
            raise self._fail([
                {"path": "/".join(str(p) for p in e["loc"]), "message": e["msg"], "keyword": e["type"]}
                for e in exc.errors()
            ]) from None

    def to_json(self, validated: Any) -> Any:
        return validated.model_dump(mode="json")

    def json_schema(self) -> dict[str, Any]:
        return dict(self.model.model_json_schema())


class _StructSchema(InputSchema):
    def __init__(self, workflow: str, struct: type[msgspec.Struct]) -> None:
        super().__init__(workflow)
        self.struct = struct

    def validate(self, value: Any) -> Any:
        if isinstance(value, self.struct):
            value = msgspec.to_builtins(value)
        try:
            return msgspec.convert(value, self.struct)
        except msgspec.ValidationError as exc:
            message = str(exc)
            path = message.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in message else ""
            raise self._fail([{"path": path, "message": message, "keyword": "type"}]) from None

    def to_json(self, validated: Any) -> Any:
        return msgspec.to_builtins(validated)

    def json_schema(self) -> dict[str, Any]:
        return dict(msgspec.json.schema(self.struct))


class _JsonSchema(InputSchema):
    def __init__(self, workflow: str, schema: dict[str, Any]) -> None:
        super().__init__(workflow)
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ConfigurationError(
                f"workflow {workflow!r}: input_schema is not a valid JSON Schema: {exc.message}"
            ) from None
        self.schema = schema

    def validate(self, value: Any) -> Any:
        issues = json_schema_issues(self.schema, value)
        if issues:
            raise self._fail(issues)
        return value

    def json_schema(self) -> dict[str, Any]:
        return self.schema


def validate_input_with_schema(schema: Any, value: Any) -> Any:
    """Validate ``value`` as a workflow's input would be: ``schema`` is a pydantic model class, a
    msgspec Struct class, a JSON Schema dict, or None (no validation). Returns the validated value
    (a model or Struct instance, or the value itself); raises InputValidationError with its issues."""
    if schema is None:
        return value
    return schema_adapter("<input_schema>", schema).validate(value)


def schema_adapter(workflow: str, schema: Any) -> InputSchema:
    if isinstance(schema, dict):
        return _JsonSchema(workflow, schema)
    if isinstance(schema, type) and issubclass(schema, msgspec.Struct):
        return _StructSchema(workflow, schema)
    if isinstance(schema, type) and hasattr(schema, "model_validate") and hasattr(schema, "model_json_schema"):
        return _PydanticSchema(workflow, schema)
    raise ConfigurationError(
        f"workflow {workflow!r}: input_schema must be a pydantic model class, a msgspec Struct class or a JSON "
        f"Schema dict, got {schema!r}"
    )


def check_event_name(value: Any, what: str) -> str:
    """An event name or correlation key: a non-empty string, used exactly as given, so one without
    leading or trailing whitespace (emit_event and wait_for_event apply this same rule)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{what} must be a non-empty string, got {value!r}")
    if value != value.strip():
        raise ConfigurationError(f"{what} must not have leading or trailing whitespace, got {value!r}")
    return value


def check_run_id(run_id: Any) -> str:
    """A run id as the client API accepts it: a non-empty string."""
    if not isinstance(run_id, str) or not run_id:
        raise ConfigurationError(f"a run id is a non-empty string, got {run_id!r}")
    return run_id
