"""The wheel ships the twistd plugin (and nothing that would overwrite Twisted's own files)."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.harness import REPO_ROOT as ROOT
from tests.harness import subprocess_env


def test_wheel_contains_plugin_and_package(tmp_path):
    src = tmp_path / "src"
    # Build from a copy of the tracked files: what a clean clone would build.
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           env=subprocess_env())
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    for name in files.stdout.split():
        if os.path.exists(os.path.join(ROOT, name)):
            os.makedirs(src / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), src / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "-q", "-w", str(tmp_path / "dist"), str(src)],
                            capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("mailsuite-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/mailsuite_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "mailsuite/tap.py" in names and "mailsuite/service.py" in names
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points[0]).decode()
    assert "mailsuite = mailsuite.admin.cli:main" in text
