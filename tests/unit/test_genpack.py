"""A network generation end to end without a network: control/genpack.py packs
a validated network config with its list files inside (fixed names, hashed),
check_payload and unpack refuse whatever a sender could get wrong, the control
plane's GenerationStore keeps payloads, the agent's NetworkState stages and
commits them, and agent/netgen.py's render makes one DC's share of them."""

from __future__ import annotations

import copy
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError, Service, Steering, SteeringDc
from agent.l7.config import ServeConfig, parse_serve_config
from agent.netgen import Identity, NetworkState, Staged, render
from control.generations import GenerationStore, open_payload
from control.genpack import MAX_GENERATION, check_payload, content_hash, pack, unpack
from control.network import load_network
from control.render import dc_view, key_here, prefix_table

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "network.yaml"

DROP = "# reputation list\n192.0.2.0/24\n2001:db8:bad::/48\n"
EXTRA = "198.51.100.128/25\n"
OK = "# partners\n100.64.0.0/10\n"

GEO_EU = {"name": "vault", "hostnames": ["vault.example.com"],
          "key_policy": {"mode": "geo", "regions": ["eu"]}}
KEYLESS = {"name": "bank", "hostnames": ["bank.example.com"],
           "key_policy": {"mode": "keyless", "keyserver": "https://keys.example.com"}}


def example() -> dict:
    """examples/network.yaml: regions eu and us; dus, fra (eu), iad (us);
    zones www (global) and shop-eu (regional eu, key geo [eu])."""
    return yaml.safe_load(EXAMPLE.read_text())


def write_config(tmp_path: Path, doc: dict | None = None) -> Path:
    """The example with a relative and an absolute deny file and a relative
    allow file (beside their inline prefixes), written under tmp_path."""
    cfg = tmp_path / "cfg"
    elsewhere = tmp_path / "elsewhere"
    cfg.mkdir(exist_ok=True)
    elsewhere.mkdir(exist_ok=True)
    (cfg / "drop.txt").write_text(DROP)
    (elsewhere / "extra.txt").write_text(EXTRA)
    (cfg / "ok.txt").write_text(OK)
    if doc is None:
        doc = example()
        doc["deny"]["files"] = ["drop.txt", str(elsewhere / "extra.txt")]
        doc["allow"]["files"] = ["ok.txt"]
    path = cfg / "network.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def rehashed(payload: dict) -> dict:
    """The payload with its sha256 made right again after a change to doc or
    files, so that a refusal is for the change and not for the hash."""
    return {**payload, "sha256": content_hash(payload["doc"], payload["files"])}


def small_payload(number: int, deny: list[str] | None = None) -> dict:
    """A minimal valid generation, inline prefixes only."""
    doc = {"regions": ["eu"],
           "dcs": {"dus": {"region": "eu", "backbone": "198.18.0.1",
                           "public": ["203.0.113.1"]}},
           "zones": [{"name": "www", "hostnames": ["www.example.com"]}],
           "deny": {"prefixes": deny or []}}
    return {"number": number, "sha256": content_hash(doc, {}), "doc": doc, "files": {}}


# --- pack ---------------------------------------------------------------------


def test_pack_carries_each_list_file_under_a_fixed_name(tmp_path: Path) -> None:
    """Relative and absolute list files alike travel inside the payload, their
    text exact, and the doc names them by the names the packer chose: the
    agent never reads a path the sender picked."""
    path = write_config(tmp_path)
    before = path.read_text()
    payload, net = pack(path, 7)
    assert payload["number"] == 7
    assert payload["files"] == {"lists/deny-0.txt": DROP, "lists/deny-1.txt": EXTRA,
                                "lists/allow-0.txt": OK}
    assert payload["doc"]["deny"]["files"] == ["lists/deny-0.txt", "lists/deny-1.txt"]
    assert payload["doc"]["allow"]["files"] == ["lists/allow-0.txt"]
    assert payload["doc"]["deny"]["prefixes"] == example()["deny"]["prefixes"]
    assert payload["sha256"] == content_hash(payload["doc"], payload["files"])
    assert len(payload["sha256"]) == 64
    assert json.loads(json.dumps(payload)) == payload          # plain JSON, as sent
    assert net == load_network(path)                            # the config as validated
    assert path.read_text() == before                           # the source is not rewritten


