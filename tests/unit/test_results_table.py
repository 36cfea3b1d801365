"""The README's Results table (and docs/experiments.md's estimate examples) equal what
scripts/results_table.py generates from the committed result files: a drifted number fails here."""
import shutil
from pathlib import Path

import pytest

from script_files import load

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load("scripts/results_table.py")


def test_readme_results_table_matches_the_files():
    rt = _script()
    readme = (ROOT / "README.md").read_text()
    assert rt.render(readme) == readme, "README.md's Results table drifted: run python scripts/results_table.py"


def test_a_changed_result_file_changes_the_table(tmp_path):
    """The table is computed from the files: edit a number in a copy of them and the README no longer agrees."""
    rt = _script()
    for rel in {getattr(rt, k) for k in dir(rt) if k.isupper() and isinstance(getattr(rt, k), str)
                and "/" in getattr(rt, k)} | {"pyproject.toml"}:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    readme = (ROOT / "README.md").read_text()
    assert rt.render(readme, tmp_path) == readme
    csv_path = tmp_path / rt.SWEEP_CSV
    csv_path.write_text(csv_path.read_text().replace("-0.00964985", "-0.0500000"))
    changed = rt.render(readme, tmp_path)
    assert changed != readme and "-0.0500 to +0.0374 nats for LoRA" in changed
    with pytest.raises(ValueError, match="results:begin"):
        rt.render("no markers here", tmp_path)


@pytest.mark.slow  # reads the embedded model's config (made from the GGUF on a fresh machine)
def test_experiments_estimate_examples_match_the_estimator():
    rt = _script()
    text = (ROOT / "docs" / "experiments.md").read_text()
    assert rt.TARGETS["docs/experiments.md"](text) == text


def test_serving_doc_replica_and_repeat_results_match_the_files():
    """docs/serving.md's two-replica load table and the race/kill repeat count come from their result files."""
    rt = _script()
    text = (ROOT / "docs" / "serving.md").read_text()
    assert rt.TARGETS["docs/serving.md"](text) == text, "docs/serving.md drifted: run python scripts/results_table.py"
