"""The moderation policy: a YAML file, validated at load with errors that name the line.

    version: "2026-11-27"          # reported as policy_version (default: a hash of the file)
    encoder_addr: 127.0.0.1:50052  # the CLIP encoder, for filters that embed (default: --encoder-addr)
    categories:                    # per category a threshold and an action
      violence: {threshold: 0.5, action: block}
      nudity: {threshold: 0.5, action: {default: withhold, prompt: block}}   # action per stage
    filters:                       # name -> filter; `type:` picks the implementation (filters/)
      words: {type: blocklist, terms: {violence: [kill yourself]}}
      vendor: {type: external, address: 10.0.0.7:7000, fail_open: true}     # fail closed unless it says so
    stages:                        # which filters run where (a stage left out runs none)
      prompt: [words, vendor]
      final_output: [vendor]

Actions: `block` refuses the whole request, `withhold` drops that image (on the prompt stage it blocks: there
is only one prompt), `flag` allows and records. A filter that fails counts as a `block` in the category
`filter_unavailable`, unless its entry says `fail_open: true` (then it is skipped, and the audit log says so).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from services.safety.filters import FILTER_TYPES
from services.safety.filters.base import Filter, SpecError

STAGES = ("prompt", "input_image", "decoder_output", "final_output")
ACTIONS = ("flag", "withhold", "block")  # weakest first
FAILURE_CATEGORY = "filter_unavailable"
COMMON_FILTER_KEYS = frozenset({"type", "fail_open", "thresholds"})
DEFAULT_THRESHOLD = 0.5


class PolicyError(ValueError):
    """The policy file is invalid; the message starts with `file:line:`."""


# --- YAML with line numbers ---------------------------------------------------------------------------------
class _Map(dict):
    """A mapping that remembers the line of each key (1-based) and its own."""

    line: int = 0
    key_lines: dict[Any, int]


class _List(list):
    line: int = 0
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> _Map:  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {key!r} (first on line {seen[key]})",
                    problem_mark=key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        mapping = _Map(super().construct_mapping(node, deep=True))
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = seen
        return mapping

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> _List:  # type: ignore[override]
        items = _List(super().construct_sequence(node, deep=True))
        items.line = node.start_mark.line + 1
        items.item_lines = [child.start_mark.line + 1 for child in node.value]
        return items


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _LineLoader.construct_sequence)


def _line(node: Any, key: Any = None) -> int:
    if key is not None and isinstance(node, _Map) and key in node.key_lines:
        return node.key_lines[key]
    if key is not None and isinstance(node, _List) and isinstance(key, int) and key < len(node.item_lines):
        return node.item_lines[key]
    return getattr(node, "line", 1)


def _line_of_path(node: Any, path: str) -> int:
    """The line of a dotted key path inside `node` (as deep as it exists)."""
    line = _line(node)
    for part in path.split("."):
        if isinstance(node, _Map) and part in node:
            line, node = _line(node, part), node[part]
        elif isinstance(node, _List) and part.isdigit() and int(part) < len(node):
            line, node = _line(node, int(part)), node[int(part)]
        else:
            break
    return line


# --- The validated policy -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Category:
    name: str
    threshold: float  # a score >= threshold triggers the category
    actions: dict[str, str]  # stage -> "flag" | "withhold" | "block"


@dataclass
class Policy:
    path: str  # the file it came from
    version: str  # reported in every response and audit record
    categories: dict[str, Category]
    filters: dict[str, Filter]  # name -> instance (loaded, warm)
    stages: dict[str, list[str]]  # stage -> filter names, in order
    fail_open: dict[str, bool]  # filter name -> skip it when it fails (else fail closed)
    thresholds: dict[str, dict[str, float]]  # filter name -> category -> threshold overriding the category's
    encoder_addr: str | None = None
    # filter name -> its policy entry (a reload reuses the instances of unchanged entries)
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def action_for(self, category: str, stage: str, fallback: str = "block") -> str:
        """The action of `category` at `stage`; categories the policy does not list (from external filters)
        take `fallback` (the external filter's own action)."""
        known = self.categories.get(category)
        action = known.actions[stage] if known else fallback
        return "block" if stage == "prompt" and action == "withhold" else action

    def threshold_for(self, filter_name: str, category: str, own: float | None) -> float:
        override = self.thresholds.get(filter_name, {}).get(category)
        if override is not None:
            return override
        if own is not None:
            return own
        known = self.categories.get(category)
        return known.threshold if known else DEFAULT_THRESHOLD

    def close(self, keep: set[str] | frozenset[str] = frozenset()) -> None:
        for name, instance in self.filters.items():
            if name not in keep:
                instance.close()


def load_policy(path: str, previous: Policy | None = None, default_encoder_addr: str | None = None) -> Policy:
    """Reads, validates and instantiates the policy at `path`. Raises PolicyError naming file and line.

    Filters whose entry is unchanged from `previous` are reused (a reload does not reload models)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise PolicyError(f"{path}: cannot read the policy: {error.strerror}") from error
    try:
        doc = yaml.load(raw.decode("utf-8"), Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as error:
        raise PolicyError(f"{path}: the policy is not UTF-8: {error}") from error
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        line = mark.line + 1 if mark else 1
        raise PolicyError(f"{path}:{line}: invalid YAML: {error.problem}") from error
    except yaml.YAMLError as error:
        raise PolicyError(f"{path}: invalid YAML: {error}") from error
    return _validate(path, raw, doc, previous, default_encoder_addr)


def _validate(
    path: str, raw: bytes, doc: Any, previous: Policy | None, default_encoder_addr: str | None
) -> Policy:
    def fail(node: Any, key: Any, message: str) -> PolicyError:
        return PolicyError(f"{path}:{_line(node, key)}: {message}")

    if not isinstance(doc, _Map):
        raise fail(doc, None, "the policy must be a mapping with `categories`, `filters` and `stages`")
    unknown = set(doc) - {"version", "encoder_addr", "categories", "filters", "stages"}
    for key in sorted(unknown, key=str):
        raise fail(
            doc, key, f"unknown key {key!r} (expected version, encoder_addr, categories, filters, stages)"
        )

    version = doc.get("version")
    if version is not None and not isinstance(version, (str, int, float)):
        raise fail(doc, "version", "version must be a string")
    version = str(version) if version is not None else "sha256:" + hashlib.sha256(raw).hexdigest()[:12]
    encoder_addr = doc.get("encoder_addr")
    if encoder_addr is not None and not isinstance(encoder_addr, str):
        raise fail(doc, "encoder_addr", "encoder_addr must be host:port")
    encoder_addr = encoder_addr or default_encoder_addr

    # categories
    categories: dict[str, Category] = {}
    cats = doc.get("categories", _Map())
    if not isinstance(cats, dict):
        raise fail(doc, "categories", "categories must be a mapping of name -> {threshold, action}")
    for name, entry in cats.items():
        if not isinstance(entry, dict):
            raise fail(cats, name, f"categories.{name} must be a mapping with threshold and action")
        for key in entry:
            if key not in ("threshold", "action"):
                raise fail(entry, key, f"categories.{name}: unknown key {key!r} (expected threshold, action)")
        threshold = entry.get("threshold", DEFAULT_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise fail(entry, "threshold", f"categories.{name}.threshold must be a number")
        if "action" not in entry:
            raise fail(cats, name, f"categories.{name}.action is required (one of {', '.join(ACTIONS)})")
        categories[str(name)] = Category(str(name), float(threshold), _actions(entry, name, fail))

    # filters
    filters_node = doc.get("filters", _Map())
    if not isinstance(filters_node, dict):
        raise fail(doc, "filters", "filters must be a mapping of name -> {type, ...}")
    specs: dict[str, dict[str, Any]] = {}
    fail_open: dict[str, bool] = {}
    thresholds: dict[str, dict[str, float]] = {}
    policy_dir = os.path.dirname(os.path.abspath(path))
    for name, entry in filters_node.items():
        if not isinstance(entry, dict):
            raise fail(filters_node, name, f"filters.{name} must be a mapping with a `type`")
        kind = entry.get("type")
        if kind not in FILTER_TYPES:
            raise fail(
                entry if "type" in entry else filters_node,
                "type" if "type" in entry else name,
                f"filters.{name}.type: unknown filter type {kind!r} "
                f"(expected one of {', '.join(FILTER_TYPES)})",
            )
        cls = FILTER_TYPES[kind]
        for key in entry:
            if key not in COMMON_FILTER_KEYS | cls.spec_keys:
                allowed = ", ".join(sorted(COMMON_FILTER_KEYS | cls.spec_keys))
                raise fail(
                    entry, key, f"filters.{name}: unknown key {key!r} for type {kind} (expected {allowed})"
                )
        flag = entry.get("fail_open", False)
        if not isinstance(flag, bool):
            raise fail(entry, "fail_open", f"filters.{name}.fail_open must be true or false")
        fail_open[str(name)] = flag
        overrides = entry.get("thresholds", {})
        if not isinstance(overrides, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in overrides.values()
        ):
            raise fail(entry, "thresholds", f"filters.{name}.thresholds must map category -> number")
        thresholds[str(name)] = {str(k): float(v) for k, v in overrides.items()}
        specs[str(name)] = dict(entry)

    # stages
    stages: dict[str, list[str]] = {stage: [] for stage in STAGES}
    stages_node = doc.get("stages", _Map())
    if not isinstance(stages_node, dict):
        raise fail(doc, "stages", f"stages must be a mapping of stage ({', '.join(STAGES)}) -> filter names")
    for stage, names in stages_node.items():
        if stage not in STAGES:
            raise fail(
                stages_node, stage, f"stages: unknown stage {stage!r} (expected one of {', '.join(STAGES)})"
            )
        if names is None:
            continue
        if not isinstance(names, list):
            raise fail(stages_node, stage, f"stages.{stage} must be a list of filter names")
        for i, name in enumerate(names):
            if name not in specs:
                raise fail(names, i, f"stages.{stage}: no filter named {name!r} in `filters`")
            cls = FILTER_TYPES[specs[name]["type"]]
            wants = "text" if stage == "prompt" else "images"
            if wants not in cls.accepts:
                raise fail(names, i, f"stages.{stage}: filter {name!r} ({cls.type}) cannot check {wants}")
        stages[stage] = [str(n) for n in names]

    # Instantiate (reusing unchanged filters of the previous policy); a spec error names its key's line.
    instances: dict[str, Filter] = {}
    try:
        for name, spec in specs.items():
            same_encoder = previous is not None and previous.encoder_addr == encoder_addr
            if same_encoder and _same_spec(previous.specs.get(name), spec) and name in previous.filters:
                instances[name] = previous.filters[name]
                continue
            try:
                instances[name] = FILTER_TYPES[spec["type"]](name, spec, policy_dir)
                bind = getattr(instances[name], "bind", None)
                if bind is not None:
                    bind(encoder_addr)
            except SpecError as error:
                entry = filters_node[name]
                line = _line_of_path(entry, error.key)
                raise PolicyError(f"{path}:{line}: filters.{name}.{error.key}: {error.message}") from error
            except FileNotFoundError as error:
                raise fail(filters_node, name, f"filters.{name}: {error}") from error
    except BaseException:
        reused = set(previous.filters.values()) if previous else set()
        for instance in instances.values():
            if instance not in reused:
                instance.close()
        raise
    return Policy(path, version, categories, instances, stages, fail_open, thresholds, encoder_addr, specs)


def _actions(entry: dict, name: str, fail: Any) -> dict[str, str]:
    action = entry["action"]
    if isinstance(action, str):
        if action not in ACTIONS:
            raise fail(
                entry, "action", f"categories.{name}.action: {action!r} is not one of {', '.join(ACTIONS)}"
            )
        return {stage: action for stage in STAGES}
    if not isinstance(action, dict):
        raise fail(
            entry, "action", f"categories.{name}.action must be an action or a mapping stage -> action"
        )
    actions = {}
    default = action.get("default")
    for key, value in action.items():
        if key != "default" and key not in STAGES:
            raise fail(action, key, f"categories.{name}.action: unknown stage {key!r} (expected default, "
                       f"{', '.join(STAGES)})")  # fmt: skip
        if value not in ACTIONS:
            raise fail(
                action, key, f"categories.{name}.action.{key}: {value!r} is not one of {', '.join(ACTIONS)}"
            )
    for stage in STAGES:
        value = action.get(stage, default)
        if value is None:
            raise fail(
                action, None, f"categories.{name}.action: no action for stage {stage} (add `default:`)"
            )
        actions[stage] = value
    return actions


def _same_spec(a: Any, b: Any) -> bool:
    return a is not None and yaml.safe_dump(_plain(a), sort_keys=True) == yaml.safe_dump(
        _plain(b), sort_keys=True
    )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
