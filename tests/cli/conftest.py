"""A stand-in catalog for CLI tests: a test recipe registered as twins, with built-in configs."""

import textwrap

import pytest

from attune.config import files
from attune.recipes import registry
from attune.recipes.registry import Recipe
from tests.conftest import ASSETS

REPORT_CONFIG = """\
# A config with comments, which `tune cat` must keep.
base: test/_base
message: hello from ${output_dir}
"""

REPORT_BASE = """\
output_dir: /tmp/attune-report
message: base message
model:
  _component_: torch.nn.Linear
  in_features: 4
  out_features: 2
"""


@pytest.fixture
def catalog(tmp_path, monkeypatch):
    """Register ``report_rank_{single_device,distributed}`` and built-in ``test/*`` configs."""
    builtin = tmp_path / "builtin_configs"
    (builtin / "test").mkdir(parents=True)
    (builtin / "test" / "report.yaml").write_text(REPORT_CONFIG)
    (builtin / "test" / "_base.yaml").write_text(REPORT_BASE)
    (builtin / "test" / "other.yaml").write_text(textwrap.dedent("seed: 1\n"))
    monkeypatch.setattr(files, "BUILTIN_CONFIG_DIR", builtin)
    script = str(ASSETS / "report_rank_recipe.py")
    recipes = (
        Recipe("report_rank_single_device", script, ("test/report",)),
        Recipe("report_rank_distributed", script, ("test/report", "test/other")),
    )
    monkeypatch.setattr(registry, "RECIPES", recipes)
    return recipes
