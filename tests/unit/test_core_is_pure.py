"""editing_core is pure: no ray, mlflow or deepspeed, statically and at run time; importing
its light packages does no work.

Note on the dynamic check: transformers' `PreTrainedModel.save_pretrained` calls accelerate's
`extract_model_from_parallel`, which imports deepspeed when it is installed, and deepspeed's
autotuner imports mlflow. That is the libraries' doing, not editing_core's, and only the GGUF
conversion path calls save_pretrained; the subprocess below therefore exercises everything
else (imports, tiny models, both editors, evaluate, artifact save/load, load_model from a
directory written without save_pretrained) and asserts that none of the three is imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import editing_core

FORBIDDEN = ("ray", "mlflow", "deepspeed")
CORE = Path(editing_core.__file__).parent


def forbidden_imports(source: str, filename: str = "<string>") -> list[str]:
    """`file:line module` for every import (statement, __import__ or importlib.import_module
    with a literal name) of a forbidden package, including relative-looking absolute ones."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        for name in names:
            if name.split(".")[0] in FORBIDDEN:
                found.append(f"{filename}:{node.lineno} {name}")
    return found


def test_the_checker_catches_every_form():
    snippet = textwrap.dedent(
        """
        import os, ray
        import mlflow.pyfunc as pf
        from deepspeed.ops import adam
        def f():
            import importlib
            importlib.import_module("ray.serve")
            __import__("mlflow")
        from rayleigh import x   # a different package
        from . import ray_helpers  # relative: a module of our own
        """
    )
    assert [hit.split(" ")[1] for hit in forbidden_imports(snippet)] == [
        "ray", "mlflow.pyfunc", "deepspeed.ops", "ray.serve", "mlflow"]


def test_no_module_of_editing_core_imports_ray_mlflow_or_deepspeed():
    files = sorted(CORE.rglob("*.py"))
    assert {"artifacts.py", "evaluate.py", "base.py", "ft_kl.py", "adapter.py", "loading.py", "loaders.py"} <= {
        f.name for f in files}
    hits = [hit for f in files for hit in forbidden_imports(f.read_text(encoding="utf-8"), str(f.relative_to(CORE)))]
    assert hits == []


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=CORE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_using_editing_core_imports_none_of_them(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        import editing_core, editing_core.models, editing_core.data, editing_core.editors
        import editing_core.evaluate, editing_core.artifacts, editing_core.config, editing_core.tokens
        from editing_core.models.tiny import tiny_model
        from editing_core.models import load_model
        from editing_core.editors import make_editor
        from editing_core.evaluate import evaluate
        from editing_core.artifacts import load_artifact
        from editing_core.data import EditRequest
        from safetensors.torch import save_file

        loaded = tiny_model("llama")
        requests = [EditRequest("Alice plays", "chess", locality_prompt="Bob works for", locality_answer="Sega")]
        for method in ("ft", "ft_kl"):
            artifact = make_editor(method, layers=(0,), steps=1).edit(loaded, requests)
        evaluate(loaded, requests, artifact)
        load_artifact(artifact.save({str(tmp_path / 'artifact')!r}))
        directory = {str(tmp_path / 'model')!r}
        loaded.model.config.save_pretrained(directory)
        save_file(loaded.model.state_dict(), directory + "/model.safetensors", metadata={{"format": "pt"}})
        loaded.tokenizer.save_pretrained(directory)
        load_model(directory)
        print(sorted({{m.split(".")[0] for m in sys.modules}} & {set(FORBIDDEN)!r}))
        """
    )
    assert run_python(code).strip().splitlines()[-1] == "[]"


def test_importing_the_light_packages_is_cheap_and_reads_no_files():
    """`import editing_core` (and its config and data packages) imports no torch, transformers
    or datasets and opens no file besides Python modules."""
    code = textwrap.dedent(
        """
        import sys
        opened = []
        sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
        import editing_core
        after_root = {m.split(".")[0] for m in sys.modules}
        import editing_core.config, editing_core.data
        after_data = {m.split(".")[0] for m in sys.modules}
        heavy = {"torch", "transformers", "datasets", "safetensors", "pyarrow", "pandas", "numpy"}
        print(sorted(after_root & (heavy | {"yaml"})))
        print(sorted(after_data & heavy))
        print([f for f in opened if not f.endswith((".py", ".pyc", ".so"))])
        """
    )
    root, data, files = run_python(code).strip().splitlines()[-3:]
    assert root == "[]"
    assert data == "[]"
    assert files == "[]"
