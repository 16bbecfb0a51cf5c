"""The architecture as tests: which package may import which, and what stays torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = REPO / "deployments"
# The engine side: pure model code and the types it speaks, no serving framework.
ENGINE_FILES = sorted(
    [*(DEPLOYMENTS / "engine").glob("*.py"), DEPLOYMENTS / "protocol.py", DEPLOYMENTS / "errors.py"]
)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_quantization_never_imports_deployments() -> None:
    for path in (REPO / "quantization").glob("*.py"):
        bad = {m for m in imported_modules(path) if m.split(".")[0] == "deployments"}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_engine_package_holds_the_model_code() -> None:
    names = {p.stem for p in ENGINE_FILES}
    assert {"scheduler", "model_runner", "sampling", "text_stream", "interface"} <= names


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_engine_side_imports_no_ray_gateway_or_model_server(path: Path) -> None:
    forbidden_roots = {"ray", "fastapi", "starlette"}
    forbidden = ("deployments.gateway", "deployments.model_server", "deployments.app")
    bad = {
        m
        for m in imported_modules(path)
        if m.split(".")[0] in forbidden_roots or m.startswith(forbidden)
    }
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_gateway_never_imports_the_engine() -> None:
    for path in (DEPLOYMENTS / "gateway").glob("*.py"):
        bad = {m for m in imported_modules(path) if m.startswith("deployments.engine")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def loads_torch(code: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print('torch' in sys.modules)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1] == "True"


def test_router_and_protocol_load_no_torch_in_a_fresh_interpreter() -> None:
    assert not loads_torch("import deployments.gateway.router, deployments.protocol")


def test_admin_commands_load_no_torch() -> None:
    assert not loads_torch(
        "from awq_serve_cli.main import main\n"
        "try:\n    main(['rollback', '--help'])\nexcept SystemExit:\n    pass"
    )
