"""Validate a TuningJob against the CRD the way the API server does, without a cluster.

``CrdValidator(crd).problems(obj)`` returns what `kubectl apply` (strict field validation, its
default) would complain about, as ``path: message`` strings; an empty list means accepted. The
steps follow the API server's order for a create:

1. the wire form: kubectl turns YAML into JSON (NaN/Inf cannot be sent; a float with an
   integral value such as ``64.0`` goes out as ``64``), and the request is routed by apiVersion
   and kind, so anything else never reaches this CRD; ObjectMeta needs a name;
2. nulls are pruned from fields that are not ``nullable``, then ``default``s are applied (with
   the nested defaults of a defaulted object);
3. the OpenAPI v3 schema is checked (translated to JSON Schema draft 4, the dialect whose
   boolean ``exclusiveMinimum`` it shares); unknown fields are errors (strict field validation)
   except below ``x-kubernetes-preserve-unknown-fields``; ``x-kubernetes-list-type: set`` means
   no duplicates; patterns are RE2, as in Go;
4. if the schema passed, every ``x-kubernetes-validations`` rule is evaluated with cel-python at
   each node present in the object, ``self`` bound to the node as the API server exposes it to
   CEL: ``number`` fields are doubles, and fields without a type (kept unknown fields) are not
   visible. A rule that fails, or errors, rejects the object.
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any, Iterator

import celpy
import jsonschema
import re2

# meta/v1 ObjectMeta (kubernetes.client.V1ObjectMeta.attribute_map, without importing the client)
OBJECT_META_FIELDS = (
    "annotations", "creationTimestamp", "deletionGracePeriodSeconds", "deletionTimestamp",
    "finalizers", "generateName", "generation", "labels", "managedFields", "name", "namespace",
    "ownerReferences", "resourceVersion", "selfLink", "uid")
_CEL = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}
_VERDICTS: dict[tuple[str, str], tuple[bool, str | None]] = {}


class NotJson(ValueError):
    """The object cannot be sent to the API server at all."""


def wire_form(value: Any, path: str = "") -> Any:
    """What reaches the API server after kubectl's YAML -> JSON conversion."""
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            if not isinstance(key, str):
                raise NotJson(f"{path or '(root)'}: key {key!r} is not a string")
            out[key] = wire_form(sub, f"{path}.{key}" if path else key)
        return out
    if isinstance(value, (list, tuple)):
        return [wire_form(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotJson(f"{path}: {value} is not a JSON number")
        if value.is_integer() and abs(value) < 2 ** 63:
            return int(value)  # Go's encoding/json writes 64.0 as 64
        return value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise NotJson(f"{path}: {type(value).__name__} is not JSON")


# ------------------------------------------------------------------------------ schema walks
def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def prune_nulls_and_default(schema: dict[str, Any], value: Any) -> None:
    """The API server's structural defaulting, in place."""
    if _is_object(value) and schema.get("type") == "object":
        properties = schema.get("properties", {})
        for key in [k for k, v in value.items() if v is None]:
            if key in properties and not properties[key].get("nullable"):
                del value[key]
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                prune_nulls_and_default(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, sub in value.items():
                prune_nulls_and_default(extra, sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            prune_nulls_and_default(schema["items"], item)


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 (structural CRD) schema as JSON Schema draft 4."""
    out: dict[str, Any] = {}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif "type" in node:
        out["type"] = [node["type"], "null"] if node.get("nullable") else node["type"]
    for key in ("enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                "minLength", "maxLength", "pattern", "minItems", "maxItems", "minProperties",
                "maxProperties", "required", "multipleOf"):
        if key in node:
            out[key] = node[key]
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = to_json_schema(extra)
    elif extra is not None:
        out["additionalProperties"] = extra
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # strict field validation: unknown field
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if isinstance(instance, str) and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


Draft4 = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": _re2_pattern})


def cel_visible(schema: dict[str, Any]) -> bool:
    """Whether the API server exposes a node to CEL (common.SchemaDeclType is not nil)."""
    if schema.get("x-kubernetes-int-or-string"):
        return True
    kind = schema.get("type")
    if kind == "array":
        return isinstance(schema.get("items"), dict) and cel_visible(schema["items"])
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return cel_visible(schema["additionalProperties"])
    return kind in ("object", "string", "number", "integer", "boolean")


def cel_view(schema: dict[str, Any], value: Any) -> Any:
    """The value as CEL sees it: typed by the schema, with invisible fields left out."""
    if schema.get("x-kubernetes-int-or-string"):
        return value
    kind = schema.get("type")
    if kind == "number":
        return float(value)
    if kind == "array":
        return [cel_view(schema["items"], v) for v in value]
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return {k: cel_view(extra, v) for k, v in value.items()}
        properties = schema.get("properties", {})
        return {k: cel_view(properties[k], v) for k, v in value.items()
                if k in properties and cel_visible(properties[k])}
    return value


def _program(expression: str) -> Any:
    if expression not in _PROGRAMS:
        _PROGRAMS[expression] = _CEL.program(_CEL.compile(expression))
    return _PROGRAMS[expression]


def compile_rule(expression: str) -> None:
    """Raise if cel-python cannot parse the expression."""
    _program(expression)


def evaluate(expression: str, view: Any) -> Any:
    """The expression's value with ``self`` bound to ``view``; CEL errors are raised."""
    result = _program(expression).evaluate({"self": celpy.json_to_cel(view)})
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


_SELF_PATH = re.compile(r"(\bhas\(\s*)?\bself((?:\.[A-Za-z_]\w*)*)(\s*[()])?")
_READS: dict[str, tuple[list[tuple[str, ...]], list[tuple[str, ...]]]] = {}


def referenced_paths(expression: str) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The field paths below ``self`` an expression reads: by value, and only in ``has()``.

    A trailing ``.f(`` is a method call, not a field.
    """
    if expression not in _READS:
        values, presence = [], []
        for match in _SELF_PATH.finditer(expression):
            parts = tuple(match.group(2).split(".")[1:])
            if match.group(3) and match.group(3).strip() == "(" and parts:
                parts = parts[:-1]
            in_has = match.group(1) and match.group(3) and match.group(3).strip() == ")"
            (presence if in_has else values).append(parts)
        _READS[expression] = (values, presence)
    return _READS[expression]


def project(view: Any, paths: list[tuple[str, ...]]) -> Any:
    """Only the parts of ``view`` that these paths reach."""
    if not isinstance(view, dict) or any(not p for p in paths):
        return view
    out: dict[str, Any] = {}
    heads: dict[str, list[tuple[str, ...]]] = {}
    for path in paths:
        heads.setdefault(path[0], []).append(path[1:])
    for head, rests in heads.items():
        if head in view:
            out[head] = project(view[head], rests)
    return out


def _mark_present(view: Any, seen: Any, path: tuple[str, ...]) -> Any:
    """Add a stand-in at ``path`` to ``seen`` where ``view`` has a field ``seen`` lacks."""
    if not path or not isinstance(view, dict) or path[0] not in view:
        return seen
    if not isinstance(seen, dict):
        return seen
    head, rest = path[0], path[1:]
    if head not in seen:
        seen[head] = {} if isinstance(view[head], dict) else 0
    seen[head] = _mark_present(view[head], seen[head], rest) if rest else seen[head]
    return seen


def visible_part(expression: str, view: Any) -> Any:
    """What of ``view`` the expression can tell apart: the values it reads, and the presence
    of what it only tests with ``has()``. Equal parts give equal verdicts."""
    values, presence = referenced_paths(expression)
    seen = project(view, values)
    if seen is view:
        return view
    for path in presence:
        seen = _mark_present(view, seen, path)
    return seen


def check_rule(rule: dict[str, Any], view: Any) -> str | None:
    """None when the rule holds; else the message the API server would give.

    Verdicts are cached by the rule and the part of ``self`` it can tell apart: cel-python is
    slow, and most cases differ from each other in one field only.
    """
    seen = visible_part(rule["rule"], view)
    key = (rule["rule"], json.dumps(seen, sort_keys=True))
    if key not in _VERDICTS:
        try:
            ok = evaluate(rule["rule"], seen)
            if not isinstance(ok, celpy.celtypes.BoolType):
                _VERDICTS[key] = (False, f"rule {rule['rule']!r} gave {ok!r}, not a bool")
            else:
                _VERDICTS[key] = (bool(ok), None)
        except Exception as err:  # noqa: BLE001 - the API server rejects on any error too
            _VERDICTS[key] = (False, f"evaluation error: {err}")
    ok, error = _VERDICTS[key]
    if ok:
        return None
    if error:
        return error
    if "messageExpression" in rule:
        try:
            return str(evaluate(rule["messageExpression"], view))
        except Exception as err:  # noqa: BLE001
            return f"{rule['message']} (messageExpression failed: {err})"
    return rule.get("message") or f"failed rule: {rule['rule']}"


def cel_problems(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """Every failing ``x-kubernetes-validations`` rule at or below this node."""
    problems: list[str] = []
    rules = schema.get("x-kubernetes-validations", [])
    if rules:
        view = cel_view(schema, value)
        for rule in rules:
            message = check_rule(rule, view)
            if message is not None:
                where = f"{path}{rule.get('fieldPath', '')}".lstrip(".") or "(root)"
                problems.append(f"{where}: {message}")
    kind = schema.get("type")
    if kind == "object" and _is_object(value):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problems += cel_problems(sub, value[key], f"{path}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, sub in value.items():
                problems += cel_problems(extra, sub, f"{path}[{key!r}]")
    elif kind == "array" and isinstance(value, list):
        for i, item in enumerate(value):
            problems += cel_problems(schema["items"], item, f"{path}[{i}]")
    return problems


def walk_schema(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (``.a.b``, ``[]`` for items, ``{}`` for map values)."""
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from walk_schema(sub, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk_schema(node["additionalProperties"], f"{path}{{}}")
    if isinstance(node.get("items"), dict):
        yield from walk_schema(node["items"], f"{path}[]")


# ------------------------------------------------------------------------------ the validator
class CrdValidator:
    """Validates custom resources against one version of a CustomResourceDefinition."""

    def __init__(self, crd: dict[str, Any], version: str | None = None) -> None:
        spec = crd["spec"]
        served = [v for v in spec["versions"] if version in (None, v["name"])]
        self.version = served[0]
        self.api_version = f"{spec['group']}/{self.version['name']}"
        self.kind = spec["names"]["kind"]
        self.schema = self.version["schema"]["openAPIV3Schema"]
        checked = to_json_schema(self.schema)
        # metadata is ObjectMeta whatever the CRD says (which may only restrict the name)
        metadata = checked["properties"].setdefault("metadata", {"type": "object"})
        metadata.setdefault("properties", {})
        for field in OBJECT_META_FIELDS:
            metadata["properties"].setdefault(field, {})
        metadata["additionalProperties"] = False
        self.validator = Draft4(checked)

    def problems(self, obj: Any) -> list[str]:
        try:
            obj = wire_form(obj)
        except NotJson as err:
            return [f"not JSON (kubectl cannot send it): {err}"]
        if not _is_object(obj):
            return ["(root): not an object"]
        if (obj.get("apiVersion"), obj.get("kind")) != (self.api_version, self.kind):
            return [f"(root): {obj.get('apiVersion')!r}/{obj.get('kind')!r} is not served by "
                    f"this CRD ({self.api_version} {self.kind})"]
        metadata = obj.get("metadata")
        if not _is_object(metadata) or not isinstance(metadata.get("name"), str) \
                or not metadata["name"]:
            return ["metadata.name: Required value: name or generateName is required"]
        prune_nulls_and_default(self.schema, obj)
        errors = sorted(self.validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                    for e in errors]
        return cel_problems(self.schema, obj, "")

    def accepts(self, obj: Any) -> bool:
        return not self.problems(obj)

    def defaulted(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The object as stored: wire form, nulls pruned, defaults applied."""
        obj = wire_form(obj)
        prune_nulls_and_default(self.schema, obj)
        return obj
