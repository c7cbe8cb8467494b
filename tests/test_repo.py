"""Promises about the repository itself."""
import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    match = re.search(r"```(?:bash|sh)?\n# run the tests\n(.+?)\n```", readme)
    assert match, "README.md must have a fenced block starting with '# run the tests'"
    command = match.group(1).strip()
    assert command in (REPO / ".ci" / "run").read_text()
    assert "torch==2.13.0" in readme and "torch==2.13.0" in (REPO / ".ci" / "run").read_text()


def test_kernels_never_import_igpt():
    for path in (REPO / "igpt_kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            assert not any(n == "igpt" or n.startswith("igpt.") for n in names), f"{path} imports {names}"


def test_the_repository_root_shadows_no_dependency():
    # `python -m` puts the repository root on sys.path: a top-level folder named like a dependency's package (PyPI's
    # `kernels`, which transformers >= 5 imports) would be imported in its place.
    code = "from transformers import ImageGPTForCausalImageModeling; import igpt_kernels, igpt.convert"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