def test_pack_without_list_files_carries_none(tmp_path: Path) -> None:
    """No list file: no files and the doc's lists as they were."""
    path = write_config(tmp_path, example())
    payload, _ = pack(path, 1)
    assert payload["files"] == {}
    assert "files" not in payload["doc"]["deny"]
    assert payload["doc"]["deny"] == example()["deny"]


def test_the_hash_covers_doc_and_files() -> None:
    """One changed byte in either changes the hash; key order does not."""
    doc, files = {"a": 1, "b": [1, 2]}, {"lists/deny-0.txt": "192.0.2.0/24\n"}
    h = content_hash(doc, files)
    assert content_hash({"b": [1, 2], "a": 1}, files) == h
    assert content_hash({"a": 2, "b": [1, 2]}, files) != h
    assert content_hash(doc, {"lists/deny-0.txt": "192.0.2.0/25\n"}) != h
    assert content_hash(doc, {"lists/deny-1.txt": "192.0.2.0/24\n"}) != h


def test_pack_refuses_a_bad_line_in_a_list_file(tmp_path: Path) -> None:
    """The control plane validates before packing: the error names the list
    entry, the file and the bad line."""
    path = write_config(tmp_path)
    (path.parent / "drop.txt").write_text("192.0.2.0/24\nnot-a-prefix\n")
    with pytest.raises(ConfigError,
                       match=r"deny\.files\[0\]: 'drop\.txt': (.|\n)*drop\.txt:2: ") as e:
        pack(path, 1)
    assert str(e.value).startswith(f"{path}:")


