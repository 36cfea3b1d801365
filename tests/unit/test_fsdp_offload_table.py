"""docs/distributed.md's 70b memory-model table equals what scripts/fsdp_offload_table.py renders from the committed
result file, and that file equals the memory model as it computes now (lorakit.lab.estimate on the 70b shape)."""
import json
from pathlib import Path

from script_files import load

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load("scripts/fsdp_offload_table.py")


def test_result_file_is_the_current_memory_model_and_the_doc_shows_it(tmp_path):
    ft = _script()
    rows = [json.loads(x) for x in (ROOT / ft.RESULTS).read_text().splitlines() if x.strip()]
    assert rows == ft.compute(), "the memory model changed: python scripts/fsdp_offload_table.py --compute --write"
    text = ft.DOC.read_text()
    assert ft.render(text, ft.table()) == text, "docs/distributed.md drifted: python scripts/fsdp_offload_table.py --write"
    rows[2]["total"] += 2 ** 30
    (tmp_path / ft.RESULTS).parent.mkdir(parents=True)
    (tmp_path / ft.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ft.render(text, ft.table(ft.RESULTS, tmp_path)) != text


def test_offload_moves_the_shards_to_host_memory_and_meets_the_goal():
    """By the memory model's own rules: offloading leaves on the GPU what is not sharded (replicated adapters) and
    the gathered units with their copied-in shards; the sharded bytes go to the host, none are lost."""
    ft = _script()
    by = {(r["batch_per_gpu"], r["offload"], r["adapter_state"]): r for r in ft.compute()}
    plain, off = by[(2, False, "shard")], by[(2, True, "shard")]
    assert (off["weights"], off["grads"], off["optimizer"]) == (0, 0, 0)
    assert off["host"] == plain["weights"] + plain["grads"] + plain["optimizer"]
    assert off["gathered"] == int(plain["gathered"] * 1.5)  # each of 2 units + its 1/2 shard copied in
    assert off["total"] <= ft.GOAL_GIB * 2 ** 30 < plain["total"]
    rep, rep_off = by[(2, False, "replicate")], by[(2, True, "replicate")]
    whole = rep_off["weights"] + rep_off["grads"] + rep_off["optimizer"]  # the adapters, on the GPU either way
    assert whole == rep_off["trainable"] * 2 * 4 and rep_off["host"] == rep["weights"] - rep_off["weights"]
