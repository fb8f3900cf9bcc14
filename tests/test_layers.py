"""The package's layering (``.importlinter``, described in docs/architecture.md) holds, with no import cycle, and
upstream internals are used only in ``nemo_bard/integrations/``."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nemo_bard"
UPSTREAM = ("torch", "transformers", "nemo_automodel")


def test_import_linter_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)
    # import-linter configures logging with dictConfig, which disables every logger that already exists; monkeypatch
    # puts each one's flag back afterwards, so later tests in this process still see the package's warnings
    for existing in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(existing, logging.Logger):
            monkeypatch.setattr(existing, "disabled", existing.disabled)
    assert lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True) == 0


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycles():
    graph = grimp.build_graph("nemo_bard")
    # a package's __init__ importing its own modules is not a cycle between layers: drop child -> parent edges
    for module in list(graph.modules):
        parent = module.rpartition(".")[0]
        if parent and graph.direct_import_exists(importer=module, imported=parent):
            graph.remove_import(importer=module, imported=parent)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def _private_upstream_uses(source: str) -> list[str]:
    """``line name`` of each private (underscore) name of torch / transformers / NeMo AutoModel that ``source``
    imports or reaches through an attribute of one of those modules."""
    tree = ast.parse(source)
    bound: set[str] = set()  # local names bound to an upstream module
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UPSTREAM:
                    bound.add((alias.asname or alias.name).split(".")[0])
                    if any(p.startswith("_") for p in alias.name.split(".")):
                        hits.append(f"{node.lineno} import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UPSTREAM:
            names = node.module.split(".") + [a.name for a in node.names]
            if any(p.startswith("_") and not p.startswith("__") for p in names):
                hits.append(f"{node.lineno} from {node.module} import {', '.join(a.name for a in node.names)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                hits.append(f"{node.lineno} {ast.unparse(node)}")
    return hits


def test_private_upstream_names_only_in_integrations():
    found = [f"{path.relative_to(ROOT)}:{hit}" for path in sorted(PACKAGE.rglob("*.py"))
             if "integrations" not in path.parts for hit in _private_upstream_uses(path.read_text(encoding="utf-8"))]
    assert found == []


def test_the_private_name_check_sees_imports_and_attributes():
    probe = ("import torch\nfrom transformers.models import _x\nwith torch._dynamo.config.patch():\n    pass\n"
             "torch.nn.functional.relu\nimport nemo_automodel._transformers.auto_model\n")
    assert _private_upstream_uses(probe) == ["2 from transformers.models import _x",
                                             "6 import nemo_automodel._transformers.auto_model", "3 torch._dynamo"]
