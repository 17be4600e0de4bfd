"""The package layout holds: imports run one way between ``server``'s packages, only
``engine/`` imports vLLM, only ``cluster/`` imports Ray and only ``store/`` knows SQL
(DESIGN §2, README "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[1] / "server"

# Lower layers never import higher ones; a package may import its own layer's peers only
# where listed in PEER_IMPORTS. ``protocol`` is the wire schema every package speaks.
LAYERS: list[set[str]] = [
    {"cli"},
    {"app"},
    {"routes"},
    {"bench"},
    {"serving", "feedback", "training", "evaluation"},
    {"models", "store", "protocol"},
    {"cluster"},  # the Ray backend: replicas of the engine, below the registry
    {"engine", "guards", "metrics", "resources", "telemetry"},
    {"errors", "settings"},
]
PEER_IMPORTS = {
    ("training", "feedback"),  # the online loop exports judged feedback as CUT data
    ("evaluation", "serving"),  # batch items take the serving path's completion ids
    ("training", "evaluation"),  # an iteration's promotion gate: judges and the win rate
    ("models", "protocol"),
    ("protocol", "models"),  # request models take the family table's defaults
    ("protocol", "store"),  # request models refuse text the store cannot keep (storable)
}
TOP_LEVEL_MODULES = {"__init__", "app", "settings", "errors", "metrics", "protocol"}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "server" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "server":
                found.update(f"server.{alias.name}" for alias in node.names)
    return found


def _modules() -> dict[str, set[str]]:
    return {
        ".".join(path.relative_to(SERVER.parent).with_suffix("").parts): _imports(path)
        for path in sorted(SERVER.rglob("*.py"))
    }


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def test_top_level_holds_only_the_thin_top_and_packages() -> None:
    loose = {p.stem for p in SERVER.glob("*.py")}
    assert loose == TOP_LEVEL_MODULES
    for package in (p for p in SERVER.iterdir() if (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc, f"server/{package.name}/__init__.py needs a docstring saying what it owns"


def test_imports_run_one_way() -> None:
    wrong = []
    for module, imports in _modules().items():
        source = _unit(module)
        assert source is not None
        if source == "__init__":
            continue
        for target in filter(None, map(_unit, imports)):
            if target == source or target == "__version__":
                continue
            upward = _layer(target) < _layer(source)
            sideways = _layer(target) == _layer(source) and (source, target) not in PEER_IMPORTS
            if upward or sideways:
                wrong.append(f"{module} imports server.{target}")
    assert not wrong, wrong


def test_only_engine_imports_vllm_and_only_store_knows_sql() -> None:
    for module, imports in _modules().items():
        roots = {name.split(".")[0] for name in imports}
        if "vllm" in roots:
            assert module.startswith("server.engine."), module
        if "ray" in roots:
            assert module.startswith("server.cluster."), module
        if "sqlalchemy" in roots:
            assert module.startswith("server.store."), module
