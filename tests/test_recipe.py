"""Recipe validation: every broken recipe names the file, the field and what is allowed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgetl.errors import RecipeError
from edgetl.recipe import load_recipe, recipe_json_schema
from tests.conftest import write_recipe

GOOD = """
name: ok
data:
  path: ./images
model:
  backbone: efficientnet_lite0
train:
  epochs: 3
"""


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", GOOD))
    assert recipe.data.path == (tmp_path / "images").resolve()
    assert recipe.train.epochs == 3 and recipe.train.strategy == "linear_probe"


def test_set_overrides_any_field_with_typed_values(tmp_path: Path) -> None:
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", GOOD),
        ["train.epochs=7", "train.lr=0.01", "data.augment=none", "model.weights=w.pth"],
    )
    assert (recipe.train.epochs, recipe.train.lr, recipe.data.augment) == (7, 0.01, "none")
    assert recipe.model.weights == str((tmp_path / "w.pth").resolve())


@pytest.mark.parametrize(
    ("body", "override", "expected"),
    [
        (GOOD.replace("epochs: 3", "epoch: 3"), None, ["train.epoch", "Did you mean `epochs`", "r.yaml"]),
        (GOOD.replace("epochs: 3", "epochs: zero"), None, ["train.epochs", "'zero'"]),
        (GOOD.replace("epochs: 3", "epochs: 0"), None, ["train.epochs", "greater than or equal to 1"]),
        (GOOD.replace("epochs: 3", "strategy: magic"), None, ["train.strategy", "linear_probe", "'magic'"]),
        (GOOD, "data.builtin=digits", ["exactly one of `data.path`"]),
        (GOOD.replace("name: ok\n", ""), None, ["`name` is required"]),
        (GOOD, "train", ["--set 'train'", "section.field=value"]),
        (GOOD, "nonsense.x=1", ["`nonsense` is not a known field", "Allowed here"]),
        ("- a\n- b\n", None, ["must be a YAML mapping"]),
        ("name: [unclosed\n", None, ["not valid YAML"]),
    ],
)
def test_broken_recipes_name_the_culprit(tmp_path: Path, body: str, override: str | None, expected: list[str]) -> None:
    path = write_recipe(tmp_path / "r.yaml", body)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, [override] if override else [])
    for fragment in expected:
        assert fragment in str(error.value)


def test_missing_recipe_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="nope.yaml does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_shipped_recipes_and_sweeps_are_valid() -> None:
    from edgetl.sweep.spec import load_sweep

    recipes = [path for path in Path("recipes").glob("*.yaml") if not path.name.startswith("sweep")]
    sweeps = sorted(Path("recipes").glob("sweep*.yaml"))
    assert len(recipes) >= 5 and len(sweeps) == 2
    for path in recipes:
        assert load_recipe(path).name
    for path in sweeps:
        assert load_sweep(path).sweep.space


def test_schema_lists_the_fields_and_cli_prints_it() -> None:
    schema = recipe_json_schema()
    assert {"name", "seed", "data", "model", "train"} <= set(schema["properties"])
    assert schema["$defs"]["TrainConfig"]["additionalProperties"] is False
    printed = subprocess.run([sys.executable, "-m", "edgetl", "schema"], capture_output=True, text=True, check=True)
    assert json.loads(printed.stdout)["properties"].keys() == schema["properties"].keys()


def test_cli_reports_a_broken_recipe_in_one_paragraph_without_traceback(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", GOOD.replace("epochs: 3", "epochz: 3"))
    done = subprocess.run(
        [sys.executable, "-m", "edgetl", "build", str(path), "-o", str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "train.epochz" in done.stderr and "Traceback" not in done.stderr
