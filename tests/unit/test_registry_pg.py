"""The PostgreSQL registry against a real PostgreSQL (a throwaway cluster, tests/pg_cluster.py): the SQLite
registry's invariants (numbers never repeat, one current, rollback, removal, evaluations, bound to one base),
the content-addressed store (one blob per content, written whole, checked on load, collected when unused, a
directory or an fsspec URL), notifications, migration from SQLite and the CLI on a postgresql:// URL."""
import json
import threading
import time

import pytest
import torch

from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.adapters.peft_files import CONFIG_NAME, WEIGHTS_NAME, fingerprint
from lorakit.adapters.registries import open_registry
from lorakit.adapters.registry import IncompatibleAdapter, Registry, UnknownAdapter
from lorakit.adapters.registry_pg import PgRegistry
from lorakit.adapters.store import DirStore
from lorakit.cli.main import main
from lorakit.models import tiny_llama


def _adapter(path, seed=0, hidden=64, model_seed=0, metadata=None):
    m = tiny_llama(seed=model_seed, hidden=hidden)
    torch.manual_seed(seed)
    add_adapter(m, LoraConfig(r=4, targets=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(m, path, metadata=metadata)
    return path


@pytest.fixture
def reg(pg_url, tmp_path):
    r = PgRegistry(pg_url, base_fp=fingerprint(tiny_llama()), base_name="tiny", store=tmp_path / "store")
    yield r
    r.close()


def test_versions_rollback_remove_numbers_never_repeat(tmp_path, reg, pg_url):
    s1, s2 = _adapter(tmp_path / "s1", seed=1), _adapter(tmp_path / "s2", seed=2)
    v1 = reg.add("support", s1, description="first")
    v2 = reg.add("support", s2)
    assert (v1.version, v2.version) == (1, 2) and v2.current and not reg.resolve("support@1").current
    assert (v1.path / WEIGHTS_NAME).read_bytes() == (s1 / WEIGHTS_NAME).read_bytes()
    assert v1.path == reg.store.root / v1.sha256[:2] / v1.sha256  # content-addressed
    assert reg.rollback("support").version == 1
    again = open_registry(pg_url)  # another process's view: the same state, base and store from the database
    assert isinstance(again, PgRegistry) and again.resolve("support").version == 1
    assert again.base_name == "tiny" and again.base_fp["shape_hash"] == fingerprint(tiny_llama())["shape_hash"]
    assert again.store.root == reg.store.root
    assert again.rollback("support", to=2).version == 2
    again.remove("support@2")  # the current one: the newest left becomes current
    assert reg.resolve("support").version == 1 and not v2.path.exists()
    assert reg.add("support", s2).version == 3
    d = reg.describe("support")
    assert (d["description"], d["current_version"], [v["version"] for v in d["versions"]]) == ("first", 3, [1, 3])
    reg.remove("support")
    with pytest.raises(UnknownAdapter, match="support"):
        reg.resolve("support")
    assert reg.store.shas() == []  # no version uses either blob: both collected
    assert reg.add("support", s1).version == 4  # the name's counter stayed
    assert reg.describe("support")["description"] == ""
    with pytest.raises(UnknownAdapter, match="no version 7"):
        reg.rollback("support", to=7)
    with pytest.raises(ValueError, match="no version older"):
        reg.rollback("support")
    with pytest.raises(UnknownAdapter):
        reg.rollback("nope")
    with pytest.raises(UnknownAdapter):
        reg.remove("nope@1")
    again.close()


def test_one_blob_per_content_shared_by_names(tmp_path, reg):
    s1 = _adapter(tmp_path / "s1", seed=1)
    a, b = reg.add("a", s1), reg.add("b", s1)
    assert a.sha256 == b.sha256 and a.path == b.path and reg.store.shas() == [a.sha256]
    assert [v.ref for v in reg.find_sha(a.sha256)] == ["a@1", "b@1"]
    reg.remove("a")
    assert reg.store.shas() == [a.sha256] and reg.live_shas([a.sha256, "0" * 64]) == {a.sha256}
    reg.remove("b@1")
    assert reg.store.shas() == [] and reg.live_shas([a.sha256]) == set()


def test_files_checked_against_their_hash_on_load(tmp_path, reg):
    v = reg.add("a", _adapter(tmp_path / "a"))
    assert reg.local_files(v) == v.path
    (v.path / CONFIG_NAME).write_text((v.path / CONFIG_NAME).read_text().replace('"r": 4', '"r": 4 '))
    with pytest.raises(ValueError, match="do not match their registered content hash"):
        reg.local_files(v)


def test_refusals_and_evals_and_base(tmp_path, reg, pg_url):
    with pytest.raises(IncompatibleAdapter, match="another base"):
        reg.add("wide", _adapter(tmp_path / "w", hidden=32))
    with pytest.raises(ValueError, match="invalid adapter name"):
        reg.add("../etc", _adapter(tmp_path / "g"))
    assert reg.list() == [] and reg.store.shas() == []
    reg.add("e", _adapter(tmp_path / "e", metadata={"metrics": {"loss": 1.5}}))
    reg.add_eval("e@1", {"exact_match": 0.4})
    evals = reg.resolve("e").evals
    assert [e["metrics"] for e in evals] == [{"loss": 1.5}, {"exact_match": 0.4}]
    assert evals[0]["base_shape_hash"] == reg.base_fp["shape_hash"]
    with pytest.raises(ValueError, match="non-empty"):
        reg.add_eval("e", {})
    with pytest.raises(UnknownAdapter):
        reg.add_eval("e@9", {"x": 1})
    with pytest.raises(IncompatibleAdapter, match="belongs to base 'tiny'"):
        PgRegistry(pg_url, base_fp=fingerprint(tiny_llama(hidden=32)), base_name="wide")


def test_new_database_needs_a_store_and_bad_url_is_refused(pg_cluster, tmp_path):
    with pytest.raises(ValueError, match="give --store"):
        PgRegistry(pg_cluster.new_database())
    with pytest.raises(ValueError, match="cannot reach the PostgreSQL registry"):
        PgRegistry(f"postgresql://lorakit:secret@/nodb?host={tmp_path}", store=tmp_path / "s")


def test_skip_if_current_and_leftovers_cleaned_on_open(tmp_path, reg, pg_url):
    s1 = _adapter(tmp_path / "s1", seed=1)
    v = reg.add("k", s1)
    assert reg.add("k", s1, skip_if_current=True).version == 1
    orphan = reg.store.root / "ab" / ("ab" + "0" * 62)  # a blob no row uses (a writer killed before commit)
    orphan.mkdir(parents=True)
    tmp = reg.store.root / f".tmp-{'cd' * 32}-1-2"  # a killed writer's copy in progress
    tmp.mkdir()
    trash = reg.store.root / f".trash-{'ef' * 32}-1-2"  # a killed deleter's
    trash.mkdir()
    again = PgRegistry(pg_url)
    assert not orphan.exists() and not tmp.exists() and not trash.exists() and v.path.exists()
    assert again.store.shas() == [v.sha256]
    again.close()


def test_fsspec_store_through_a_url(pg_cluster, tmp_path):
    pytest.importorskip("fsspec")
    url = pg_cluster.new_database()
    root = tmp_path / "objects"
    cache = tmp_path / "cache"
    import os

    os.environ["LORAKIT_STORE_CACHE"] = str(cache)
    try:
        reg = PgRegistry(url, base_fp=fingerprint(tiny_llama()), base_name="tiny", store=f"file://{root}")
        s1 = _adapter(tmp_path / "s1", seed=1)
        v = reg.add("a", s1)
        blob = root / v.sha256[:2] / v.sha256
        assert sorted(p.name for p in blob.iterdir()) == [".complete", CONFIG_NAME, WEIGHTS_NAME]
        local = reg.local_files(v)  # downloaded into the cache, verified
        assert local == cache / v.sha256 and (local / WEIGHTS_NAME).read_bytes() == (s1 / WEIGHTS_NAME).read_bytes()
        half = root / "ab" / ("ab" * 32)  # a writer killed before its marker: a leftover
        half.mkdir(parents=True)
        (half / CONFIG_NAME).write_text("{}")
        reg.close()
        reg = PgRegistry(url)
        assert reg.store.shas() == [v.sha256] and not half.exists()
        reg.remove("a")
        assert not blob.exists()
        reg.close()
    finally:
        del os.environ["LORAKIT_STORE_CACHE"]


def test_every_change_is_notified_once_committed(tmp_path, reg):
    seen, got = [], threading.Event()

    def on(ev):
        if ev is not None:
            seen.append(ev)
            if len(seen) == 4:
                got.set()
    w = reg.watch(on, tick_s=0.2)
    try:
        s1, s2 = _adapter(tmp_path / "s1", seed=1), _adapter(tmp_path / "s2", seed=2)
        t0 = time.monotonic()
        reg.add("n", s1)
        reg.add("n", s2)
        reg.rollback("n")
        reg.remove("n@2")
        with pytest.raises(ValueError):
            reg.rollback("n")  # refused: nothing committed, nothing notified
        assert got.wait(5), seen
        assert time.monotonic() - t0 < 1.0
        assert [(e["op"], e.get("version"), e["current"]) for e in seen] == [
            ("add", 1, 1), ("add", 2, 2), ("rollback", 1, 1), ("remove", None, 1)]
        assert seen[3]["removed"] == [2] and w.info()["events"] == 4
    finally:
        w.stop()


def test_migrate_from_sqlite_keeps_counters_versions_and_evals(tmp_path, pg_cluster, capsys):
    s1, s2 = _adapter(tmp_path / "s1", seed=1), _adapter(tmp_path / "s2", seed=2)
    old = Registry(tmp_path / "r.sqlite", base_fp=fingerprint(tiny_llama()), base_name="tiny")
    old.add("a", s1, description="alpha")
    old.add("a", s2)
    old.add("a", s1)
    old.remove("a@2")
    old.rollback("a", to=1)
    old.add_eval("a@3", {"acc": 0.5})
    old.add("gone", s2)
    old.remove("gone")  # every version removed: its counter must move too
    old.close()
    url = pg_cluster.new_database()
    assert main(["adapters", "migrate", "--from", str(tmp_path / "r.sqlite"), "--to", url,
                 "--store", str(tmp_path / "store")]) == 0
    assert "migrated 2 names, 2 versions, 1 evaluations" in capsys.readouterr().out
    reg = PgRegistry(url)
    assert [(v.version, v.current) for v in reg.versions("a")] == [(1, True), (3, False)]
    assert reg.describe("a")["description"] == "alpha" and reg.resolve("a@3").evals[0]["metrics"] == {"acc": 0.5}
    assert reg.resolve("a@1").sha256 == reg.resolve("a@3").sha256 and len(reg.store.shas()) == 1
    assert reg.local_files(reg.resolve("a@3")).is_dir()
    assert reg.add("a", s2).version == 4 and reg.add("gone", s1).version == 2
    assert main(["adapters", "migrate", "--from", str(tmp_path / "r.sqlite"), "--to", url]) == 2  # names taken
    assert "already has ['a', 'gone']" in capsys.readouterr().err
    reg.close()


def test_cli_on_a_postgresql_url(tmp_path, pg_cluster, capsys, monkeypatch):
    url = pg_cluster.new_database()
    monkeypatch.setenv("LORAKIT_REGISTRY", url)
    store = str(tmp_path / "store")
    PgRegistry(url, base_fp=fingerprint(tiny_llama()), base_name="tiny", store=store).close()
    a1, a2 = _adapter(tmp_path / "a1", seed=1), _adapter(tmp_path / "a2", seed=2)
    assert main(["adapters", "add", "tone", str(a1)]) == 0
    assert main(["adapters", "add", "tone", str(a2)]) == 0
    assert main(["adapters", "rollback", "tone"]) == 0
    assert main(["adapters", "list", "--json"]) == 0
    out = capsys.readouterr().out
    listed = json.loads(out[out.index("["):])
    assert [(v["name"], v["version"]) for v in listed] == [("tone", 1)]
    assert main(["adapters", "remove", "tone@2", "--registry", url]) == 0
    assert main(["adapters", "show", "nope"]) == 2
    assert "unknown adapter 'nope'" in capsys.readouterr().err
    assert [v.version for v in PgRegistry(url).versions("tone")] == [1]
    assert isinstance(DirStore(store).shas(), list) and len(DirStore(store).shas()) == 1


def test_mixtures_pinned_to_adapter_versions(tmp_path, pg_url):
    from lorakit.adapters.mixtures import add_mixture, read_mixture, resolve_mixture
    from test_mixture_artifact import _mixture

    src = _mixture(tmp_path)
    reg = PgRegistry(pg_url, base_fp=fingerprint(src), base_name="tiny", store=tmp_path / "store")
    reg.add("a", tmp_path / "adapters" / "a")
    reg.add("b", tmp_path / "adapters" / "b")
    v = add_mixture(reg, "ab", tmp_path / "mix")
    assert (v.name, v.version, v.kind, v.config["pinned"]) == ("mix:ab", 1, "mixture", ["a@1", "b@1"])
    mix, ads = resolve_mixture(reg, "mix:ab")
    assert [a.ref for a in ads] == ["a@1", "b@1"] and read_mixture(reg.local_files(mix)).names == ["a", "b"]
    assert add_mixture(reg, "ab", tmp_path / "mix", skip_if_current=True).version == 1
    reg.remove("a@1")
    with pytest.raises(IncompatibleAdapter, match="mix:ab@1 is pinned to adapter a@1, which is gone"):
        resolve_mixture(reg, "mix:ab@1")
    reg.remove("mix:ab")
    assert not v.path.exists() and len(reg.store.shas()) == 1  # b's blob alone
    reg.close()


def test_database_outage_is_a_503_then_everything_reconnects(tmp_path):
    from pg_cluster import Cluster, Unavailable

    from lorakit.adapters.pg import RegistryUnavailable
    from lorakit.serve.resolve import registry_error

    try:
        cluster = Cluster()  # its own: this test stops the server
    except Unavailable as e:
        pytest.skip(str(e))
    try:
        url = cluster.new_database()
        reg = PgRegistry(url, base_fp=fingerprint(tiny_llama()), base_name="tiny", store=tmp_path / "store")
        reg.add("a", _adapter(tmp_path / "a"))
        seen, back = [], threading.Event()
        w = reg.watch(lambda ev: (seen.append(ev), ev and ev["op"] == "resync" and back.set()), tick_s=0.2)
        cluster.stop_server()
        with pytest.raises(RegistryUnavailable, match="PostgreSQL registry") as e:
            reg.resolve("a")
        assert registry_error(e.value).status == 503
        cluster.start_server()
        assert reg.resolve("a").version == 1  # the read connection came back by itself
        assert reg.add("a", _adapter(tmp_path / "a2", seed=2)).version == 2  # and the write connection
        assert back.wait(10) and w.info()["reconnects"] == 1  # the watcher listens again and says so
        w.stop()
        reg.close()
    finally:
        cluster.stop()


def test_without_postgresql_the_tests_are_skipped_naming_what_is_missing(monkeypatch):
    """Where PostgreSQL or psycopg is absent, the cluster says which and how to install it (the pg_cluster
    fixture skips with that reason), before creating anything."""
    import sys

    import pg_cluster

    monkeypatch.setattr(pg_cluster, "_bin", lambda name: None)
    with pytest.raises(pg_cluster.Unavailable, match=r"PostgreSQL is not installed .*install_postgresql\.sh"):
        pg_cluster.Cluster()
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    with pytest.raises(pg_cluster.Unavailable, match=r"psycopg is not installed \(pip install 'lorakit\[postgres\]'\)"):
        pg_cluster.Cluster()
