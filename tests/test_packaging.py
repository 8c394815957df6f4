"""The package's declared requirements: requirements.txt says what pyproject.toml says."""
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_requirements_txt_mirrors_the_projects_dependencies():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    declared = tomllib.load(f)["project"]["dependencies"]
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  assert listed == declared
