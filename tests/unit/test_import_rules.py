"""The dependency rules (ARCHITECTURE.md), checked: the kernel imports only the standard library,
the import-linter contracts in pyproject.toml hold, and the API process never loads torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_kernel_imports_only_the_standard_library_and_itself():
    files = sorted((ROOT / "server" / "kernel").glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for name in _imported_modules(path):
            top = name.split(".")[0]
            ok = top in sys.stdlib_module_names or top == "__future__" or name.startswith("server.kernel")
            assert ok, f"{path.relative_to(ROOT)} imports {name}"


def test_import_linter_contracts_hold():
    exe = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_the_api_process_never_imports_torch(tmp_path):
    # A fresh interpreter: build the app, run its lifespan with workers=0 (the supervisor starts,
    # spawns nothing), hit a few routes; then list what got imported.
    code = f"""
import json, sys
from fastapi.testclient import TestClient
from server.app import create_app
from server.settings import Settings
app = create_app(Settings(data_dir={str(tmp_path)!r}, workers=0, open_access=True))
with TestClient(app) as c:
    assert c.get("/health").status_code == 200
    assert c.get("/api/v3/models").status_code == 200
    r = c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={{"prompt": "a cat"}})
    assert r.status_code == 200, r.text
heavy = ("torch", "torchvision", "diffusers", "transformers", "pipelines", "preprocessors", "av",
         "PIL", "numpy", "cv2", "onnxruntime", "controlnet_aux", "skimage")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
