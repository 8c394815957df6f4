"""The package's declared requirements: requirements.txt says what pyproject.toml says, and
what they hold back stays out."""
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_requirements_txt_mirrors_the_projects_dependencies():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    declared = tomllib.load(f)["project"]["dependencies"]
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  assert listed == declared


def test_ml_dtypes_imports_in_a_small_part_of_a_second():
  # ml_dtypes 0.7.0 spends 0.9 s of CPU in its import (0.6.0: under 0.01 s), paid by every tool
  # and test subprocess that imports JAX; pyproject.toml keeps it below 0.7.
  code = ("import time, numpy\n"
          "start = time.process_time()\n"
          "import ml_dtypes\n"
          "print(time.process_time() - start)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert float(out.stdout) < 0.25, f"import ml_dtypes took {float(out.stdout):.2f} s of CPU"
