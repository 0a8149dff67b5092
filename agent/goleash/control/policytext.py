"""A policy text read as YAML and checked at its top level.

A leaf module: `rules` compiles what this returns, `policy` stores and runs it, and
both import from here (neither imports the other back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from goleash.errors import GoleashError

MODES = ("enforce", "monitor", "off")
# Top-level keys a policy may have; the engine reads the ones it knows.
TOP_LEVEL_KEYS = (
    "mode",
    "rules",
    "levels",
    "defaults",
    "actions",
    "cooldown",
    "blast_radius",
    "evaluation_interval",
)


class PolicyError(GoleashError):
    """A policy text that cannot run; `line` is 1-based (0 when not tied to a line)."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"line {line}: {reason}" if line else reason)


@dataclass(frozen=True)
class PolicyDocument:
    """A validated policy."""

    text: str
    mode: str
    rules: tuple[dict[str, Any], ...]
    raw: dict[str, Any] = field(default_factory=dict)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _no_duplicate_keys(root: yaml.Node) -> None:
    """YAML lets a later key silently replace an earlier one; a policy must not (the
    reader sees one threshold, the engine runs the other). Walked without recursion:
    nesting depth is the author's."""
    todo = [root]
    while todo:
        node = todo.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                    if k.value in seen:
                        raise PolicyError(
                            _line(k),
                            f"key {k.value!r} appears twice in one mapping "
                            f"(first on line {seen[k.value]})",
                        )
                    seen[k.value] = _line(k)
                todo.append(v)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)


def parse_policy(text: str) -> PolicyDocument:
    """Parse a policy and check its top level (mode, rule names); PolicyError(line,
    reason) on the first problem. The rules themselves are checked by
    `rules.compile_document`; `policy.compile_policy` runs both."""
    if not text.strip():
        raise PolicyError(0, "the policy is empty")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise PolicyError(line, f"not valid YAML: {exc.problem or exc.context}") from exc
    except (yaml.YAMLError, RecursionError) as exc:
        raise PolicyError(0, f"not valid YAML: {type(exc).__name__}") from exc
    if root is not None:
        _no_duplicate_keys(root)
    if not isinstance(root, yaml.MappingNode) or not isinstance(raw, dict):
        raise PolicyError(1, "a policy is a mapping (keys like mode:, rules:)")
    keys = {k.value: (k, v) for k, v in root.value}
    for name, (knode, _) in keys.items():
        if name not in TOP_LEVEL_KEYS:
            raise PolicyError(
                _line(knode), f"unknown key {name!r} (known: {', '.join(TOP_LEVEL_KEYS)})"
            )
    mode = raw.get("mode", "monitor")
    if mode is False:  # YAML 1.1 reads a bare `mode: off` as false
        mode = "off"
    if mode not in MODES:
        raise PolicyError(_line(keys["mode"][1]), f"mode must be one of {', '.join(MODES)}")
    rules_node = keys.get("rules", (None, None))[1]
    rules = raw.get("rules") or []
    if rules_node is not None and not isinstance(rules, list):
        raise PolicyError(_line(rules_node), "rules must be a list")
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        node = rules_node.value[i] if isinstance(rules_node, yaml.SequenceNode) else root
        if not isinstance(rule, dict):
            raise PolicyError(_line(node), "each rule is a mapping with at least name: and signal:")
        name = rule.get("name")
        if not isinstance(name, str) or not name:
            raise PolicyError(_line(node), "a rule needs a name: (a non-empty string)")
        if name in seen:
            raise PolicyError(_line(node), f"rule name {name!r} is used twice")
        seen.add(name)
        if "signal" not in rule:
            raise PolicyError(_line(node), f"rule {name!r} needs a signal:")
    return PolicyDocument(text=text, mode=mode, rules=tuple(rules), raw=raw)
