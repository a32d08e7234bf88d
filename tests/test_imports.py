"""The package's shape: no import cycle, no module taking another's private names, the flow deployable by Prefect.

The import graph is read from the source (every `import` and `from ... import`, inside functions too), not
by importing, so a cycle hidden in a function body counts as well.
"""
import ast
from pathlib import Path
import pytest

pytestmark = pytest.mark.quick  # no server, no pipeline run

PKG = Path(__file__).resolve().parent.parent/"fruitflow"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "_modidx"))

def imports(mod: str) -> list[tuple[str, list[str]]]:
    "The fruitflow modules `mod` imports, with the names it takes from each."
    out = []
    for n in ast.walk(ast.parse((PKG/f"{mod}.py").read_text())):
        if isinstance(n, ast.ImportFrom):
            target = n.module if not n.level else f"fruitflow.{n.module}" if n.module else "fruitflow"
            if target == "fruitflow": out += [(a.name, []) for a in n.names if a.name in MODULES]  # from fruitflow import notebooks
            elif target.startswith("fruitflow."): out.append((target.split(".")[1], [a.name for a in n.names]))
        elif isinstance(n, ast.Import):
            out += [(a.name.split(".")[1], []) for a in n.names if a.name.startswith("fruitflow.")]
    return [(m, names) for m, names in out if m in MODULES]

def test_no_import_cycle():
    graph = {m: {t for t, _ in imports(m)} - {m} for m in MODULES}
    def visit(m, path):
        if m in path: pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        for t in sorted(graph[m]): visit(t, path + [m])
    for m in MODULES: visit(m, [])

def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    "The check above finds a cycle when there is one (two modules importing each other inside functions)."
    (tmp_path/"a.py").write_text("def f():\n    from fruitflow.b import g\n")
    (tmp_path/"b.py").write_text("def g():\n    from fruitflow import a\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path)
    monkeypatch.setattr(__import__(__name__), "MODULES", ["a", "b"])
    with pytest.raises(pytest.fail.Exception, match="import cycle: a -> b -> a"): test_no_import_cycle()

def test_no_private_name_taken_from_another_module():
    taken = [(m, t, n) for m in MODULES for t, names in imports(m) for n in names if n.startswith("_")]
    assert not taken, taken

def test_no_private_upstream_names_on_the_default_path():
    "No `_private` name of Prefect, papermill, nbclient, jupyter_client or MLflow is imported by the package."
    upstream = ("prefect", "papermill", "nbclient", "jupyter_client", "mlflow")
    bad = []
    for m in MODULES:
        for n in ast.walk(ast.parse((PKG/f"{m}.py").read_text())):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] in upstream:
                bad += [(m, n.module, a.name) for a in n.names if a.name.startswith("_") or any(p.startswith("_") for p in n.module.split("."))]
    assert not bad, bad

def test_the_flow_is_deployable():
    "The pipeline is a module-level Prefect flow: a deployment of it carries a form of the run options (no server needed to build it)."
    from prefect.utilities.callables import parameter_schema
    from fruitflow.config import Config
    from fruitflow.flow import pipeline
    assert pipeline.to_deployment(name="fruitflow").name == "fruitflow"
    props = parameter_schema(pipeline).properties  # what a deployment of it carries, and the UI draws as a form
    assert set(props) == set(Config.model_fields), set(props) ^ set(Config.model_fields)
    assert props["epochs"]["default"] == 10 and props["model_kind"]["enum"] == ["auto", "small", "lab", "efficientnet"], props["model_kind"]
    assert pipeline.with_options(name="other").name == "other"

def test_the_sweep_is_a_deployable_flow():
    "`fruitflow sweep`'s flow is module-level too: a deployment of it carries the search's settings as its form."
    from fruitflow.sweep import search
    assert search.to_deployment(name="sweep").entrypoint == "fruitflow/sweep.py:search"  # found by path, as `pipeline` is
    props = search.parameters.properties
    assert list(props) == ["cfg"], props

def test_jsonschema_skips_only_the_slow_iri_checker():
    "fruitflow marks `rfc3987_syntax` missing (fruitflow/__init__.py): Prefect's and nbformat's jsonschema still validates, without it."
    import subprocess, sys
    code = ("import sys, jsonschema; print('rfc3987_syntax' in sys.modules and sys.modules['rfc3987_syntax'] is not None);"
            "jsonschema.validate({'a': 1}, {'type': 'object', 'properties': {'a': {'type': 'string'}}})")
    def run(first: str):
        return subprocess.run([sys.executable, "-c", first + code], capture_output=True, text=True, timeout=120)
    upstream = run("")
    assert upstream.stdout.startswith("True"), "jsonschema no longer imports rfc3987_syntax eagerly: fruitflow/__init__.py's line can go"
    ours = run("import fruitflow; ")
    assert ours.stdout.startswith("False") and "ValidationError" in ours.stderr, ours.stdout + ours.stderr  # not loaded; validation still works
