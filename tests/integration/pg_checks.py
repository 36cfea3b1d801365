"""What the PostgreSQL race and kill tests check after writers ran: the registry replayed from its
notifications (commit order) equals the database, and the store holds exactly the blobs its rows use, whole."""
from lorakit.adapters.refs import entry_files
from lorakit.adapters.store import verify


def replay(events: list[dict], state: dict[str, dict] | None = None, high: dict[str, int] | None = None):
    """Apply notifications in commit order to {name: {"versions": set, "current": int|None}}, asserting each
    is possible there: an add's number is above every number the name ever had, a rollback names an existing
    version, a removal removes existing versions and leaves the newest current if the current went."""
    state = state if state is not None else {}
    high = high if high is not None else {}
    for e in events:
        s = state.setdefault(e["name"], {"versions": set(), "current": None})
        if e["op"] == "add":
            assert e["version"] > high.get(e["name"], 0), f"version handed out again or out of order: {e}"
            high[e["name"]] = e["version"]
            s["versions"].add(e["version"])
            s["current"] = e["version"]
        elif e["op"] == "rollback":
            assert e["version"] in s["versions"], e
            s["current"] = e["version"]
        elif e["op"] == "remove":
            assert set(e["removed"]) <= s["versions"], (e, s)
            s["versions"] -= set(e["removed"])
            if s["current"] in e["removed"]:
                s["current"] = max(s["versions"]) if s["versions"] else None
            assert e["current"] == s["current"], (e, s)
    return state, high


def db_state(reg) -> dict[str, dict]:
    out = {}
    for r in reg.db.q("SELECT name, version, current FROM versions ORDER BY name, version"):
        s = out.setdefault(r["name"], {"versions": set(), "current": None})
        s["versions"].add(r["version"])
        if r["current"]:
            assert s["current"] is None, f"two current versions of {r['name']}"
            s["current"] = r["version"]
    for name, s in out.items():
        assert s["current"] is not None, f"{name} has versions but none is current"
    return out


def check_store(reg) -> None:
    """Every row's blob is there and hashes to its sha; no other blob and no leftover is in the store."""
    rows = reg.db.q("SELECT name, sha256 FROM versions")
    for r in rows:
        files = entry_files(r["name"])
        verify(reg.store.local_dir(r["sha256"], files), r["sha256"], files)
    assert sorted(reg.store.shas()) == sorted({r["sha256"] for r in rows})
    assert reg.store.leftovers() == []
    counters = {r["name"]: r["next_version"] for r in reg.db.q("SELECT name, next_version FROM adapters")}
    for r in reg.db.q("SELECT name, MAX(version) AS v FROM versions GROUP BY name"):
        assert counters[r["name"]] > r["v"]
