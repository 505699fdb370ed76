"""`dvc.yaml` declares, file by file, every project module each stage runs (its import closure), and no other:
a change to code a stage imports must rerun it, and a stage must not rerun for code it never imports."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT


def _module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imported_modules(file: Path, module: str) -> set[str]:
    """Project modules ``file`` imports anywhere (function-level imports too), relative imports resolved."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return {m for m in found if m.split(".")[0] == "pipeline"}


def import_closure(module: str) -> set[str]:
    """Every project file that importing ``module`` executes, package ``__init__`` files included."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        parts = pending.pop().split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            file = _module_file(prefix)
            if file is not None and file not in seen:
                seen.add(file)
                pending += _imported_modules(file, prefix)
    return {str(f.relative_to(ROOT)) for f in seen}


def _stages() -> list[tuple[str, str, set[str]]]:
    """(stage, module its cmd runs, project code files among its deps)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    rows = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        command = shlex.split(body["cmd"])
        module = command[command.index("-m") + 1]
        code = {d for d in body["deps"] if d.startswith("pipeline")}
        rows.append((name, module, code))
    return rows


@pytest.mark.parametrize("stage,module,declared", _stages(), ids=[s[0] for s in _stages()])
def test_each_stage_depends_on_exactly_the_code_it_imports(stage, module, declared):
    needed = import_closure(module)
    assert not needed - declared, f"{stage}: dvc.yaml lacks {sorted(needed - declared)}"
    assert not declared - needed, f"{stage}: dvc.yaml declares code it does not import: {sorted(declared - needed)}"


def test_the_closure_sees_function_level_and_transitive_imports():
    closure = import_closure("pipeline.stages.evaluate")
    assert {"pipeline/models/restorer.py", "pipeline/models/composition.py", "pipeline/__init__.py"} <= closure
    assert "pipeline/stages/train_lora.py" not in closure


# The package's layers, lowest first: a module imports its own layer and the ones below, never above.
LAYERS = [
    {"pipeline", "pipeline.files", "pipeline.images", "pipeline.schema", "pipeline.config", "pipeline.tracking"},
    {"pipeline.data"},
    {"pipeline.models"},
    {"pipeline.training"},
    {"pipeline.evaluation"},
    {"pipeline.stages"},
    {"pipeline.cli", "pipeline.restore_cli"},
]


def _layer(module: str) -> int:
    for prefix in (module, module.rpartition(".")[0]):
        for index, members in enumerate(LAYERS):
            if prefix in members:
                return index
    raise KeyError(f"{module} is in no layer: add it to LAYERS")


@pytest.mark.parametrize("file", sorted(p.relative_to(ROOT) for p in (ROOT / "pipeline").rglob("*.py")), ids=str)
def test_no_module_imports_upward(file):
    module = ".".join(file.with_suffix("").parts).removesuffix(".__init__")
    own = _layer(module)
    upward = sorted(m for m in _imported_modules(ROOT / file, module) if _module_file(m) and _layer(m) > own)
    assert not upward, f"{module} (layer {own}) imports {upward} from above"
