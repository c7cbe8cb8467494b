"""Promises about the repository itself."""
import ast
import re
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
    for path in (REPO / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            assert not any(n == "igpt" or n.startswith("igpt.") for n in names), f"{path} imports {names}"
