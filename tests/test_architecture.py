"""The layers of docs/architecture.md hold: import-linter's contracts in pyproject.toml, function bodies included."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_import_points_down_the_layers(monkeypatch, capsys):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out


def test_every_module_of_the_package_is_in_a_layer():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layered = {name.strip() for layer in contracts[0]["layers"] for name in layer.split("|")}
    modules = {f"memprof.{p.stem if p.is_file() else p.name}" for p in (ROOT / "memprof").iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert modules - layered == set(), "add these modules to a layer in pyproject.toml"


@pytest.mark.parametrize("module", ["memprof.cli", "memprof.cli_support", "memprof.api"])
def test_the_command_line_starts_without_heavy_imports(module):
    import subprocess
    import sys

    loaded = subprocess.run([sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert {"torch", "transformers", "pandas", "matplotlib"}.isdisjoint(loaded)
