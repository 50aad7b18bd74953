"""Read capsim's YAML files strictly: a key given twice is an error naming its line, and ``1e-6`` is a number.

PyYAML's ``safe_load`` keeps the last of two equal keys without a word, and, following YAML 1.1, reads
``1e-6`` (no dot) as the string "1e-6". Both surprise whoever writes a scenario, so capsim loads YAML with
``StrictLoader``: a ``SafeLoader`` that refuses duplicate keys (merge keys ``<<`` still override, as YAML
says) and resolves YAML 1.2 floats.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode

from capsim.model.settings import SettingsError


class YamlFileError(SettingsError):
    """A YAML file cannot be read or parsed; the message names the file and the line."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys and reads ``1e-6`` as a float."""

    source = "<text>"

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not None:
                raise YamlFileError(f"{self.source}: line {line}: key {key!r} is given twice (first at line {first})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's float, which also matches 1e7 and 1E-6 (YAML 1.1 wants a dot in the mantissa).
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str = "<text>") -> Any:
    """Parse YAML text with :class:`StrictLoader`; errors are one line naming the source and the line."""
    loader = StrictLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise YamlFileError(f"{source}: not valid YAML{where}: {what}") from None
    except yaml.YAMLError as exc:
        raise YamlFileError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_yaml_file(path: Path, what: str = "YAML file") -> Any:
    """Read and parse a YAML file; a missing, unreadable or non-UTF-8 file raises ``YamlFileError`` naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        from capsim.paths import shipped_hint

        raise YamlFileError(f"{what} not found: {path}{shipped_hint(path, absolute=True)}") from None
    except IsADirectoryError:
        raise YamlFileError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise YamlFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return parse_yaml(text, str(path))