def test_pack_refuses_a_missing_absolute_list_file(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    (tmp_path / "elsewhere" / "extra.txt").unlink()
    with pytest.raises(ConfigError, match=r"deny\.files\[1\]: '.*extra\.txt': .*cannot read"):
        pack(path, 1)


def test_pack_refuses_a_zone_in_an_undefined_region(tmp_path: Path) -> None:
    doc = example()
    doc["zones"][1]["region"] = "apac"
    path = write_config(tmp_path, doc)
    with pytest.raises(ConfigError, match=r"zones\[1\]\.region: 'apac': not a defined region"):
        pack(path, 1)


# --- unpack -------------------------------------------------------------------


def test_unpack_gives_back_the_config_that_was_packed(tmp_path: Path) -> None:
    """Unpacked (after a trip through JSON) it is the same network: same DCs,
    zones, lists, rules; the list files written under the generation's own
    directory with the text they had."""
    path = write_config(tmp_path)
    payload, net = pack(path, 3)
    directory = tmp_path / "gen"
    gen = unpack(json.loads(json.dumps(payload)), directory)
    assert (gen.number, gen.sha256) == (3, payload["sha256"])
    assert gen.payload == payload
    for name, text in payload["files"].items():
        assert (directory / name).read_text() == text
    assert sorted(p.name for p in (directory / "lists").iterdir()) == [
        "allow-0.txt", "deny-0.txt", "deny-1.txt"]
    original = load_network(path)
    assert net == original
    assert gen.net.zones == original.zones and gen.net.dcs == original.dcs
    assert (gen.net.l4_rules, gen.net.limits) == (original.l4_rules, original.limits)
    for dc in original.dcs:
        after, before = dc_view(gen.net, dc, directory), dc_view(original, dc, path.parent)
        assert len(after.deny) == len(before.deny) == 2 + 2 + 1
        assert len(after.allow) == len(before.allow) == 1 + 1
        assert after.deny.changes(before.deny) == (0, 0)
        assert after.allow.changes(before.allow) == (0, 0)
        assert (after.zones, after.keys, after.steering) == \
            (before.zones, before.keys, before.steering)


def test_open_payload_unpacks_in_a_directory_that_close_removes(tmp_path: Path) -> None:
    payload, _ = pack(write_config(tmp_path), 1)
    opened = open_payload(payload)
    base = opened.base
    assert (base / "lists" / "deny-0.txt").read_text() == DROP
    assert len(dc_view(opened.generation.net, "dus", base).deny) == 5
    opened.close()
    assert not base.exists()


# --- check_payload ------------------------------------------------------------


def _with(key: str, value: object) -> Callable[[dict], object]:
    def change(p: dict) -> object:
        return {**p, key: value}
    return change


def _rename_file(name: str) -> Callable[[dict], object]:
    """Carry the deny file under `name` (doc and hash kept consistent)."""
    def change(p: dict) -> object:
        p = copy.deepcopy(p)
        p["files"][name] = p["files"].pop("lists/deny-0.txt")
        p["doc"]["deny"]["files"][0] = name
        return rehashed(p)
    return change


def _flip_byte(p: dict) -> object:
    p = copy.deepcopy(p)
    text = p["files"]["lists/deny-0.txt"]
    i = text.index("192.0.2.0")
    p["files"]["lists/deny-0.txt"] = text[:i] + "193" + text[i + 3:]   # "2" -> "3": one byte
    return p


def _change_doc(p: dict) -> object:
    p = copy.deepcopy(p)
    p["doc"]["limits"]["syn"]["pps"] = 100000
    return p


REFUSED = [
    ("not a dict", lambda p: [p], r"^generation: not a JSON object$"),
    ("no number", lambda p: {k: v for k, v in p.items() if k != "number"},
     r"generation: number: None: a whole number from 1"),
    ("number 0", _with("number", 0), r"generation: number: 0: a whole number from 1"),
    ("number -1", _with("number", -1), r"generation: number: -1: a whole number from 1"),
    ("number True", _with("number", True), r"generation: number: True: a whole number"),
    ("number '3'", _with("number", "3"), r"generation: number: '3': a whole number"),
    ("number 3.0", _with("number", 3.0), r"generation: number: 3\.0: a whole number"),
    ("number 2**53", _with("number", 2**53), rf"generation: number: {2**53}: a whole number"),
    ("doc a list", _with("doc", []), r"generation: doc: the network config, a JSON object"),
    ("doc missing", lambda p: {k: v for k, v in p.items() if k != "doc"},
     r"generation: doc: the network config"),
    ("files a list", _with("files", ["lists/deny-0.txt"]),
     r"generation: files: an object of file name -> text"),
    ("files with a number as text", _with("files", {"lists/deny-0.txt": 5}),
     r"generation: files: an object of file name -> text"),
    ("files with a number as name", _with("files", {0: "192.0.2.0/24\n"}),
     r"generation: files: an object of file name -> text"),
    ("a file name climbing out", _rename_file("../etc/passwd"),
     r"generation: files: '\.\./etc/passwd': names are lists/deny-N\.txt or lists/allow-N\.txt"),
    ("a file name of no kind", _rename_file("lists/x.txt"),
     r"generation: files: 'lists/x\.txt': names are lists/deny-N\.txt"),
    ("an absolute file name", _rename_file("/abs"),
     r"generation: files: '/abs': names are lists/deny-N\.txt"),
    ("a dotted file name", _rename_file("lists/../lists/deny-0.txt"),
     r"generation: files: 'lists/\.\./lists/deny-0\.txt': names are"),
    ("a file name in a subdirectory", _rename_file("lists/a/deny-0.txt"),
     r"generation: files: 'lists/a/deny-0\.txt': names are"),
    ("one byte of a file changed", _flip_byte,
     r"generation 1: sha256 '[0-9a-f]{64}' is not the hash of its doc and files"),
    ("the doc changed", _change_doc, r"generation 1: sha256 '[0-9a-f]{64}' is not the hash"),
    ("no sha256", lambda p: {k: v for k, v in p.items() if k != "sha256"},
     r"generation 1: sha256 None is not the hash"),
    ("sha256 not a string", _with("sha256", 5), r"generation 1: sha256 5 is not the hash"),
]


@pytest.mark.parametrize(("what", "change", "why"), REFUSED, ids=[c[0] for c in REFUSED])
def test_check_payload_refuses_naming_the_problem(what: str, change: Callable[[dict], object],
                                                  why: str, tmp_path: Path) -> None:
    """Every shape a sender could get wrong is a ConfigError naming it, and
    unpack then writes nothing at all."""
    payload, _ = pack(write_config(tmp_path), 1)
    bad = change(payload)
    with pytest.raises(ConfigError, match=why):
        check_payload(bad)
    directory = tmp_path / "gen"
    directory.mkdir()
    with pytest.raises(ConfigError, match=why):
        unpack(bad, directory)
    assert list(directory.iterdir()) == []
    assert check_payload(payload)[:2] == (1, payload["sha256"])   # the original is fine


def test_check_payload_takes_the_largest_exact_number() -> None:
    payload = {**small_payload(1), "number": MAX_GENERATION}
    assert check_payload(payload)[0] == MAX_GENERATION == 2**53 - 1


@pytest.mark.parametrize("named", ["lists/deny-5.txt", "lists/allow-1.txt", "lists/allow-0.txt",
                                   "/etc/hosts", "drop.txt"])
def test_unpack_refuses_a_doc_naming_a_file_not_carried(named: str, tmp_path: Path) -> None:
    """The doc may only name list files that travel with it (so never a path
    on the agent), and nothing is written when it names another."""
    payload, _ = pack(write_config(tmp_path), 1)
    payload = copy.deepcopy(payload)
    payload["doc"]["deny"]["files"].append(named)
    payload = rehashed(payload)
    check_payload(payload)                          # the shape itself is fine
    directory = tmp_path / "gen"
    directory.mkdir()
    with pytest.raises(ConfigError, match=r"generation 1: deny\.files: .*: not a deny list "
                                          r"file the generation carries"):
        unpack(payload, directory)
    assert list(directory.iterdir()) == []


def test_unpack_validates_the_carried_lists_again(tmp_path: Path) -> None:
    """The agent trusts no sender to have checked: a bad line in a carried
    file is refused, naming the entry and the line."""
    payload, _ = pack(write_config(tmp_path), 4)
    payload = copy.deepcopy(payload)
    payload["files"]["lists/deny-1.txt"] = "192.0.2.0/24\n192.0.2.300/32\n"
    with pytest.raises(ConfigError, match=r"generation 4: deny\.files\[1\]: 'lists/deny-1\.txt': "
                                          r"(.|\n)*deny-1\.txt:2: "):
        unpack(rehashed(payload), tmp_path / "gen")


def test_unpack_validates_the_doc_again(tmp_path: Path) -> None:
    payload, _ = pack(write_config(tmp_path), 4)
    payload = copy.deepcopy(payload)
    payload["doc"]["zones"][1]["region"] = "apac"
    with pytest.raises(ConfigError, match=r"generation 4: zones\[1\]\.region: 'apac': "
                                          r"not a defined region"):
        unpack(rehashed(payload), tmp_path / "gen")


@pytest.mark.parametrize("deny", [["192.0.2.0/24"], {"files": [["x"]]}, {"files": "x"}])
def test_unpack_refuses_a_malformed_list_section_with_config_error(deny: object,
                                                                   tmp_path: Path) -> None:
    payload = copy.deepcopy(small_payload(1))
    payload["doc"]["deny"] = deny
    with pytest.raises(ConfigError):
        unpack(rehashed(payload), tmp_path)


def test_check_payload_refuses_a_file_name_ending_in_a_newline() -> None:
    payload = copy.deepcopy(small_payload(1))
    payload["files"] = {"lists/deny-0.txt\n": "192.0.2.0/24\n"}
    with pytest.raises(ConfigError, match=r"generation: files: "):
        check_payload(rehashed(payload))


# --- GenerationStore ----------------------------------------------------------


def test_an_empty_store_has_nothing(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path / "store")
    assert store.numbers() == []
    assert store.current_number() is None
    assert store.current() is None
    assert store.next_number() == 1
    assert not (tmp_path / "store").exists()       # looking creates nothing


def test_the_store_keeps_every_generation_and_the_current_one(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path / "store")
    one, two = small_payload(1), small_payload(2, ["192.0.2.0/24"])
    store.save(one)
    assert (store.numbers(), store.current_number(), store.next_number()) == ([1], 1, 2)
    store.save(two)
    assert store.numbers() == [1, 2]
    assert store.current_number() == 2
    assert store.next_number() == 3
    assert store.current() == two
    assert store.get(1) == one
    assert GenerationStore(tmp_path / "store").current() == two    # survives a restart
    for name in ("1.json", "2.json", "current"):
        assert stat.S_IMODE((tmp_path / "store" / name).stat().st_mode) == 0o600, name
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "1.json", "2.json", "current"]                  # no temporary file left


