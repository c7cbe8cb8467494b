"""Promises about the repository itself."""
import ast
import re
import shlex
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


def pip_installs(commands: str) -> list[list[str]]:
    """The arguments of each `pip install` in shell text (lines or `&&` chains), without --quiet / -q."""
    installs = []
    for line in commands.splitlines():
        for command in line.split("&&"):
            words = shlex.split(command, comments=True)
            if len(words) > 1 and words[0].endswith("/pip") and words[1] == "install":
                installs.append([w for w in words[2:] if w not in ("--quiet", "-q")])
    return installs


def test_ci_installs_what_the_readme_installs():
    # A fresh clone set up as the README says must get the torch and triton that CI tests (pip takes the newest
    # triton unless told: 3.9 spilled registers in kernels that 3.6 compiled cleanly).
    readme = (REPO / "README.md").read_text()
    match = re.search(r"```bash\n(python3 -m venv \.venv .+?)\n```", readme)
    assert match, "README.md must have a quick-start block starting with 'python3 -m venv .venv'"
    readme_installs = pip_installs(match.group(1))
    assert readme_installs == pip_installs((REPO / ".ci" / "run").read_text())
    assert any("triton==3.6.0" in w for words in readme_installs for w in words), readme_installs


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


def module_imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_model_imports_no_trainer_data_loader_or_speedups():
    imported = module_imports(REPO / "igpt" / "model.py")
    for layer in ("igpt.train", "igpt.data", "igpt.cpu", "igpt.checkpoint"):
        assert not any(n == layer or n.startswith(layer + ".") for n in imported), f"igpt/model.py imports {layer}"
