"""docs/variants.md's QLoRA quality table equals what scripts/qlora_table.py generates from the committed result
file, and a changed number in that file changes the table."""
import json
from pathlib import Path

from script_files import load

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load("scripts/qlora_table.py")


def test_doc_table_matches_the_result_file(tmp_path):
    qt = _script()
    text = qt.DOC.read_text()
    assert qt.render(text, qt.table(qt.RESULTS)) == text, "docs/variants.md drifted: python scripts/qlora_table.py --write"
    rows = [json.loads(x) for x in (ROOT / qt.RESULTS).read_text().splitlines() if x.strip()]
    rows[0]["loss"] += 0.5
    (tmp_path / qt.RESULTS).parent.mkdir(parents=True)
    (tmp_path / qt.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert qt.render(text, qt.table(qt.RESULTS, tmp_path)) != text
