"""Promises about the repository itself."""
import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


def imported_modules(source: str, package: str) -> set[str]:
    """Every module name a source file may import, found statically (nothing runs): `import a.b`, `from a import b`
    (a and a.b), relative imports resolved against `package`, imports inside functions, and importlib.import_module /
    __import__ calls with a constant name."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None)
                   in ("import_module", "__import__"))):
            out.add(node.args[0].value)
    return {name for name in out if name}


def imports_any(names: set[str], modules) -> list[str]:
    return sorted(n for n in names for m in modules if n == m or n.startswith(m + "."))


def package_imports(package: str) -> dict[Path, set[str]]:
    """{source file: the modules it imports} for every file of `package` (subpackages resolve their own imports)."""
    return {path: imported_modules(path.read_text(), ".".join(path.relative_to(REPO).parent.parts))
            for path in sorted((REPO / package).rglob("*.py"))}


# bench/ scripts import each other by their bare names (the script directory is on sys.path)
BENCH_MODULES = ["bench"] + sorted(p.stem for p in (REPO / "bench").glob("*.py"))


def test_the_import_scan_sees_every_form():
    # the layering tests below can only fail if the scan finds imports in every spelling
    source = """
import bench.common
from igpt import train
from .data import Loader
def f():
    from igpt.cpu import apply
    importlib.import_module("igpt.checkpoint")
    __import__("common")
"""
    names = imported_modules(source, "igpt")
    for module in ("bench", "igpt.train", "igpt.data", "igpt.cpu", "igpt.checkpoint", "common"):
        assert imports_any(names, [module]), (module, sorted(names))
    assert not imports_any(imported_modules("from igpt.config import IGPTConfig\nimport igpt_kernels", "igpt"),
                           ["igpt.train", "igpt.data", "bench"])


def test_kernels_never_import_igpt_or_bench():
    forbidden = ["igpt"] + BENCH_MODULES
    for path, names in package_imports("igpt_kernels").items():
        assert not imports_any(names, forbidden), f"{path} imports {imports_any(names, forbidden)}"


def test_igpt_never_imports_bench():
    for path, names in package_imports("igpt").items():
        assert not imports_any(names, BENCH_MODULES), f"{path} imports {imports_any(names, BENCH_MODULES)}"


@pytest.mark.parametrize("module", ["igpt.train", "igpt.data", "igpt.cpu", "igpt.checkpoint"])
def test_the_model_does_not_import(module):
    # igpt/model.py is the readable model: training, data loading, CPU speed-ups and files are applied from outside
    names = imported_modules((REPO / "igpt" / "model.py").read_text(), "igpt")
    assert not imports_any(names, [module]), f"igpt/model.py imports {imports_any(names, [module])}"


def test_the_repository_root_shadows_no_dependency():
    # `python -m` puts the repository root on sys.path: a top-level folder named like a dependency's package (PyPI's
    # `kernels`, which transformers >= 5 imports) would be imported in its place.
    code = "from transformers import ImageGPTForCausalImageModeling; import igpt_kernels, igpt.convert"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_readme_layout_lists_every_module():
    # A newcomer finds each responsibility from the README's Layout: one line per module, and no line for a lost one.
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed, package = set(), None
    for line in block.splitlines():
        if line and not line.startswith(" "):
            package = line.split()[0].rstrip("/")
        elif line.strip():
            listed.add(f"{package}/{line.split()[0]}")
    present = {f"{p.parent.name}/{p.name}" for folder in ("igpt_kernels", "igpt", "bench")
               for p in (REPO / folder).iterdir() if p.suffix in (".py", ".sh") and p.name != "__init__.py"}
    assert listed == present, f"missing from the README: {sorted(present - listed)}; gone: {sorted(listed - present)}"