def test_a_number_is_saved_once(tmp_path: Path) -> None:
    """Saving a number again is refused, and the current one stays."""
    store = GenerationStore(tmp_path / "store")
    store.save(small_payload(1))
    store.save(small_payload(2))
    with pytest.raises(ConfigError, match=r"generation 1 exists already in .*store"):
        store.save(small_payload(1, ["192.0.2.0/24"]))
    assert store.current_number() == 2
    assert store.get(1) == small_payload(1)


def test_the_store_refuses_an_invalid_payload(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path / "store")
    bad = {**small_payload(1), "sha256": "0" * 64}
    with pytest.raises(ConfigError, match=r"generation 1: sha256 '0{64}' is not the hash"):
        store.save(bad)
    assert store.numbers() == [] and store.current_number() is None


def test_a_stored_generation_edited_on_disk_is_refused(tmp_path: Path) -> None:
    """get() checks the hash again: one file's text changed in N.json makes
    that generation (and current(), if it is the current one) an error."""
    payload, _ = pack(write_config(tmp_path), 1)
    store = GenerationStore(tmp_path / "store")
    store.save(payload)
    path = tmp_path / "store" / "1.json"
    stored = json.loads(path.read_text())
    stored["files"]["lists/deny-0.txt"] = stored["files"]["lists/deny-0.txt"].replace(
        "192.0.2.0/24", "192.0.2.0/25")
    path.write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match=r"generation 1: sha256 .* is not the hash"):
        store.get(1)
    with pytest.raises(ConfigError):
        store.current()


