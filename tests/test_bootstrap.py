"""bin/_bootstrap.sh finds a Python ≥ 3.12 by itself, or says what to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _find_python(env: dict) -> subprocess.CompletedProcess:
  script = f"source {ROOT}/bin/_bootstrap.sh && find_python"
  full = {"PATH": "/usr/bin:/bin", "MRCOM_BOOTSTRAP_DEFINE_ONLY": "1", **env}
  return subprocess.run(
    [shutil.which("bash"), "-c", script], env=full, capture_output=True, text=True
  )


def test_uses_mrcom_python_when_given():
  out = _find_python({"MRCOM_PYTHON": sys.executable, "HOME": "/nonexistent"})
  assert out.returncode == 0 and out.stdout.strip() == sys.executable


def test_finds_a_pyenv_version(tmp_path):
  for version in ("3.12.9", "3.12.1", "3.13.0"):  # 3.12 is preferred over newer versions
    versions = tmp_path / "versions" / version / "bin"
    versions.mkdir(parents=True)
    (versions / "python3").symlink_to(sys.executable)
  (tmp_path / "versions" / "3.11.7").mkdir()
  out = _find_python({"PYENV_ROOT": str(tmp_path), "HOME": "/nonexistent"})
  assert out.returncode == 0 and out.stdout.strip().endswith("versions/3.12.9/bin/python3")


def test_says_what_to_install_when_there_is_none(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "python3").write_text("#!/bin/sh\nexit 1\n")  # an interpreter that is too old
  (fake / "python3").chmod(0o755)
  for tool in ("cat", "dirname"):  # the only other commands on PATH
    (fake / tool).symlink_to(shutil.which(tool))
  out = _find_python({"PATH": str(fake), "PYENV_ROOT": str(tmp_path), "HOME": "/nonexistent"})
  assert out.returncode != 0
  assert "needs Python 3.12 or newer" in out.stderr and "pyenv install 3.12" in out.stderr
  bad = _find_python({"MRCOM_PYTHON": "/bin/false", "HOME": "/nonexistent"})
  assert bad.returncode != 0 and "is not a Python >= 3.12" in bad.stderr
