"""Reading a config: the file or text, strict YAML (duplicate keys refused), then the checks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from router.config.checks import _config, _Invalid, _join
from router.config.model import Config, ConfigError, ConfigUnreadable

CONFIG_VERSION_LENGTH: Final = 12
CONFIG_ENV_VAR: Final = "SMM_ROUTER_CONFIG"
DEFAULT_CONFIG_PATH: Final = Path("config/router.yaml")


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """`$SMM_ROUTER_CONFIG` when set, else `config/router.yaml`."""
    env = os.environ if env is None else env
    return Path(env.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read and check a config file; raise ConfigError listing every problem.

    Usage: `config = load(default_config_path())`. `${VAR}` references are read from `env`
    (default: the process environment); relative paths resolve against the file's folder.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigUnreadable(file, exc.strerror or str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigUnreadable(file, "not UTF-8 text") from None
    env = os.environ if env is None else env
    return _parse(text, base_dir=file.absolute().parent, env=env, source=str(file))


def parse(data: str, *, base_dir: Path, env: Mapping[str, str]) -> Config:
    """Check a config given as YAML text, as `load` does; `base_dir` anchors relative paths."""
    return _parse(data, base_dir=base_dir, env=env, source="<string>")


def _parse(text: str, *, base_dir: Path, env: Mapping[str, str], source: str) -> Config:
    loader = _StrictLoader(text)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: {_describe_yaml_error(exc)}"]) from None
    finally:
        loader.dispose()
    try:
        config = _config(raw, base_dir=base_dir, env=env)
    except _Invalid as exc:
        problems = [f"{path or '(top level)'}: {message}" for path, message in exc.problems]
        raise ConfigError(loader.duplicates + problems) from None
    if loader.duplicates:
        raise ConfigError(loader.duplicates)
    return replace(config, version=config_version(text))


def config_version(text: str) -> str:
    """The version of a config file's text: its SHA-256, shortened as git shortens commits."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:CONFIG_VERSION_LENGTH]


# --- YAML ----------------------------------------------------------------------------------------

_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that records duplicate mapping keys, which PyYAML would silently drop.

    Each becomes `<path>: duplicate key on line N (first on line M)` in `duplicates`; `_parse`
    refuses the document when there is any. Merge keys (`<<: *defaults`) still work: keys
    written next to them override the merged ones, as YAML intends.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []
        self._stack: list[str] = []  # the path of each node being composed
        self._paths: dict[int, str] = {}  # id(mapping node) -> its path
        self._pairs: dict[int, list[tuple[Node, Node]]] = {}  # as written, before merging

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        # `index` is the key node for a mapping value, the position for a list item.
        path = self._stack[-1] if self._stack else ""
        if isinstance(index, ScalarNode):
            path = _join(path, index.value)
        elif isinstance(index, int):
            path = f"{path}[{index}]"
        self._stack.append(path)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._stack.pop()
        if isinstance(node, MappingNode) and id(node) not in self._paths:
            self._paths[id(node)] = path
            self._pairs[id(node)] = list(node.value)
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first: dict[tuple[type, Hashable], int] = {}
        for key_node, _ in self._pairs.get(id(node)) or node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class refuses it, with its line
            line = key_node.start_mark.line + 1
            if (type(key), key) in first:
                self.duplicates.append(
                    f"{_join(self._paths.get(id(node), ''), key)}: duplicate key on line {line}"
                    f" (first on line {first[type(key), key]})"
                )
            else:
                first[type(key), key] = line
        return super().construct_mapping(node, deep)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context and exc.context_mark is not None:
            where += f" ({exc.context} on line {exc.context_mark.line + 1})"
        return where
    return str(exc)
