"""Dispatch on model families is data: no module outside the engine's family files and the
registry branches on a family's name or its pipeline classes (docstrings may mention them)."""

from __future__ import annotations

import ast
from pathlib import Path

import fluxserve
from fluxserve.models import DEFAULT_REGISTRY

SRC = Path(fluxserve.__file__).parent
ALLOWED = {SRC / "models.py", *(SRC / "engine" / "families").glob("*.py")}
# model names are data of the registry and of the path-family table (which model each path serves)
MODEL_NAMES_ALLOWED = ALLOWED | {SRC / "api" / "paths.py"}


def _names() -> tuple[set[str], set[str]]:
    families = {spec.family for spec in DEFAULT_REGISTRY.values()}
    family_words = {f.name for f in families} | {f.pipeline for f in families}
    family_words |= {variant for f in families for variant in f.variants.values()}
    return family_words, set(DEFAULT_REGISTRY)


def _code_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants used as values in code: docstrings and bare string statements left out."""
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
                  and isinstance(node.value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_family_names_appear_only_in_family_files_and_the_registry():
    family_words, model_names = _names()
    assert "FluxFillPipeline" in family_words and "flux-fill" in model_names  # the check knows every family
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for line, text in _code_strings(ast.parse(path.read_text(), str(path))):
            words = set(text.replace(":", " ").replace(",", " ").split())
            if path not in ALLOWED and (words & family_words or text in family_words):
                found.append(f"{path.relative_to(SRC)}:{line}: {text!r}")
            if path not in MODEL_NAMES_ALLOWED and text in model_names:
                found.append(f"{path.relative_to(SRC)}:{line}: model name {text!r}")
    assert not found, "family dispatch outside the family files:\n" + "\n".join(found)


def test_family_modules_import_torch_only_inside_functions():
    """The API reads the registry, which imports the family modules: they must not load torch."""
    heavy = {"torch", "diffusers", "transformers"}
    for path in (SRC / "engine" / "families").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {n.split(".")[0] for n in names} & heavy, f"{path.name} imports {names} at module level"
            assert not any(n.startswith("fluxserve.engine.") and not n.startswith("fluxserve.engine.families")
                           for n in names), f"{path.name} imports engine internals at module level: {names}"
