"""The TuningJob CustomResourceDefinition, generated from the spec model.

The spec model (``kubetune.spec.model``, ``kubetune.spec.knobs``) is the source of truth. This
module turns it into a *structural* OpenAPI schema (every node typed, no ``$ref``, no typed
``anyOf``) plus CEL ``x-kubernetes-validations``, so that ``kubectl apply`` rejects what
``kubetune validate`` rejects. Plain fields come from the pydantic JSON schema (a new field needs
no edit here); tagged unions (search-space entry by ``type``, dataset by ``name``) become one
object with rules per tag; a knob's domain is a rule that holds for the builtin trainer only,
since other trainers may name their own params like a knob. Other ``searchSpace`` names stay
untyped (a structural schema cannot type a list of mixed scalars): the operator's spec model
checks them. Each cross-field check of the model is one rule in ``RULES``: add one with it.
The API server checks each default (``{}`` for several objects) against that field's rules when
the CRD is created, so a rule of an object with a default reads its fields only behind ``has()``.

Regenerate with ``python -m kubetune_operator.crd > crds/tuningjob.yaml``; tests/test_crd.py
fails when the committed file is stale or the CRD and the spec model disagree on a spec.
"""

from __future__ import annotations

import copy
import re
import sys
from typing import Any

import yaml

from kubetune.spec import model as model
from kubetune.spec.api import GROUP, KIND, PLURAL, VERSION
from kubetune.spec.knobs import KNOBS, LOSS_METRICS, MODELS, REPORTED_METRICS, Knob
from kubetune.spec.presets import PRESET_KEY, PRESETS
from kubetune.spec.template import IMAGE_PULL_POLICIES

SINGULAR = KIND.lower()
SHORT_NAMES = ["tj"]
CATEGORIES = ["kubetune"]
NAME = f"{PLURAL}.{GROUP}"

# Bounds on every string, list and map, so that the API server's CEL cost estimator accepts the
# rules (it assumes the worst case of anything unbounded). Generous: no real job comes close.
MAX_STRING = 1024
MAX_LONG_STRING = 4096  # file paths, container arguments
MAX_ITEMS = 256
MAX_CLASSES = 1024
MAX_MAP = 64

# One duration token is a number and a unit; spaces may stand anywhere (spec.parse_duration drops
# them); the whole is at least one token. "Positive" is a second rule: some digit is not 0.
# No backslashes: CEL string literals know no \s or \. escape.
DURATION = "^[[:space:]]*( *[0-9][0-9 ]*([.][0-9 ]*[0-9])? *(m *s|[smhd]))+[[:space:]]*$"
QUANTITY = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
            r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")

HEADER = """\
# Generated from the spec model by operator/kubetune_operator/crd.py: do not edit by hand.
# Regenerate after changing the spec wing (trainer/kubetune/spec/):
#   python -m kubetune_operator.crd > crds/tuningjob.yaml
"""


class CrdError(RuntimeError):
    """The spec model has a shape this generator does not know how to express."""


