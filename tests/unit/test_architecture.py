"""The package's shape: imports flow one way, no cycles, no private names across modules, lower layers
take the section of the config they need. Parsed from the source, so a new back-edge fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Leaf modules: anything may import them; they import only each other.
LEAVES = {"megatrain.config", "megatrain.hardware", "megatrain.scaling.flops", "megatrain.parallel.stages",
          "megatrain.data.manifest", "megatrain.data.errors"}
# Which layer may import which (besides itself and the leaves): launcher -> engine -> {model, data,
# parallel, observe, export, plan}; model -> parallel; plan and scaling stand on the leaves alone.
ALLOWED = {
    "launcher": {"engine", "model", "data", "parallel", "observe", "export", "plan", "scaling"},
    "engine": {"model", "data", "parallel", "observe", "export", "plan"},  # plan: the pre-flight memory check
    "model": {"parallel"},
    "parallel": set(), "data": set(), "observe": set(), "export": set(), "plan": set(), "scaling": set(),
}
# Layers below the engine receive their section of the config (cfg.model, cfg.data, ...), never all of it.
SECTION_ONLY = {"model", "parallel", "data", "observe", "export"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("megatrain", "launcher"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] == "launcher" or len(parts) == 1 else parts[1]


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every megatrain / launcher import, lazy ones too."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] in
                    ("megatrain", "launcher")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("megatrain",
                                                                                               "launcher"):
            for alias in node.names:  # `from megatrain.data import tokenizer` imports a module
                child = f"{node.module}.{alias.name}"
                out.append((child, [], node.lineno) if child in MODULES else (node.module, [alias.name], node.lineno))
    return [(target, names, line) for target, names, line in out if target in MODULES]


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_import_follows_the_layering():
    wrong = []
    for module, imports in GRAPH.items():
        for target, _, line in imports:
            if target in LEAVES or target in ("megatrain", "launcher"):
                continue
            src, dst = _layer(module), _layer(target)
            if module in LEAVES:
                wrong.append(f"{module}:{line} is a leaf but imports {target}")
            elif dst == "launcher" and src != "launcher":
                wrong.append(f"{module}:{line} imports the launcher {target}")
            elif src != dst and dst not in ALLOWED.get(src, set()):
                wrong.append(f"{module}:{line} ({src}) imports {target} ({dst})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def _cycles(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_there_is_no_import_cycle_between_modules_or_between_layers():
    modules = {module: {target for target, _, _ in imports} for module, imports in GRAPH.items()}
    assert not _cycles(modules), "module import cycles:\n" + "\n".join(_cycles(modules))
    layers: dict[str, set[str]] = {}
    for module, targets in modules.items():
        for target in targets - LEAVES - {"megatrain", "launcher"}:
            if _layer(target) != _layer(module):
                layers.setdefault(_layer(module), set()).add(_layer(target))
    assert not _cycles(layers), "layer import cycles:\n" + "\n".join(_cycles(layers))


def test_no_private_name_crosses_a_module():
    leaks = []
    for module, imports in GRAPH.items():
        for target, names, line in imports:
            leaks += [f"{module}:{line} imports {target}.{n}" for n in names if n.startswith("_")]
        tree = ast.parse(MODULES[module].read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").startswith("megatrain") for a in node.names
                   if f"{node.module}.{a.name}" in MODULES}
        aliases |= {a.asname for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
                    if a.asname and a.name.startswith("megatrain")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_")):
                leaks.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not leaks, "private names used across modules:\n" + "\n".join(leaks)


@pytest.mark.parametrize("layer", sorted(SECTION_ONLY))
def test_lower_layers_take_a_section_of_the_config_not_all_of_it(layer):
    takers = [f"{module}:{line}" for module, imports in GRAPH.items() if _layer(module) == layer
              for target, names, line in imports if target == "megatrain.config" and "Config" in names]
    assert not takers, f"{layer} imports the whole Config: " + ", ".join(takers)


def test_the_checker_sees_a_back_edge():
    """The layering test can fail: a model module importing the engine is reported."""
    src, dst = _layer("megatrain.model.transformer"), _layer("megatrain.engine.trainer")
    assert dst not in ALLOWED[src] and src != dst
    assert any(target == "megatrain.parallel.mesh" for target, _, _ in GRAPH["megatrain.model.transformer"])