def test_a_stored_generation_that_does_not_load_is_refused(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path / "store")
    store.save(small_payload(1))
    (tmp_path / "store" / "1.json").write_text('{"number": 1,')
    with pytest.raises(ConfigError, match=r"1\.json: generation 1 does not load"):
        store.get(1)
    with pytest.raises(ConfigError, match=r"2\.json: generation 2 does not load"):
        store.get(2)


def test_a_current_file_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path / "store")
    store.save(small_payload(1))
    (tmp_path / "store" / "current").write_text("one\n")
    with pytest.raises(ConfigError, match=r"current: 'one' is not a generation number"):
        store.current_number()


# --- NetworkState -------------------------------------------------------------


def staging_dirs(directory: Path) -> list[Path]:
    return sorted(directory.glob("staging-*"))


def test_stage_then_commit_makes_it_current(tmp_path: Path) -> None:
    payload, _ = pack(write_config(tmp_path), 1)
    state = NetworkState(tmp_path / "state")
    assert state.current() is None
    staged = state.stage(payload)
    assert staged.directory.name.startswith("staging-")
    assert (staged.directory / "lists" / "deny-0.txt").read_text() == DROP
    assert state.current() is None                      # staged is not yet current
    committed = state.commit(staged)
    assert committed.directory == tmp_path / "state" / "gen-1"
    assert os.readlink(tmp_path / "state" / "current") == "gen-1"
    assert staging_dirs(tmp_path / "state") == []
    current = NetworkState(tmp_path / "state").current()    # as after a restart
    assert current is not None
    assert (current.number, current.generation.sha256) == (1, payload["sha256"])
    assert current.generation.payload == payload
    assert current.generation.net == committed.generation.net
    assert json.loads((committed.directory / "payload.json").read_text()) == payload
    assert (committed.directory / "lists" / "deny-1.txt").read_text() == EXTRA


