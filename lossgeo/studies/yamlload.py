"""YAML as people write study files: `5e-4` is a number (YAML 1.1 reads it as a string;
1.2 and every other reader take it as a float), and a key given twice in one mapping is an
error with both line numbers (PyYAML keeps the last one without a word)."""

from __future__ import annotations

import re
from typing import Any

import yaml

# YAML 1.2's core-schema float, which admits 5e-4 and 1e3 (1.1 asks for a dot and a sign)
_FLOAT_1_2 = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_INT = re.compile(r"^[-+]?[0-9]+$")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice."""


class StudyLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(f"key {key!r} given twice, at lines {seen[key]} and {line}")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


StudyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))
# ints keep their own tag: the float resolver above would otherwise take 32 first
StudyLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
StudyLoader.yaml_implicit_resolvers = {
    first: sorted(resolvers, key=lambda pair: pair[0] != "tag:yaml.org,2002:int")
    for first, resolvers in StudyLoader.yaml_implicit_resolvers.items()
}


def load_study_yaml(text: str) -> Any:
    """The document, read with `StudyLoader`."""
    return yaml.load(text, Loader=StudyLoader)  # noqa: S506 (a SafeLoader subclass)
