"""Load a TuningJob YAML file the way Kubernetes reads it.

PyYAML follows YAML 1.1, where ``1e-4`` is a *string*; kubectl (YAML 1.2 via JSON) reads a
number. The loader reads 1.2 floats so one file means the same locally and on the cluster, and
reports the duplicate keys PyYAML silently collapses, each problem with its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml


class YamlError(ValueError):
    """A file that is not a YAML mapping we can read; ``line`` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and duplicate-key detection."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`, merged (and overridable) by construct_mapping
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise YamlError(f"duplicate key {key!r} (first at line {seen[key]})", line)
            seen[key] = line
        except TypeError:
            continue  # unhashable key: construct_mapping reports it with its line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass
class YamlDocument:
    """A parsed document plus the node tree, so a field path can be traced to its line."""

    data: Any
    root: yaml.Node | None

    def line_of(self, path: tuple[str | int, ...]) -> int | None:
        """Line (1-based) of the deepest node along ``path`` that exists in the file."""
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                # the last match is the value that counts (a key overrides one merged by `<<`)
                key, nxt = next(((k, v) for k, v in reversed(node.value)
                                 if k.value == str(part)), (None, None))
                if nxt is None:
                    return line
                line = key.start_mark.line + 1
                node = nxt
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if part >= len(node.value):
                    return line
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line


def load_yaml(text: str) -> YamlDocument:
    """Parse exactly one YAML document; raise YamlError with a line number otherwise."""
    try:
        roots = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        raise YamlError(f"YAML syntax error: {problem}", mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as err:  # a control character YAML does not allow
        raise YamlError(f"YAML syntax error: character {err.character:#06x} is not allowed",
                        text[:err.position].count("\n") + 1) from None
    # compose_all gives an empty document (a trailing `---`) as a null scalar, never None
    roots = [r for r in roots
             if not (isinstance(r, yaml.ScalarNode) and r.tag == "tag:yaml.org,2002:null")]
    if not roots:
        raise YamlError("the file is empty; expected one TuningJob")
    if len(roots) > 1:
        raise YamlError(
            f"the file holds {len(roots)} YAML documents; expected exactly one TuningJob",
            roots[1].start_mark.line + 1,
        )
    loader = _Loader("")
    try:
        data = loader.construct_document(roots[0])
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise YamlError(f"YAML error: {err.problem}", mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()
    return YamlDocument(data=data, root=roots[0])