def test_commit_keeps_the_current_generation_and_the_one_before(tmp_path: Path) -> None:
    state = NetworkState(tmp_path / "state")
    for n in (1, 2, 3):
        state.commit(state.stage(small_payload(n)))
    assert sorted(p.name for p in (tmp_path / "state").glob("gen-*")) == ["gen-2", "gen-3"]
    assert os.readlink(tmp_path / "state" / "current") == "gen-3"
    current = state.current()
    assert current is not None and current.number == 3
    assert current.generation.sha256 == small_payload(3)["sha256"]


def test_discard_removes_a_staged_generation(tmp_path: Path) -> None:
    state = NetworkState(tmp_path / "state")
    state.commit(state.stage(small_payload(1)))
    staged = state.stage(small_payload(2))
    state.discard(staged)
    assert staging_dirs(tmp_path / "state") == []
    current = state.current()
    assert current is not None and current.number == 1


def _bad_zone_region(p: dict) -> dict:
    p = copy.deepcopy(p)
    p["doc"]["zones"][1]["region"] = "apac"
    return rehashed(p)


def _bad_list_line(p: dict) -> dict:
    p = copy.deepcopy(p)
    p["files"]["lists/deny-0.txt"] = "not-a-prefix\n"
    return rehashed(p)


@pytest.mark.parametrize(("change", "why"), [
    (_flip_byte, r"sha256 .* is not the hash"),
    (_bad_zone_region, r"zones\[1\]\.region: 'apac'"),
    (_bad_list_line, r"deny\.files\[0\]: 'lists/deny-0\.txt'"),
], ids=["altered", "zone in an undefined region", "bad list line (files written)"])
def test_stage_refuses_an_invalid_generation_and_leaves_nothing(
        change: Callable[[dict], object], why: str, tmp_path: Path) -> None:
    """A refused generation leaves no staging directory and the current one in force."""
    payload, _ = pack(write_config(tmp_path), 2)
    state = NetworkState(tmp_path / "state")
    state.commit(state.stage(small_payload(1)))
    with pytest.raises(ConfigError, match=why):
        state.stage(change(payload))
    assert staging_dirs(tmp_path / "state") == []
    current = state.current()
    assert current is not None and current.number == 1


