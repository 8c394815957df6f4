"""The package, tools and configs keep the house line limit of 100 characters.

Checked by a test rather than left to review so that a long line is named (file:line: length)
the moment it lands, not found later in a sweep.
"""

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRS = ("cav_mae_jax", "tools", "configs")
MAX_LENGTH = 100


def _python_files() -> list[str]:
  """Tracked .py files under DIRS, relative to ROOT.

  `git ls-files` where git and a repository are there, so untracked scratch files do not count;
  otherwise (an unpacked archive, no git) every .py file found by walking the directories.
  """
  if shutil.which("git") and os.path.exists(os.path.join(ROOT, ".git")):
    result = subprocess.run(["git", "ls-files", "--", *(f"{d}/*.py" for d in DIRS)], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    if result.returncode == 0:
      return result.stdout.splitlines()
  names = []
  for top in DIRS:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
      dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
      names += [os.path.relpath(os.path.join(dirpath, f), ROOT)
                for f in sorted(filenames) if f.endswith(".py")]
  return names


def test_no_line_is_longer_than_100_characters():
  files = _python_files()
  assert any(name.startswith("cav_mae_jax/") for name in files), files
  offenders = []
  for name in files:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        length = len(line.rstrip("\r\n"))
        if length > MAX_LENGTH:
          offenders.append(f"{name}:{number}: {length}")
  assert not offenders, (f"{len(offenders)} lines longer than {MAX_LENGTH} characters:\n"
                         + "\n".join(offenders))