# ------------------------------------------------------------------------------ CEL helpers
def lit(value: Any) -> str:
    """A CEL literal for a Python value (strings double-quoted, doubles with a dot)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text if any(c in text for c in ".e") else text + ".0"
    if isinstance(value, str):
        if '"' in value or "\\" in value or "\n" in value:
            raise CrdError(f"no CEL literal for {value!r}")
        return f'"{value}"'
    raise CrdError(f"no CEL literal for {value!r}")


def one_of(expr: str, values: list[Any] | tuple[Any, ...]) -> str:
    """``expr == v`` or ``expr in [v1, v2]``."""
    values = list(values)
    if len(values) == 1:
        return f"{expr} == {lit(values[0])}"
    return f"{expr} in [{', '.join(lit(v) for v in values)}]"


def none_of(expr: str, values: list[Any] | tuple[Any, ...]) -> str:
    """``expr != v`` or ``!(expr in [v1, v2])``."""
    values = list(values)
    if len(values) == 1:
        return f"{expr} != {lit(values[0])}"
    return f"!({one_of(expr, values)})"


def all_have(fields: list[str] | tuple[str, ...], base: str = "self") -> str:
    text = " && ".join(f"has({base}.{f})" for f in fields)
    return f"({text})" if len(fields) > 1 else text


def has_any(fields: list[str], base: str = "self") -> str:
    return " || ".join(f"has({base}.{f})" for f in fields)


def or_default(field: str, default: Any, base: str = "self") -> str:
    """The field's value, or the spec model's default when it is absent."""
    return f"(has({base}.{field}) ? {base}.{field} : {lit(default)})"


def words(names: list[str] | tuple[str, ...], joiner: str = "and") -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {joiner} {names[-1]}"


def _double_quoted(expr: str) -> str:
    """CEL strings written '...' in this file, as "..." (tidier in YAML; CEL takes both)."""
    out = re.sub(r"'([^'\"\\\n]*)'", r'"\1"', expr)
    if "'" in out:
        raise CrdError(f"a quote in {expr!r} is not a plain string literal")
    return out


def rule(expr: str, message: str, field_path: str | None = None,
         message_expression: str | None = None) -> dict[str, Any]:
    """One x-kubernetes-validations entry."""
    if "\n" in message:
        raise CrdError(f"a rule's message must be one line: {message!r}")
    out: dict[str, Any] = {"rule": _double_quoted(expr), "message": message}
    if message_expression:
        out["messageExpression"] = _double_quoted(message_expression)
    if field_path:
        out["fieldPath"] = field_path
    return out


def _cel_name(name: str) -> str:
    """A property name usable as-is in CEL (the API server would escape anything else)."""
    reserved = {"true", "false", "null", "in", "as", "break", "const", "continue", "else",
                "for", "function", "if", "import", "let", "loop", "package", "namespace",
                "return", "var", "void", "while"}
    if not name.isidentifier() or name in reserved or "__" in name:
        raise CrdError(f"{name!r} is not a plain CEL identifier; rules referring to it need "
                       "the API server's escaping")
    return name


# ------------------------------------------------------------------------------ pydantic -> OpenAPI
def _json_schema(model_cls: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    schema = model_cls.model_json_schema(by_alias=True)
    return schema, schema.pop("$defs", {})


class _Converter:
    """Turns pydantic's JSON schema of JobSpec into a structural OpenAPI v3 schema."""

    def __init__(self, defs: dict[str, Any],
                 overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.defs = defs
        self.overrides = overrides or {}  # dotted path (``a.b[]`` for items) -> schema

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        """``$ref`` replaced by its target; ``X | None`` by X; int | float by number."""
        if "$ref" in node:
            target = self.defs[node["$ref"].rsplit("/", 1)[-1]]
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**self.resolve(target), **rest}
        if "anyOf" not in node:
            return node
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        members = [self.resolve(m) for m in node["anyOf"] if m.get("type") != "null"]
        if len(members) == 1:
            return {**members[0], **rest}
        if {m.get("type") for m in members} == {"integer", "number"}:
            merged: dict[str, Any] = {}
            for member in members:
                merged.update({k: v for k, v in member.items() if k != "type"})
            return {**merged, "type": "number", **rest}
        raise CrdError(f"a union of {[m.get('type') for m in members]} has no structural form")

    def convert(self, node: dict[str, Any], where: str, *, keep_default: bool = True
                ) -> dict[str, Any]:
        if where in self.overrides:
            return copy.deepcopy(self.overrides[where])
        node = self.resolve(node)
        kind = node.get("type")
        if kind is None or "oneOf" in node:
            raise CrdError(f"{where}: no single type in {node}; give it an override in crd.py")
        out: dict[str, Any] = {"type": kind}
        if node.get("description"):
            out["description"] = node["description"]
        if "const" in node:
            out["enum"] = [node["const"]]
        if "enum" in node:
            out["enum"] = list(node["enum"])
        for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"):
            if key in node:
                out[key] = node[key]
        for key, bound, exclusive in (("gt", "minimum", "exclusiveMinimum"),
                                      ("exclusiveMinimum", "minimum", "exclusiveMinimum"),
                                      ("lt", "maximum", "exclusiveMaximum"),
                                      ("exclusiveMaximum", "maximum", "exclusiveMaximum")):
            if key in node:
                out[bound], out[exclusive] = node[key], True
        for key, bound in (("ge", "minimum"), ("le", "maximum")):
            if key in node:
                out[bound] = node[key]
        if kind == "object":
            if node.get("additionalProperties") not in (None, False) or "properties" not in node:
                raise CrdError(f"{where}: a free-form mapping needs an override in crd.py")
            out["properties"] = {
                name: self.convert(sub, f"{where}.{name}", keep_default=keep_default)
                for name, sub in node["properties"].items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif kind == "array":
            out["items"] = self.convert(node["items"], f"{where}[]", keep_default=keep_default)
            out.setdefault("maxItems", MAX_ITEMS)
        elif kind == "string" and "enum" not in out:
            out.setdefault("maxLength", MAX_STRING)
        default = node.get("default")
        if keep_default and default is not None:
            if kind == "object":
                if out.get("required"):
                    raise CrdError(f"{where}: a default for an object with required fields")
                default = {}  # the nested defaults fill it in, as the spec model's do
            out["default"] = default
        return out


def _merge_property(name: str, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if a == b:
        return a
    if {a["type"], b["type"]} == {"integer", "number"}:
        strip = lambda s: {k: v for k, v in s.items() if k != "type"}  # noqa: E731
        if strip(a) == strip(b):
            return {**a, "type": "number"}
    raise CrdError(f"union members disagree on {name!r}: {a} vs {b}")


def merged_union(tag: str, members: dict[str, Any], label: str, where: str,
                 overrides: dict[str, dict[str, Any]] | None = None
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One object schema for a tagged union, and the rules that tell its members apart.

    ``members`` maps each tag value to its pydantic model. The merged object holds every
    member's fields (with no defaults: a default applies to one member only); rules require each
    member's required fields, forbid the fields of other members, and require integers where one
    member has an integer and another a number under the same name.
    """
    properties: dict[str, dict[str, Any]] = {}
    owners: dict[str, list[str]] = {}
    integer_for: dict[str, list[str]] = {}
    required: dict[str, tuple[str, ...]] = {}
    for value, model_cls in members.items():
        schema, defs = _json_schema(model_cls)
        conv = _Converter(defs, overrides)
        required[value] = tuple(r for r in schema.get("required", ()) if r != tag)
        for name, sub in schema["properties"].items():
            if name == tag:
                continue
            prop = conv.convert(sub, f"{where}.{name}", keep_default=False)
            owners.setdefault(name, []).append(value)
            if prop["type"] == "integer":
                integer_for.setdefault(name, []).append(value)
            properties[name] = (_merge_property(name, properties[name], prop)
                                if name in properties else prop)
    tags = list(members)
    tag_schema: dict[str, Any] = {"type": "string", "enum": tags,
                                  "description": f"the {label}: {' | '.join(tags)}"}
    everywhere = [f for f in properties if all(f in fields for fields in required.values())]
    schema = {"type": "object", "required": [tag] + everywhere,
              "properties": {tag: tag_schema, **properties}}
    rules: list[dict[str, Any]] = []
    by_required: dict[tuple[str, ...], list[str]] = {}
    for value, fields in required.items():
        fields = tuple(f for f in fields if f not in everywhere)
        if fields:
            by_required.setdefault(fields, []).append(value)
    for fields, values in by_required.items():
        rules.append(rule(
            f"{none_of(f'self.{tag}', values)} || {all_have(fields)}",
            f"{words(fields)} {'is' if len(fields) == 1 else 'are'} required when {tag} is "
            f"{words(values, 'or')}",
            f".{fields[0]}" if len(fields) == 1 else None))
    by_owners: dict[tuple[str, ...], list[str]] = {}
    for name, values in owners.items():
        if len(values) < len(tags):
            by_owners.setdefault(tuple(values), []).append(_cel_name(name))
    for values, fields in by_owners.items():
        rules.append(rule(
            f"{one_of(f'self.{tag}', values)} || !({has_any(fields)})" if len(fields) > 1
            else f"{one_of(f'self.{tag}', values)} || !{has_any(fields)}",
            f"{words(fields)} {'is' if len(fields) == 1 else 'are'} only for {tag} "
            f"{words(values, 'or')}",
            f".{fields[0]}" if len(fields) == 1 else None))
    by_integer: dict[tuple[str, ...], list[str]] = {}
    for name, values in integer_for.items():
        if properties[name]["type"] == "number":
            by_integer.setdefault(tuple(values), []).append(name)
    for values, fields in by_integer.items():
        checks = " && ".join(f"(!has(self.{f}) || self.{f} == double(int(self.{f})))"
                             for f in fields)
        rules.append(rule(
            f"{none_of(f'self.{tag}', values)} || ({checks})",
            f"{words(fields)} must be {'an integer' if len(fields) == 1 else 'integers'} when "
            f"{tag} is {words(values, 'or')}",
            f".{fields[0]}" if len(fields) == 1 else None))
    return schema, rules


# ------------------------------------------------------------------------------ knobs
def knob_value_schema(knob: Knob) -> dict[str, Any]:
    """The schema of one value of a knob (a fixed param, a categorical choice, a bound)."""
    if knob.kind == "bool":
        return {"type": "boolean"}
    if knob.kind == "choice":
        return {"type": "string", "enum": list(knob.choices)}
    out: dict[str, Any] = {"type": "integer" if knob.kind == "int" else "number"}
    out.update(_knob_bounds(knob))
    return out


def _knob_bounds(knob: Knob) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cast = int if knob.kind == "int" else float
    if knob.minimum is not None:
        out["minimum"] = cast(knob.minimum)
        if knob.exclusive_minimum:
            out["exclusiveMinimum"] = True
    if knob.maximum is not None:
        out["maximum"] = cast(knob.maximum)
        if knob.exclusive_maximum:
            out["exclusiveMaximum"] = True
    return out


def _param_types(knob: Knob) -> list[str]:
    """The search-space types a knob may be searched with."""
    return list(model.KNOB_SEARCH_TYPES[knob.kind])


_CHOICE_ITEM = {"bool": {"type": "boolean"}, "choice": {"type": "string", "maxLength": MAX_STRING}}


def knob_param_schema(name: str, knob: Knob) -> dict[str, Any]:
    """The search-space entry named like a knob: a distribution of any type whose choices
    have the knob's value type. What the knob allows (types, bounds, legal values) is a rule of
    the spec (``knob_rule``) that holds for the builtin trainer only: your own code may search
    a param of that name with other values."""
    item = _CHOICE_ITEM.get(knob.kind, {"type": "number"})
    schema, rules = merged_union(
        "type", model.PARAM_MODELS, "parameter type", f"searchSpace.{name}",
        {f"searchSpace.{name}.choices[]": item})
    props = schema["properties"]
    props["type"]["description"] = (f"the distribution: float | int | categorical (builtin "
                                     f"trainer: {' | '.join(_param_types(knob))})")
    for bound in ("low", "high"):
        props[bound]["description"] = f"{'lowest' if bound == 'low' else 'highest'} value"
    props["log"]["description"] = "sample on a log scale (low must be > 0)"
    props["step"].update({"minimum": 0.0, "exclusiveMinimum": True})
    props["step"]["description"] = "distance between values (high - low must be a multiple)"
    props["points"]["minimum"] = 2
    rules += [
        rule("!has(self.low) || !has(self.high) || self.low < self.high",
             "low must be < high", ".low"),
        rule("!has(self.log) || !self.log || !has(self.low) || self.low > 0.0",
             "low must be > 0 when log is true", ".low"),
        rule("!has(self.step) || !has(self.log) || !self.log || "
             "(self.type == 'int' && self.step == 1.0)",
             "step cannot be combined with log: true (an int parameter may only have step 1)",
             ".step"),
        rule("self.type != 'int' || !has(self.step) || !has(self.low) || !has(self.high) || "
             "self.step == 1.0 || int(self.high - self.low) % int(self.step) == 0",
             "high - low must be a multiple of step", ".step"),
    ]
    ratio = "((self.high - self.low) / self.step)"
    nearest = f"double(int({ratio} + 0.5))"
    tolerance = f"1e-09 * ({ratio} > 1.0 ? {ratio} : 1.0)"
    # spec._fits: |ratio - round(ratio)| < 1e-9 * max(1, ratio); above 5e8 any ratio fits
    rules.append(rule(
        f"self.type != 'float' || !has(self.step) || !has(self.low) || !has(self.high) "
        f"|| self.low >= self.high || self.step <= 0.0 || {ratio} > 5.0e8 || "
        f"({ratio} - {nearest} < {tolerance} && {nearest} - {ratio} < {tolerance})",
        "high - low must be a multiple of step", ".step"))
    choices = props["choices"]
    choices["items"]["description"] = "one value to choose from"
    choices.update({"minItems": 1, "maxItems": MAX_ITEMS,
                    "x-kubernetes-list-type": "set",
                    "description": f"the values to choose from (builtin trainer: each one a "
                                   f"legal value of {name}: {knob.describe()})"})
    schema["description"] = f"{knob.help} ({knob.describe()})"
    schema["x-kubernetes-validations"] = rules
    return schema


def knob_rule(name: str, knob: Knob) -> dict[str, Any] | None:
    """With the builtin trainer, the search-space entry ``name`` fits the knob: a type it can
    be searched with, bounds and choices in its domain (spec._space_problems)."""
    entry = _space(name)
    checks = []
    types = _param_types(knob)
    if len(types) < len(model.PARAM_TYPES):
        checks.append(one_of(f"{entry}.type", types))
    if knob.kind in ("float", "int"):
        def within(value: str) -> str:
            parts = []
            if knob.minimum is not None:
                parts.append(f"{value} {'>' if knob.exclusive_minimum else '>='} "
                             f"{lit(float(knob.minimum))}")
            if knob.maximum is not None:
                parts.append(f"{value} {'<' if knob.exclusive_maximum else '<='} "
                             f"{lit(float(knob.maximum))}")
            return " && ".join(parts)

        for bound in ("low", "high"):
            if within(bound):
                checks.append(f"(!has({entry}.{bound}) || ({within(f'{entry}.{bound}')}))")
        item = " && ".join(filter(None, [within("c"), "c == double(int(c))"
                                         if knob.kind == "int" else ""]))
    elif knob.kind == "choice":
        item = one_of("c", knob.choices)
    else:
        item = ""
    if item:
        checks.append(f"(!has({entry}.choices) || {entry}.choices.all(c, {item}))")
    if not checks:
        return None
    return rule(f"!has(self.trainer.builtin) || !has({entry}) || ({' && '.join(checks)})",
                f"{name} takes {knob.describe()}"
                + (f", searched as {words(types, 'or')}" if len(types) < 3 else "")
                + ": a type, bound or choice is not legal for it", f".searchSpace.{name}")


def search_space_schema() -> dict[str, Any]:
    preset = {"type": "string", "enum": list(PRESETS),
              "description": "start from a preset's ranges (see `kubetune presets`); entries "
                             "named next to it override the preset's"}
    return {
        "type": "object",
        "description": "the parameters to search, by name (the builtin trainer's knobs, or "
                       "the params of your own code); each is a distribution (float | int "
                       "with low/high, or categorical with choices)",
        "minProperties": 1,
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {PRESET_KEY: preset, **{_cel_name(name): knob_param_schema(name, knob)
                                              for name, knob in KNOBS.items()}},
    }


def stages_schema() -> dict[str, Any]:
    schema, defs = _json_schema(model.JobSpec)
    out = _Converter(defs).convert(schema["properties"]["stages"], "spec.stages")
    data = out["items"]["properties"]["data"]
    data["x-kubernetes-validations"] = [rule("has(self.fraction) || has(self.classes)",
                                             "data needs fraction, classes or both")]
    return out


def warm_start_enqueue_schema() -> dict[str, Any]:
    """Each configuration maps searchSpace names to values (checked by the spec model)."""
    return {"type": "array", "minItems": 1, "maxItems": model.MAX_ENQUEUE,
            "description": "parameter configurations tried before any sampled one, in this "
                           "order (each counts in the budget; a parameter left out is sampled)",
            "items": {"type": "object", "maxProperties": MAX_MAP,
                      "description": "one configuration: searchSpace name -> value",
                      "x-kubernetes-preserve-unknown-fields": True}}


def max_trials_schema() -> dict[str, Any]:
    """No default in the CRD: the spec model defaults it to 100, or to the stages' trials."""
    return {"type": "integer", "minimum": 1, "maximum": model.MAX_TRIALS,
            "description": "trials in all (default 100, or the sum of spec.stages[].trials); "
                           "may be edited while the job runs"}


def params_schema() -> dict[str, Any]:
    props = {}
    for name, knob in KNOBS.items():
        props[_cel_name(name)] = {**knob_value_schema(knob),
                                  "description": f"{knob.help} (default {knob.default!r})"}
    return {"type": "object", "description": "fixed values of knobs that are not searched",
            "default": {}, "properties": props}


# ------------------------------------------------------------------------------ other overrides
def dataset_schema() -> dict[str, Any]:
    schema, rules = merged_union("name", model.DATASET_MODELS, "dataset",
                                 "trainer.builtin.dataset")
    props = schema["properties"]
    props["classWeights"]["items"].update({"minimum": 0.0, "exclusiveMinimum": True})
    props["classWeights"]["maxItems"] = MAX_CLASSES
    props["classes"]["maximum"] = MAX_CLASSES
    props["path"]["maxLength"] = MAX_LONG_STRING
    synthetic = {name: info.default for name, info in model.SyntheticData.model_fields.items()}
    classes = or_default("classes", synthetic["classes"])
    informative = or_default("informative", synthetic["informative"])
    features = or_default("features", synthetic["features"])
    least = f"({informative} < {features} ? {informative} : {features})"
    # classes * 2 <= 2 ** least, i.e. classes <= 2 ** (least - 1): always true from 2 ** 10 on
    top = MAX_CLASSES.bit_length() - 1
    powers = ", ".join(str(2 ** k) for k in range(top))
    rules += [
        rule(f"self.name != 'synthetic' || !has(self.classWeights) || "
             f"self.classWeights.size() == {classes}",
             "classWeights needs one weight per class", ".classWeights"),
        # make_classification: classes * 2 <= 2 ** min(informative, features)
        rule(f"self.name != 'synthetic' || {least} > {top} || "
             f"{classes} <= [{powers}][{least} - 1]",
             "too many classes for the informative features: needs classes * 2 <= "
             "2 ** informative", ".classes"),
        rule("self.name != 'file' || !has(self.path) || self.path.endsWith('.csv') || "
             "self.path.endsWith('.npz')", "path must end in .csv or .npz", ".path"),
    ]
    schema["description"] = ("the data: digits (bundled), synthetic (generated) or file "
                             "(.csv/.npz)")
    schema["x-kubernetes-validations"] = rules
    return schema


def duration_schema() -> dict[str, Any]:
    return {
        "x-kubernetes-int-or-string": True,
        "description": "stop starting trials after this long: seconds, or e.g. 90s, 30m, 2h, "
                       "1h30m, 1d",
        "x-kubernetes-validations": [
            rule(f"type(self) == int ? self > 0 : self.matches({lit(DURATION)})",
                 "must be a positive duration such as 90s, 30m, 2h, 1h30m or 1d"),
            rule("type(self) == int || self.matches('[1-9]')",
                 "must be a positive duration, not 0"),
        ],
    }


def _string_list(description: str, item: str, max_length: int = MAX_LONG_STRING
                 ) -> dict[str, Any]:
    return {"type": "array", "maxItems": MAX_ITEMS, "description": description,
            "items": _string(max_length, description=item)}


def _open_object(description: str, **properties: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "description": description,
                           "x-kubernetes-preserve-unknown-fields": True}
    if properties:
        out["properties"] = properties
    return out


def _open_list(description: str, item: str, required: list[str], **properties: Any
               ) -> dict[str, Any]:
    out = _open_object(item, **properties)
    out["required"] = required
    return {"type": "array", "maxItems": MAX_ITEMS, "description": description, "items": out}


def _string(max_length: int = MAX_STRING, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length, **extra}


def _string_map(description: str, value: str) -> dict[str, Any]:
    return {"type": "object", "maxProperties": MAX_MAP, "description": description,
            "additionalProperties": _string(description=value)}


def _quantities(description: str) -> dict[str, Any]:
    return {"type": "object", "maxProperties": MAX_MAP, "description": description,
            "additionalProperties": {"x-kubernetes-int-or-string": True, "pattern": QUANTITY,
                                     "description": "a quantity, e.g. 2, 500m, 8Gi"}}


def pod_template_schema() -> dict[str, Any]:
    """Worker pod settings: container and PodSpec fields, in the core Pod schema's shapes.

    The common fields are typed (so `kubectl apply` catches a misspelt type); deeper objects
    and other PodSpec/Container fields are kept as written for the operator to pass on.
    """
    return _open_object(
        "worker pod settings (container and PodSpec fields such as image, resources, "
        "nodeSelector, tolerations); Kubernetes only",
        image=_string(description="the image of the worker and ensemble pods"),
        imagePullPolicy={"type": "string", "enum": list(IMAGE_PULL_POLICIES),
                         "description": "Always, IfNotPresent or Never"},
        command=_string_list("the container's command (default: kubetune)", "one word"),
        args=_string_list("the command's arguments (default: kubetune worker's)",
                          "one argument"),
        env=_open_list("environment variables of the trainer container",
                       "an environment variable", ["name"],
                       name=_string(description="the variable's name"),
                       value=_string(MAX_LONG_STRING, description="the variable's value"),
                       valueFrom=_open_object("a source for the value")),
        resources={"type": "object", "description": "compute resources of the trainer container",
                   "properties": {
                       "limits": _quantities("the most the container may use, by resource "
                                             "(e.g. nvidia.com/gpu: 1)"),
                       "requests": _quantities("what the scheduler reserves, by resource")},
                   "x-kubernetes-preserve-unknown-fields": True},
        nodeSelector=_string_map("node labels a worker pod's node must have", "a label value"),
        tolerations=_open_list(
            "taints the worker pods tolerate", "a toleration", [],
            key=_string(description="the taint's key"),
            value=_string(description="the taint's value (operator Equal)"),
            operator={"type": "string", "enum": ["Exists", "Equal"],
                      "description": "Exists or Equal (default)"},
            effect={"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"],
                    "description": "the taint effect tolerated (default: all)"},
            tolerationSeconds={"type": "integer", "description": "how long a NoExecute taint "
                                                                 "is tolerated"}),
        affinity=_open_object("node, pod and pod-anti affinity (core/v1 Affinity)"),
        volumes=_open_list("volumes of the worker pods (the types the admin allows)",
                           "a pod volume (core/v1 Volume)", ["name"],
                           name=_string(description="the volume's name")),
        volumeMounts=_open_list("where the trainer container mounts the volumes",
                                "a volume mount of the trainer container", ["name", "mountPath"],
                                name=_string(description="the volume mounted"),
                                mountPath=_string(MAX_LONG_STRING,
                                                  description="where, an absolute path"),
                                subPath=_string(MAX_LONG_STRING,
                                                description="a path inside the volume"),
                                readOnly={"type": "boolean", "description": "mount read-only"}),
        serviceAccountName=_string(description="the pods' ServiceAccount (one the admin "
                                               "allows)"),
        imagePullSecrets=_open_list("Secrets to pull the image with",
                                    "a secret to pull the image with", ["name"],
                                    name=_string(description="the Secret's name")),
        priorityClassName=_string(description="the pods' PriorityClass"),
        # Declared, though kept as written, so that CEL sees them: a transition rule compares
        # only the fields a schema names (a kept unknown field is invisible to it).
        securityContext=_open_object("the pod's securityContext: runAsUser, runAsGroup, "
                                     "fsGroup, supplementalGroups, fsGroupChangePolicy"),
        envFrom=_open_list("sources of environment variables (core/v1 EnvFromSource)",
                           "a ConfigMap or Secret to take variables from", []),
        workingDir=_string(MAX_LONG_STRING, description="the trainer container's working "
                                                        "directory"),
        runtimeClassName=_string(description="the pods' RuntimeClass (one the admin allows)"),
        schedulerName=_string(description="the scheduler that places the pods"),
        topologySpreadConstraints=_open_list(
            "how the pods spread over zones or nodes (core/v1 TopologySpreadConstraint)",
            "a topology spread constraint", []),
        terminationGracePeriodSeconds={"type": "integer",
                                       "description": "seconds a stopping pod gets before it "
                                                      "is killed"},
        labels=_string_map("labels added to the pods", "a label value"),
        annotations=_string_map("annotations added to the pods", "an annotation value"),
    )


# ------------------------------------------------------------------------------ cross-field rules
def _yaml_names(model_cls: Any, table: dict[str, Any]) -> dict[str, Any]:
    """A table of the spec model keyed by field name, keyed by the name written in YAML."""
    return {model_cls.model_fields[name].alias: value for name, value in table.items()}


SAMPLER_OPTIONS = _yaml_names(model.Sampler, model.SAMPLER_OPTIONS)
PRUNER_OPTIONS = _yaml_names(model.Pruner, model.PRUNER_OPTIONS)


def _option_rules(options: dict[str, tuple[str, ...]], what: str) -> list[dict[str, Any]]:
    return [rule(f"!has(self.{name}) || {one_of('self.type', users)}",
                 f"{name} is only used by the {words(users, 'and')} {what}"
                 f"{'s' if len(users) > 1 else ''}", f".{name}")
            for name, users in options.items()]


def _space(name: str) -> str:
    return f"self.searchSpace.{name}"


def _from_preset(name: str, where: Any = None) -> str:
    """CEL: ``name`` is searched because a preset brings it (not written, not fixed).

    ``where(entry)`` narrows it to the presets whose entry for ``name`` passes."""
    presets = [p for p, preset in PRESETS.items() if name in preset.space
               and (where is None or where(preset.space[name]))]
    if not presets:
        return "false"
    return (f"(has(self.searchSpace.{PRESET_KEY}) && "
            f"{one_of('self.searchSpace.' + PRESET_KEY, presets)} && !has({_space(name)}) && "
            f"(!has(self.trainer.builtin) || !has(self.trainer.builtin.params.{name})))")


def _stage_sum() -> str:
    return " + ".join(f"(self.stages.size() > {i} ? self.stages[{i}].trials : 0)"
                      for i in range(model.MAX_STAGES))


def stage_rules() -> list[dict[str, Any]]:
    """spec._stage_problems."""
    last = "self.stages[self.stages.size() - 1]"
    dataset = "self.trainer.builtin.dataset"
    synthetic = {name: info.default for name, info in model.SyntheticData.model_fields.items()}
    # a file's classes are known when it is read: any count passes here
    fewer = "!has(self.trainer.builtin) || (" + " : ".join(
        [f"{dataset}.name == {lit(name)} ? s.data.classes < {count}"
         for name, count in model.DATASET_CLASSES.items()]
        + [f"{dataset}.name == 'synthetic' ? "
           f"s.data.classes < {or_default('classes', synthetic['classes'], dataset)}",
           "true"]) + ")"
    return [
        rule(f"!has(self.stages) || !has(self.budget.maxTrials) || "
             f"self.budget.maxTrials == {_stage_sum()}",
             "maxTrials must be the sum of the stages' trials (or left out)",
             ".budget.maxTrials"),
        rule("!has(self.stages) || self.sampler.type != 'grid'",
             "the grid sampler tries a fixed grid: stages need a sampler that searches ranges",
             ".stages"),
        rule(f"!has(self.stages) || (!has({last}.epochs) && !has({last}.data))",
             "the last stage runs at full fidelity: it cannot set epochs or data", ".stages"),
        rule(f"!has(self.stages) || !has({last}.top)",
             "top narrows nothing on the last stage", ".stages"),
        rule(f"!has(self.stages) || !has({_space('epochs')}) || "
             f"self.stages.all(s, !has(s.epochs))",
             "epochs is searched in searchSpace: a stage cannot also set it", ".stages"),
        rule(f"!has(self.stages) || self.stages.all(s, !has(s.data) || !has(s.data.classes) || "
             f"({fewer}))",
             "a stage's data.classes must be fewer than the dataset's classes", ".stages"),
        rule("!has(self.stages) || has(self.trainer.builtin) || "
             "self.stages.all(s, !has(s.data))",
             "data fidelities need the builtin trainer (your own code loads its own data); "
             "use epochs", ".stages"),
    ]


def code_params_schema() -> dict[str, Any]:
    return _open_object("fixed params handed to an entrypoint or command with the sampled "
                        "ones (any JSON values)")


def metrics_schema() -> dict[str, Any]:
    return {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS,
            "x-kubernetes-list-type": "set",
            "description": "the metrics your code reports (required with entrypoint or "
                           "command); the objective metric is one of them",
            "items": _string(minLength=1, description="a metric's name")}


CODE_FIELDS = [model.Trainer.model_fields[name].alias for name in model.CODE_FIELDS]


def trainer_rules() -> list[dict[str, Any]]:
    """spec._trainer_problems: exactly one kind of trainer, each field with its kind."""
    kinds = " + ".join(f"(has(self.{k}) ? 1 : 0)" for k in model.TRAINER_KINDS)
    return [
        rule(f"{kinds} == 1", "set exactly one of builtin, entrypoint or command"),
        rule(f"!has(self.builtin) || !({has_any(CODE_FIELDS)})",
             f"{words(CODE_FIELDS)} are only used with entrypoint or command (the builtin "
             "trainer's fixed params go in builtin.params)"),
        rule("has(self.builtin) || has(self.metrics)",
             "metrics is required with entrypoint or command: the metrics your code reports",
             ".metrics"),
        rule("!has(self.stopGracePeriod) || has(self.command)",
             "stopGracePeriod is only used with command", ".stopGracePeriod"),
        rule(f"!has(self.entrypoint) || "
             f"self.entrypoint.matches({lit(model.ENTRYPOINT_PATTERN)})",
             "entrypoint must be 'package.module:function'", ".entrypoint"),
        rule("!has(self.command) || self.command.size() == 0 || self.command[0] != ''",
             "the program (the first item of command) must not be empty", ".command"),
        rule("!has(self.metrics) || !self.metrics.exists(m, m == 'epoch')",
             "'epoch' is the step of a report, not a metric", ".metrics"),
        rule("!has(self.image) || !has(self.template) || !has(self.template.image)",
             "image is also set in template.image: set the image in one place", ".image"),
    ]


def spec_rules() -> list[dict[str, Any]]:
    """Rules on the whole spec: the spec model's semantic checks (spec._semantic_problems)."""
    knobs = list(KNOBS)
    both = {k: f"has({_space(k)}) && has(self.trainer.builtin.params.{k})" for k in knobs}
    floats = [k for k in knobs if KNOBS[k].kind == "float"]
    unstepped = lambda e: e["type"] == "float" and "step" not in e and "points" not in e  # noqa
    open_float = {k: f"(has({_space(k)}) && {_space(k)}.type == 'float' && "
                     f"!has({_space(k)}.step) && !has({_space(k)}.points)) || "
                     f"{_from_preset(k, unstepped)}" for k in floats}
    numeric = [k for k in knobs if KNOBS[k].kind in ("float", "int")]
    if any("epochs" in preset.space for preset in PRESETS.values()):
        raise CrdError("a preset searches epochs: the maxResource and stage rules need it")
    space_epochs = _space("epochs")
    max_resource = "self.pruning.pruner.maxResource"
    fixed_epochs = ("(has(self.trainer.builtin) ? (has(self.trainer.builtin.params.epochs) ? "
                    "self.trainer.builtin.params.epochs : self.trainer.builtin.epochs) : "
                    "(has(self.trainer.epochs) ? self.trainer.epochs : "
                    f"{max_resource}))")
    builtin = "has(self.trainer.builtin)"

    def listing(conditions: dict[str, str]) -> str:
        return " + ".join(f"(({c}) ? ' {k}' : '')" for k, c in conditions.items())

    return [rule_ for name, knob in KNOBS.items() if (rule_ := knob_rule(name, knob))] + [
        rule(f"!{builtin} || (" + " && ".join(f"!({c})" for c in both.values()) + ")",
             "a knob is both fixed in trainer.builtin.params and searched in searchSpace: fix "
             "it or search it, not both", ".trainer.builtin.params",
             "'fixed in trainer.builtin.params and also searched in searchSpace (fix it or "
             "search it, not both):' + " + listing(both)),
        rule("self.sampler.type != 'grid' || !(" + " || ".join(
                f"({c})" for c in open_float.values()) + ")",
             "the grid sampler needs a finite set of values: give every float parameter a "
             "step or points", ".searchSpace",
             "'the grid sampler needs a finite set of values: give step or points to' + "
             + listing(open_float)),
        rule(f"self.sampler.type != 'cmaes' || !{builtin} || " + " || ".join(
                f"(has({_space(k)}) && {_space(k)}.type != 'categorical') || "
                f"{_from_preset(k, lambda e: e['type'] != 'categorical')}" for k in numeric),
             "cmaes needs at least one float or int parameter", ".sampler.type"),
        rule(f"!has(self.searchSpace.{PRESET_KEY}) || " + " || ".join(
                [f"has({_space(k)})" for k in knobs] + [_from_preset(k) for k in knobs]),
             "must define at least one parameter to search (the preset's are all fixed in "
             "trainer.builtin.params)", ".searchSpace"),
        # spec.JobSpec.epochs: the most epochs a trial can train
        rule(f"!has({max_resource}) || (has({space_epochs}) ? "
             f"({space_epochs}.type == 'int' ? "
             f"(!has({space_epochs}.high) || double({max_resource}) <= {space_epochs}.high) : "
             f"(!has({space_epochs}.choices) || "
             f"{space_epochs}.choices.exists(c, c >= double({max_resource})))) : "
             f"{max_resource} <= {fixed_epochs})",
             "maxResource exceeds the epochs a trial trains", ".pruning.pruner.maxResource"),
        rule(f"!{builtin} || !has(self.objective.metric) || "
             f"{one_of('self.objective.metric', REPORTED_METRICS)}",
             f"the builtin trainer reports {words(REPORTED_METRICS, 'and')}: the objective "
             "metric must be one of them", ".objective.metric"),
        rule(f"{builtin} || !has(self.trainer.metrics) || !has(self.objective.metric) || "
             "self.objective.metric in self.trainer.metrics",
             "the objective metric must be one of trainer.metrics", ".objective.metric"),
        *objective_rules(builtin),
        rule(f"{builtin} || !self.ensemble.enabled || self.ensemble.members == 'trials'",
             "ensemble members seeds and snapshots need the builtin trainer; use trials",
             ".ensemble.members"),
    ] + stage_rules()


def objective_rules(builtin: str) -> list[dict[str, Any]]:
    """Several objectives (spec._objective_problems): metrics the trainer reports, a sampler
    that searches them, no Optuna pruner, and a primary the ensemble can score."""
    multi = "has(self.objective.metrics)"
    options = list(PRUNER_OPTIONS)
    primary = ("(has(self.objective.metrics) ? (has(self.objective.primary) ? "
               "self.objective.primary : self.objective.metrics[0].metric) : "
               "(has(self.objective.metric) ? self.objective.metric : ''))")
    no_pruner = ("Optuna's pruners do not support several objectives (objective.metrics): "
                 "leave pruning.pruner out or set its type to none; the NaN and divergence "
                 "guards still prune every trial")
    return [
        rule(f"!{builtin} || !{multi} || self.objective.metrics.all(m, "
             f"{one_of('m.metric', REPORTED_METRICS)})",
             f"the builtin trainer reports {words(REPORTED_METRICS, 'and')}: each objective "
             "metric must be one of them", ".objective.metrics"),
        rule(f"{builtin} || !has(self.trainer.metrics) || !{multi} || "
             "self.objective.metrics.all(m, m.metric in self.trainer.metrics)",
             "each objective metric must be one of trainer.metrics", ".objective.metrics"),
        rule(f"!{multi} || {one_of('self.sampler.type', model.MULTI_OBJECTIVE_SAMPLERS)}",
             "this sampler does not search several objectives (objective.metrics): use "
             f"{words(model.MULTI_OBJECTIVE_SAMPLERS, 'or')}", ".sampler.type"),
        rule(f"!{multi} || {one_of('self.pruning.pruner.type', ['median', 'none'])}",
             no_pruner, ".pruning.pruner.type"),
        rule(f"!{multi} || !({has_any(options, 'self.pruning.pruner')})", no_pruner,
             ".pruning.pruner"),
        rule(f"!{builtin} || !self.ensemble.enabled || "
             f"{none_of(primary, model.MINIMIZED_METRICS)}",
             "the ensemble step ranks and scores trials by the primary objective, and a model's "
             "size is no score of predictions: make an accuracy, F1 or loss metric the primary, "
             "or set ensemble.enabled: false", ".objective"),
    ]


RULES: dict[tuple[str, ...], list[dict[str, Any]]] = {
    (): spec_rules(),
    ("objective",): [
        rule("!has(self.direction) || !has(self.metric) || self.direction != 'maximize' || "
             f"!({one_of('self.metric', LOSS_METRICS)})",
             "a loss is minimized: use direction minimize", ".direction"),
        rule("has(self.metric) || has(self.metrics)",
             "metric is required: the metric to optimize (or metrics, a list of several "
             "objectives)", ".metric"),
        rule("!has(self.metric) || !has(self.metrics)",
             "metric cannot be combined with metrics: give one objective as metric (and "
             "direction), or several as metrics", ".metric"),
        rule("!has(self.direction) || !has(self.metrics)",
             "with metrics, each entry has its own direction", ".direction"),
        rule("!has(self.primary) || has(self.metrics)",
             "primary is only used with metrics (several objectives)", ".primary"),
        rule("!has(self.primary) || !has(self.metrics) || "
             "self.metrics.exists(m, m.metric == self.primary)",
             "primary must be one of the metrics", ".primary"),
        rule("!has(self.metrics) || self.metrics.all(a, "
             "self.metrics.exists_one(b, b.metric == a.metric))",
             "an objective metric is listed twice", ".metrics"),
        rule("!has(self.metrics) || self.metrics.all(m, !has(m.direction) || "
             f"m.direction != 'maximize' || !({one_of('m.metric', LOSS_METRICS)}))",
             "a loss is minimized: use direction minimize", ".metrics"),
    ],
    ("sampler",): _option_rules(SAMPLER_OPTIONS, "sampler"),
    ("pruning", "pruner"): _option_rules(PRUNER_OPTIONS, "pruner") + [
        rule("!has(self.type) || self.type != 'percentile' || has(self.percentile)",
             "percentile is required by the percentile pruner (e.g. 25)", ".percentile"),
        rule("!has(self.minResource) || !has(self.maxResource) || "
             "self.minResource < self.maxResource",
             "minResource must be < maxResource", ".minResource"),
    ],
    ("artifacts",): [rule("!has(self.path) || self.path.startsWith('/')",
                          "path must be an absolute path (the folder the worker pods share, "
                          "e.g. /artifacts)", ".path")],
    ("storage",): [rule("!has(self.gracePeriod) || !has(self.heartbeatInterval) || "
                        "self.gracePeriod >= 2 * self.heartbeatInterval",
                        "gracePeriod must be at least twice heartbeatInterval", ".gracePeriod")],
    ("trainer",): trainer_rules(),
    ("trainer", "builtin", "split"): [rule(
        "!has(self.validation) || !has(self.test) || self.validation + self.test < 0.9",
        "validation + test must leave at least 10% for training", ".test")],
}

OVERRIDES = {
    ("searchSpace",): search_space_schema,
    ("trainer", "builtin", "dataset"): dataset_schema,
    ("trainer", "builtin", "params"): params_schema,
    ("trainer", "template"): pod_template_schema,
    ("trainer", "params"): code_params_schema,
    ("trainer", "metrics"): metrics_schema,
    ("budget", "timeout"): duration_schema,
    ("budget", "maxTrials"): max_trials_schema,
    ("stages",): stages_schema,
    ("warmStart", "enqueue"): warm_start_enqueue_schema,
}

ENUMS = {  # plain strings in the model, checked against these names by its validators
    ("sampler", "type"): list(model.SAMPLERS),
    ("pruning", "pruner", "type"): list(model.PRUNERS),
    ("trainer", "builtin", "model"): list(MODELS),
}

DESCRIPTIONS = {
    (): "what to tune, how, and with which budget (see the kubetune docs)",
    ("objective",): "the metric to optimize (metric, direction), or several (metrics, "
                    "primary)",
    ("objective", "metric"): "a metric the trainer reports (builtin: "
                             f"{', '.join(REPORTED_METRICS)}; your code: one of trainer.metrics)",
    ("objective", "direction"): "maximize or minimize (default: minimize for losses and "
                                "n_params, else maximize)",
    ("budget",): "how many trials, how many at once, and for how long",
    ("budget", "parallelism"): "worker pods, each running budget.trialsPerWorker trials at "
                               "once; may be edited while the job runs",
    ("budget", "maxFailedTrials"): "the job fails once more trials than this have failed",
    ("sampler",): "how Optuna picks the next parameters",
    ("pruning",): "stopping bad trials early: NaN/Inf and divergence guards, and a pruner",
    ("trainer",): "what trains one trial: exactly one of builtin, entrypoint (your Python "
                  "function) or command (your program)",
    ("trainer", "builtin"): "the built-in PyTorch MLP trainer",
    ("storage",): "the Optuna storage and worker heartbeats",
    ("artifacts",): "where workers keep model weights and predictions",
    ("ensemble",): "combining the best trials after the search",
}


EDITABLE = [tuple(path) for path in model.EDITABLE_FIELDS]
EDITABLE_WORDS = words([".".join(path) for path in EDITABLE])


def _holds_editable(path: tuple[str, ...]) -> bool:
    return any(len(e) > len(path) and e[:len(path)] == path for e in EDITABLE)


def transition_rules(path: tuple[str, ...], node: dict[str, Any]) -> list[dict[str, Any]]:
    """Rules that keep a running job's spec as created, its editable fields aside: ``self ==
    oldSelf`` on each largest subtree without an editable field, and, on a node holding
    editable fields, that its optional fields (no default) are neither added nor removed (a
    transition rule only runs where both the old and the new value exist)."""
    if any(path[:len(e)] == e for e in EDITABLE):
        return []
    if _holds_editable(path):
        return [rule(f"has(self.{name}) == has(oldSelf.{name})",
                     f"{name} cannot be added or removed once the job exists (only "
                     f"{EDITABLE_WORDS} can change): create a new TuningJob", f".{name}")
                for name, sub in node.get("properties", {}).items()
                if "default" not in sub and path + (name,) not in EDITABLE
                and not _holds_editable(path + (name,)) and name not in node.get("required", ())]
    if not _holds_editable(path[:-1]):
        return []  # a subtree of one that has the rule
    return [rule("self == oldSelf", f"cannot change once the job exists (only {EDITABLE_WORDS} "
                                    "can): create a new TuningJob")]


def _walk(converter: _Converter, node: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """Convert the model schema at ``path``, applying overrides, enums and rules below it."""
    where = ".".join(("spec",) + path)
    if path in OVERRIDES:
        out = OVERRIDES[path]()
        if node.get("description") and "description" not in out:
            out["description"] = node["description"]
    else:
        resolved = converter.resolve(node)
        if resolved.get("type") == "object" and "properties" in resolved:
            shallow = {k: v for k, v in resolved.items() if k != "properties"}
            out = converter.convert({**shallow, "properties": {}}, where)
            out["properties"] = {name: _walk(converter, sub, path + (name,))
                                 for name, sub in resolved["properties"].items()}
        else:
            out = converter.convert(resolved, where)
    if path in ENUMS:
        out["enum"] = ENUMS[path]
        out.pop("maxLength", None)
    if path in DESCRIPTIONS:
        out["description"] = DESCRIPTIONS[path]
    rules = RULES.get(path, []) + transition_rules(path, out)
    if rules:
        out["x-kubernetes-validations"] = out.get("x-kubernetes-validations", []) + rules
    return out


def spec_schema() -> dict[str, Any]:
    """The structural schema of ``spec``, generated from ``kubetune.spec.model.JobSpec``."""
    schema, defs = _json_schema(model.JobSpec)
    return _walk(_Converter(defs), schema, ())


def status_schema() -> dict[str, Any]:
    """Written by the operator (``kubetune.job.status.build_status``); what columns and
    ``kubectl explain`` read is typed, the rest kept as written."""
    counts = {name: {"type": "integer", "description": f"{name} trials"}
              for name in ("total", "complete", "pruned", "failed", "running")}
    counts["running"]["description"] = "trials running now"
    counts["total"]["description"] = "trials in the study"
    return _open_object(
        "observed state, written by the operator: phase, trial counts, best trial, "
        "leaderboard, conditions",
        phase={"type": "string", "description": "Pending | Running | Ensembling | Succeeded | "
                                                "Failed"},
        progress={"type": "string", "description": "finished trials / maxTrials, e.g. 25/100"},
        objective=_open_object("what the trials are ranked by",
                               metric={"type": "string",
                                       "description": "the objective metric (the primary one, "
                                                      "with several objectives)"}),
        observedGeneration={"type": "integer", "format": "int64",
                            "description": "the metadata.generation of the spec this status "
                                           "is of"},
        trials=_open_object("trial counts", **counts),
        best=_open_object("the best trial so far",
                          trial={"type": "integer", "description": "its number"},
                          value={"type": "number", "description": "its objective value (the "
                                                                  "primary objective's)"}),
        paretoFront=_open_object(
            "several objectives: the trials no other trial beats in every objective (at most "
            "10 of them, spread along the front)",
            size={"type": "integer", "description": "trials on the Pareto front"}),
        conditions={"type": "array", "description": "the job's conditions (Ready, Complete, "
                                                    "Failed, WorkersScheduled, EnsembleReady...)",
                    "items": _open_object(
                        "a condition (the shape of metav1.Condition)",
                        type={"type": "string", "description": "the condition's type, e.g. "
                                                               "Ready or Failed"},
                        status={"type": "string", "enum": ["True", "False", "Unknown"],
                                "description": "True, False or Unknown"},
                        reason={"type": "string", "description": "why, in one CamelCase word"},
                        message={"type": "string", "description": "why, for people (at most a "
                                                                  "few thousand characters)"},
                        lastTransitionTime={"type": "string", "format": "date-time",
                                            "description": "when the status last changed"},
                        observedGeneration={"type": "integer", "format": "int64",
                                            "description": "the metadata.generation the "
                                                           "condition is of"})},
        diagnosis=_open_object(
            "what the finished trials' learning curves say (kubetune.builtin.diagnosis)",
            mostCommon={"type": "string", "description": "the most common label: healthy, "
                                                         "overfit, underfit, not-learning, "
                                                         "diverged or unknown"},
            advice={"type": "string", "description": "one line of advice for that label"}),
    )


def openapi_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A TuningJob runs a distributed Optuna study: trainer pods share one "
                       "study, bad trials are pruned early, and the best trials are ensembled.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": f"{GROUP}/{VERSION}"},
            "kind": {"type": "string", "description": KIND},
            # The API server honours restrictions on metadata.name (and only on it): the spec
            # model wants a DNS-1123 label, as the study and pod names derive from it. It
            # refuses a description of metadata itself.
            "metadata": {"type": "object", "properties": {"name": {
                             "type": "string", "maxLength": model.NAME_MAX,
                             "pattern": model.NAME_PATTERN,
                             "description": "the job's name: a DNS label (its study and pods "
                                            "are named after it)"}}},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
     "description": "Pending, Running, Ensembling, Succeeded or Failed"},
    {"name": "Trials", "type": "string", "jsonPath": ".status.progress",
     "description": "finished trials / maxTrials"},
    {"name": "Best", "type": "number", "jsonPath": ".status.best.value",
     "description": "the best objective value so far"},
    {"name": "Front", "type": "integer", "jsonPath": ".status.paretoFront.size",
     "description": "trials on the Pareto front (several objectives only)"},
    {"name": "Waiting", "type": "string",
     "jsonPath": '.status.conditions[?(@.type=="WorkersScheduled")].reason',
     "description": "why pods wait: Unschedulable while the cluster cannot place them (kubectl "
                    "describe shows the scheduler's message)"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Metric", "type": "string", "jsonPath": ".status.objective.metric", "priority": 1,
     "description": "the objective metric (the primary one, with several objectives)"},
    {"name": "Running", "type": "integer", "jsonPath": ".status.trials.running", "priority": 1,
     "description": "trials running now"},
    {"name": "Pruned", "type": "integer", "jsonPath": ".status.trials.pruned", "priority": 1,
     "description": "trials stopped early"},
    {"name": "Diagnosis", "type": "string", "jsonPath": ".status.diagnosis.mostCommon",
     "priority": 1, "description": "the most common learning-curve label of the finished "
                                   "trials"},
]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": "kubetune",
                                              "app.kubernetes.io/part-of": "kubetune"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                      "singular": SINGULAR, "shortNames": list(SHORT_NAMES),
                      "categories": list(CATEGORIES)},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": openapi_schema()},
                "subresources": {"status": {}},
                "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
            }],
        },
    }


def render(crd: dict[str, Any] | None = None) -> str:
    """The CRD as the YAML committed in crds/tuningjob.yaml."""
    body = yaml.safe_dump(crd if crd is not None else build_crd(), sort_keys=False, width=100,
                          allow_unicode=True)
    return HEADER + body


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