def test_a_corrupt_stored_generation_is_an_error_not_none(tmp_path: Path) -> None:
    """An agent must not start with an empty rule set because its stored
    generation does not read: current() raises."""
    state = NetworkState(tmp_path / "state")
    committed = state.commit(state.stage(small_payload(1)))
    (committed.directory / "payload.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"stored generation .*gen-1"):
        state.current()
    (committed.directory / "payload.json").unlink()
    with pytest.raises(ConfigError, match=r"stored generation .*gen-1"):
        state.current()


def test_an_altered_stored_generation_is_an_error(tmp_path: Path) -> None:
    state = NetworkState(tmp_path / "state")
    committed = state.commit(state.stage(small_payload(1)))
    altered = {**small_payload(1), "doc": small_payload(1, ["192.0.2.0/24"])["doc"]}
    (committed.directory / "payload.json").write_text(json.dumps(altered))
    with pytest.raises(ConfigError, match=r"generation 1: sha256 .* is not the hash"):
        state.current()


def test_a_current_link_to_a_missing_generation_is_an_error(tmp_path: Path) -> None:
    import shutil

    state = NetworkState(tmp_path / "state")
    committed = state.commit(state.stage(small_payload(1)))
    shutil.rmtree(committed.directory)
    with pytest.raises(ConfigError):
        state.current()


# --- render -------------------------------------------------------------------


def render_config(tmp_path: Path) -> Path:
    """The example plus a global zone whose key stays in the EU and a keyless
    one, with list files."""
    doc = example()
    doc["zones"] += [copy.deepcopy(GEO_EU), copy.deepcopy(KEYLESS)]
    doc["deny"]["files"] = ["drop.txt", str(tmp_path / "elsewhere" / "extra.txt")]
    doc["allow"]["files"] = ["ok.txt"]
    return write_config(tmp_path, doc)


@pytest.fixture
def staged(tmp_path: Path) -> Staged:
    payload, _ = pack(render_config(tmp_path), 5)
    return NetworkState(tmp_path / "state").stage(payload)


def serve_local(dc: str, region: str) -> ServeConfig:
    """The machine's own front-end settings; the network replaces its zones.
    render does not load certificates, so the directory need not exist."""
    return parse_serve_config({"dc": dc, "region": region, "listen": ["127.0.0.1"], "port": 0,
                               "certs": "/nonexistent",
                               "zones": [{"name": "local", "hostnames": ["local.example"]}]})


def test_render_for_a_us_dc_leaves_out_zones_whose_key_may_not_be_there(staged: Staged) -> None:
    """iad serves www, keeps shop-eu in the list (the guard refuses another
    region's regional zone by region), and leaves out the geo-[eu] zone and
    the keyless one: it would terminate their TLS but may not hold their key."""
    r = render(staged, Identity("iad", "us", "198.18.0.3"), serve_local("iad", "us"))
    assert (r.number, r.sha256) == (5, staged.generation.sha256)
    assert r.serve is not None
    assert [z.name for z in r.serve.zones] == ["www", "shop-eu"]
    assert r.left_out == ("vault", "bank")
    assert (r.serve.dc, r.serve.region, r.serve.listen, r.serve.port, r.serve.certs) == \
        ("iad", "us", ("127.0.0.1",), 0, "/nonexistent")
    shop = r.serve.zone("shop-eu")
    assert shop.region == "eu" and shop.regional
    assert r.serve.zone("www").rate_limits[0].name == "search"   # the zone whole, as configured
    assert not key_here(staged.generation.net.zones[2], "us")


def test_render_for_an_eu_dc_serves_the_geo_eu_zone(staged: Staged) -> None:
    r = render(staged, Identity("dus", "eu", "198.18.0.1"), serve_local("dus", "eu"))
    assert r.serve is not None
    assert [z.name for z in r.serve.zones] == ["www", "shop-eu", "vault"]
    assert r.left_out == ("bank",)


def test_render_without_a_front_end_renders_only_the_share(staged: Staged) -> None:
    r = render(staged, Identity("fra", "eu", None), None)
    assert r.serve is None and r.left_out == ()
    assert len(r.share.deny) == 5


def test_render_refuses_a_front_end_left_with_no_zone(tmp_path: Path) -> None:
    doc = example()
    doc["zones"] = [copy.deepcopy(KEYLESS)]
    payload, _ = pack(write_config(tmp_path, doc), 2)
    staged = NetworkState(tmp_path / "state").stage(payload)
    with pytest.raises(ConfigError, match=r"generation 2 leaves iad's front end no zone"):
        render(staged, Identity("iad", "us", None), serve_local("iad", "us"))
    assert render(staged, Identity("iad", "us", None), None).serve is None


def test_the_share_is_the_networks_lists_rules_and_steering(staged: Staged) -> None:
    net = staged.generation.net
    r = render(staged, Identity("iad", "us", "198.18.0.3"), None)
    share = r.share
    assert len(share.deny) == len(prefix_table(net.deny, staged.directory)) == 2 + 2 + 1
    assert len(share.allow) == len(prefix_table(net.allow, staged.directory)) == 1 + 1
    assert share.deny.changes(dc_view(net, "iad", staged.directory).deny) == (0, 0)
    assert (share.l4_rules, share.limits) == (net.l4_rules, net.limits)
    assert share.limits.syn.pps == 200
    assert share.dcs == (SteeringDc(name="dus", region="eu", backbone="198.18.0.1"),
                         SteeringDc(name="fra", region="eu", backbone="198.18.0.2"),
                         SteeringDc(name="iad", region="us", backbone="198.18.0.3"))
    # the regional zone's dedicated addresses only: www's are no service
    assert {(s.address, s.region, s.zone) for s in share.services} == {
        (a, "eu", "shop-eu") for a in net.zones[1].addresses}
    assert len(share.services) == 2
    assert not {s.address for s in share.services} & set(net.zones[0].addresses)


@pytest.mark.parametrize(("me", "why"), [
    (Identity("lax", "us", None),
     r"generation 5 has no DC 'lax' \(it has dus, fra, iad\); this agent is lax"),
    (Identity("dus", "us", None),
     r"generation 5 puts dus in region eu; this agent's configs say us"),
    (Identity("dus", "eu", "198.18.0.9"),
     r"generation 5 gives dus the backbone address 198\.18\.0\.1; this agent's is 198\.18\.0\.9"),
], ids=["unknown DC", "other region", "other backbone"])
def test_render_refuses_another_dcs_identity(me: Identity, why: str, staged: Staged) -> None:
    with pytest.raises(ConfigError, match=why):
        render(staged, me, serve_local(me.dc, me.region))


def local_steering(dc: str = "iad", region: str = "us",
                   backbone: str = "198.18.0.3") -> Steering:
    """The node config's steering: only this DC in its tables."""
    return Steering(dc=dc, region=region, backbone_interface="bb0", backbone_address=backbone,
                    dcs=(SteeringDc(name=dc, region=region, backbone=backbone),))


def test_the_share_replaces_the_steering_tables_only(staged: Staged) -> None:
    share = render(staged, Identity("iad", "us", "198.18.0.3"), None).share
    steering = share.steering(local_steering())
    assert steering is not None
    assert (steering.dc, steering.region, steering.backbone_interface,
            steering.backbone_address) == ("iad", "us", "bb0", "198.18.0.3")
    assert steering.dcs == share.dcs and steering.services == share.services
    assert share.steering(None) is None


@pytest.mark.parametrize(("local", "why"), [
    (local_steering("lax", "us", "198.18.0.9"), r"dc: 'lax' is not in dcs"),
    (local_steering("iad", "eu", "198.18.0.3"), r"dc: 'iad' is listed in dcs with region us"),
], ids=["DC not in the network", "DC in another region"])
def test_a_local_steering_that_does_not_fit_the_network_is_refused(
        local: Steering, why: str, staged: Staged) -> None:
    share = render(staged, Identity("iad", "us", None), None).share
    with pytest.raises(ConfigError, match=r"the network's steering does not fit this DC: .*"
                                          + why):
        share.steering(local)


def test_render_gives_services_as_steering_takes_them(staged: Staged) -> None:
    """The rendered services are Steering's own type, ready for the link."""
    share = render(staged, Identity("dus", "eu", None), None).share
    assert all(isinstance(s, Service) for s in share.services)
    assert all(isinstance(d, SteeringDc) and d.enabled for d in share.dcs)
