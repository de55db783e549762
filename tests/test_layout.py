"""The layout keeps its layers: dvc.yaml names every module a stage imports, no stage imports
another stage, the compute core and the schema import nothing beyond their allowance.

Imports are read statically (every ``import`` in a module, also inside functions), so a lazily
imported module counts: DVC must re-run a stage when any code it can execute changes.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STAGES = tuple(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
OWN = ("pipeline", "gates")


def module_file(name: str) -> Path | None:
    p = REPO / Path(*name.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return None


def imports_of(path: Path, modname: str) -> set[str]:
    """Every module ``path`` imports (absolute names), top-level or inside functions."""
    pkg = modname if path.name == "__init__.py" else modname.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def closure(modname: str) -> dict[str, Path]:
    """The project's own modules ``modname`` can import, directly or not, with their files."""
    seen: dict[str, Path] = {}
    todo = [modname]
    while todo:
        m = todo.pop()
        f = module_file(m)
        if f is None or m in seen:
            continue
        seen[m] = f
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        todo += [i for i in imports_of(f, m) if i.split(".")[0] in OWN]
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_the_import_closure(stage):
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    covered = {str(d) for d in deps}

    def is_covered(rel: str) -> bool:
        return rel in covered or any(rel.startswith(d.rstrip("/") + "/") for d in covered)

    files = {str(f.relative_to(REPO)) for f in closure(f"pipeline.{stage}").values()}
    missing = sorted(f for f in files if not is_covered(f))
    assert not missing, f"dvc.yaml stage {stage} lacks deps on code it imports: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another_stage(stage):
    others = {f"pipeline.{s}" for s in STAGES if s != stage}
    reached = set(closure(f"pipeline.{stage}"))
    assert not reached & others, f"pipeline.{stage} reaches stage module(s) {sorted(reached & others)}"


def _third_party(modname: str) -> set[str]:
    out = set()
    for m, f in closure(modname).items():
        for imp in imports_of(f, m):
            top = imp.split(".")[0]
            if top and top not in OWN and top not in sys.stdlib_module_names and top != "__future__":
                out.add(top)
    return out


def test_core_imports_only_torch_numpy_and_the_schema():
    core = sorted(p.stem for p in (REPO / "pipeline" / "core").glob("*.py"))
    for name in core:
        mod = f"pipeline.core.{name}" if name != "__init__" else "pipeline.core"
        reached = closure(mod)
        outside = sorted(m for m in reached if m.startswith("pipeline.") and not m.startswith("pipeline.core")
                         and m not in ("pipeline.schema", "pipeline.errors"))
        assert not outside, f"{mod} reaches up into {outside}"
        assert _third_party(mod) <= {"numpy", "torch", "torchvision"}, (mod, _third_party(mod))


def test_schema_and_sources_need_no_omegaconf():
    assert _third_party("pipeline.schema") == set()
    assert "omegaconf" not in _third_party("pipeline.data.sources")


def test_gates_are_pure_rules():
    for mod in ("gates.rules", "gates.data_checks"):
        third = _third_party(mod)
        assert third <= {"numpy", "pandas", "scipy"}, (mod, third)
        assert not any(m.startswith(("pipeline.tracking", "pipeline.data")) for m in closure(mod)), mod
