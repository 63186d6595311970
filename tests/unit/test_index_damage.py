"""The live index's files under damage, on a real small index (30 random vectors, brute force or a small tree):
a final record without its newline is kept; an incomplete final record is cut off into a side file with a
warning naming file, byte offset and what was dropped (a dropped delete brings its note back, said so); any
other damage (garbage, a checksum that verifies over a non-operation, a flipped byte before the last record,
every damaged snapshot file, a missing log) refuses with one line naming the file, record and byte offset,
exit 2; `notellm index check` lists every problem; `notellm index recover` keeps every record that verifies,
before and after the damage, and the index opens on the result. The log parser is fuzzed with hypothesis."""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from notellm_jax.config import RetrievalConfig
from notellm_jax.errors import MissingInputError, StoreFormatError
from notellm_jax.infer import ann
from notellm_jax.main import main
from notellm_jax.serve.index import LiveIndex
from notellm_jax.serve.index_files import LogScan, read_log, record, scan_log

if importlib.util.find_spec("scann") is None:  # absent on the GPU machines by design (ENVIRONMENT.md)
    pytest.skip("scann is not installed", allow_module_level=True)

DIM = 8
TREE = RetrievalConfig(scann_num_leaves=4, scann_leaves_to_search=4, scann_reorder=100)


def unit(rng, n):
    return ann.l2_normalise(rng.normal(size=(n, DIM)).astype(np.float32))


def build(tmp_path: Path, cfg: RetrievalConfig = RetrievalConfig()):
    """A 30-note index and a log of 7 acknowledged writes: new notes, a replaced note, deletes (the last record
    deletes a0). Returns the folder, its log, the log's lines and the reference state of every record."""
    rng = np.random.default_rng(0)
    ids = [f"n{i}" for i in range(30)]
    index = LiveIndex.create(tmp_path / "idx", ids, unit(rng, 30), {}, cfg, k=5)
    states, reference = [], {note_id: index.vector(note_id) for note_id in ids}
    writes = [("upsert", "a0"), ("upsert", "a1"), ("upsert", "a2"), ("upsert", "n1"), ("delete", "n5"),
              ("upsert", "a3"), ("delete", "a0")]
    for op, note_id in writes:
        if op == "upsert":
            vector = unit(rng, 1)[0]
            index.upsert(note_id, vector)
            reference[note_id] = vector
        else:
            index.delete(note_id)
            del reference[note_id]
        states.append(dict(reference))
    index.close()
    log = tmp_path / "idx" / "snap-000001.log"
    return tmp_path / "idx", log, log.read_bytes().splitlines(keepends=True), states


def index_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`notellm index ...` in-process: (exit status, stdout, stderr)."""
    try:
        main(["index", *argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_state(index: LiveIndex, expected: dict[str, np.ndarray]) -> None:
    assert len(index) == len(expected) and all(note_id in index for note_id in expected)
    for note_id, vector in expected.items():
        np.testing.assert_allclose(index.vector(note_id), vector / np.linalg.norm(vector), atol=1e-6)


def crc_line(body: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(body), body)


def test_a_final_record_without_its_newline_is_kept(tmp_path, capsys):
    folder, log, lines, states = build(tmp_path)
    log.write_bytes(b"".join(lines)[:-1])
    code, out, _ = index_cli(capsys, "check", str(folder))
    assert code == 0 and "7 records verify" in out and "final newline is missing (kept)" in out
    index = LiveIndex.open(folder, RetrievalConfig())
    assert_state(index, states[-1])
    assert index.repairs == [] and log.read_bytes() == b"".join(lines)  # the newline restored: nothing lost
    index.upsert("after", np.ones(DIM, np.float32))
    index.close()
    assert "after" in LiveIndex.open(folder, RetrievalConfig())


@pytest.mark.parametrize("keep, dropped", [(-2, "apparently the delete of note 'a0'"),
                                            (17, """b'%s {"op":"d'""")], ids=["id_readable", "half"])
def test_a_cut_inside_the_final_delete_is_cut_off_with_a_warning_and_a_side_file(tmp_path, capsys, caplog, keep,
                                                                                 dropped):
    folder, log, lines, states = build(tmp_path)
    offset, cut = len(b"".join(lines[:-1])), keep % len(lines[-1])
    dropped = f"{cut} bytes" + (f", {dropped}" if keep < 0 else f": {dropped % lines[-1][:8].decode()}")
    log.write_bytes(b"".join(lines)[:offset + cut])
    code, out, err = index_cli(capsys, "check", str(folder))
    assert code == 2 and f"{log}: record 7 at byte {offset}: incomplete final record" in out
    assert dropped in out and "1 problem(s) found" in err
    with caplog.at_level(logging.WARNING, logger="notellm_jax"):
        index = LiveIndex.open(folder, RetrievalConfig())
    side = log.with_name(f"{log.name}.torn-{offset}")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{log}: dropped an incomplete final record (record 7 at byte {offset}: {dropped};" in warning
    assert str(side) in warning
    assert_state(index, states[-2])  # a0 is back: the warning and the repair name its dropped delete
    assert index.repairs == [{"kind": "torn_tail", "file": str(log), "record": 7, "offset": offset, "bytes": cut,
                              "dropped": dropped, "side_file": str(side)}]
    assert side.read_bytes() == lines[-1][:cut] and log.read_bytes() == b"".join(lines[:-1])
    index.snapshot()  # a later snapshot's clean-up keeps the side file
    index.close()
    assert side.is_file()


def garbage(kind: str, line: bytes) -> bytes:
    """Record `line` damaged in one way, newline kept."""
    if kind == "eight_alnum":
        return b"zzzzzzzz not a record\n"
    if kind == "flipped":
        middle = len(line) // 2  # inside the vector's digits
        return line[:middle] + bytes([line[middle] ^ 0x04]) + line[middle + 1:]
    bodies = {"not_json": b"{not json", "not_an_op": b"[1,2]", "unknown_op": b'{"op":"merge","id":"n1"}',
              "wrong_dim": b'{"op":"upsert","id":"x","vector":[0.5,0.5,0.5],"title":"","category":""}',
              "nan_vector": b'{"op":"upsert","id":"x","vector":[NaN,0,0,0,0,0,0,1],"title":"","category":""}',
              "huge_vector": b'{"op":"upsert","id":"x","vector":[1e300,0,0,0,0,0,0,%s],"title":"","category":""}'
                             % (b"9" * 400,)}
    return crc_line(bodies[kind])


REASONS = {"eight_alnum": "no checksum", "flipped": "checksum mismatch", "not_json": "body is not JSON",
           "not_an_op": "not an operation", "unknown_op": "unknown operation 'merge'", "wrong_dim": "3 dimensions",
           "nan_vector": "not a list of finite numbers", "huge_vector": "not a list of finite numbers"}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_damaged_record_before_the_last_refuses_with_file_record_and_offset(tmp_path, capsys, kind):
    folder, log, lines, _ = build(tmp_path)
    lines[2] = garbage(kind, lines[2])
    log.write_bytes(b"".join(lines))
    offset = len(b"".join(lines[:2]))
    with pytest.raises(StoreFormatError) as refused:
        LiveIndex.open(folder, RetrievalConfig())
    message = str(refused.value)
    assert message.startswith(f"{log}: record 3 at byte {offset}: ") and REASONS[kind] in message
    assert "not the final record" in message and "\n" not in message
    assert log.read_bytes() == b"".join(lines)  # nothing cut, nothing rewritten
    code, out, err = index_cli(capsys, "check", str(folder))
    assert code == 2 and f"problem: {log}: record 3 at byte {offset}: " in out and "6 records verify" in out
    assert err.count("\n") == 1 and err.startswith("notellm index: error: ")


def test_a_complete_final_record_that_does_not_verify_is_refused_not_taken_for_a_torn_write(tmp_path):
    folder, log, lines, _ = build(tmp_path)
    lines[-1] = garbage("flipped", lines[-1])  # its newline is there: damaged after it was written
    log.write_bytes(b"".join(lines))
    with pytest.raises(StoreFormatError, match=rf"{log}: record 7 at byte {len(b''.join(lines[:-1]))}: checksum "
                       r"mismatch .*a complete final record \(its newline is there\), so not a torn write"):
        LiveIndex.open(folder, RetrievalConfig())
    assert log.read_bytes() == b"".join(lines)


@pytest.mark.parametrize("kind", ["eight_alnum", "not_json", "flipped"])
def test_the_same_damage_as_an_incomplete_final_record_is_repaired(tmp_path, kind):
    folder, log, lines, states = build(tmp_path)
    torn = garbage(kind, lines[-1])[:-1]  # no newline: a write cut by a crash
    log.write_bytes(b"".join(lines[:-1]) + torn)
    index = LiveIndex.open(folder, RetrievalConfig())
    assert_state(index, states[-2])
    assert [(r["record"], r["bytes"]) for r in index.repairs] == [(7, len(torn))]


def test_replayed_unknown_deletes_are_skipped_with_a_warning_and_duplicate_upserts_replace(tmp_path, capsys, caplog):
    folder, log, lines, states = build(tmp_path)
    vector = [float(x) for x in unit(np.random.default_rng(5), 1)[0]]
    extra = [record({"op": "delete", "id": "ghost"}),
             record({"op": "upsert", "id": "n2", "vector": vector, "title": "again", "category": ""})]
    log.write_bytes(b"".join(lines + extra))
    with caplog.at_level(logging.WARNING, logger="notellm_jax"):
        index = LiveIndex.open(folder, RetrievalConfig())
    offset = len(b"".join(lines))
    assert index.skipped_deletes == [{"id": "ghost", "record": 8, "offset": offset}]
    assert f"record 8 at byte {offset} deletes note 'ghost', which the index does not hold: skipped" in caplog.text
    assert_state(index, {**states[-1], "n2": np.asarray(vector)})
    assert index.note("n2")["title"] == "again"
    index.close()
    code, out, _ = index_cli(capsys, "check", str(folder))
    assert code == 2 and f"record 8 at byte {offset}: deletes note 'ghost'" in out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


SNAPSHOT_DAMAGE = {
    "current_missing": (lambda f: (f / "CURRENT").unlink(), MissingInputError, "CURRENT: missing, but the folder holds"),
    "current_empty": (lambda f: (f / "CURRENT").write_text(""), StoreFormatError, "CURRENT: empty"),
    "current_names_a_missing_snapshot": (lambda f: (f / "CURRENT").write_text("snap-000009"), MissingInputError,
                                         "CURRENT: names snap-000009, which is missing"),
    "vectors_truncated": (lambda f: _truncate(f / "snap-000001" / "vectors.npy"), StoreFormatError,
                          "snap-000001/vectors.npy: unreadable, truncated"),
    "ids_not_json": (lambda f: (f / "snap-000001" / "ids.json").write_text('["n0", '), StoreFormatError,
                     "snap-000001/ids.json: not JSON"),
    "ids_wrong_length": (lambda f: (f / "snap-000001" / "ids.json").write_text('["n0"]'), StoreFormatError,
                         "snap-000001/ids.json: 1 ids, index.json says 30"),
    "index_json_not_json": (lambda f: (f / "snap-000001" / "index.json").write_text("{"), StoreFormatError,
                            "snap-000001/index.json: not JSON"),
    "index_json_other_format": (lambda f: (f / "snap-000001" / "index.json").write_text('{"format": "x"}'),
                                StoreFormatError, "snap-000001/index.json: format 'x'"),
    "scann_assets_truncated": (lambda f: _truncate(f / "snap-000001" / "dataset.npy"), StoreFormatError,
                               "snap-000001: the ScaNN assets do not load"),
    "log_missing": (lambda f: (f / "snap-000001.log").unlink(), MissingInputError, "snap-000001.log: missing"),
}


@pytest.mark.parametrize("case", sorted(SNAPSHOT_DAMAGE))
def test_a_damaged_snapshot_file_refuses_with_one_line_naming_it(tmp_path, capsys, case):
    folder, log, lines, _ = build(tmp_path)
    damage, error, message = SNAPSHOT_DAMAGE[case]
    damage(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(error) as refused:
        LiveIndex.open(folder, RetrievalConfig())
    assert str(refused.value).startswith(f"{folder}/{message}") and "\n" not in str(refused.value)
    # recover is offered where it helps: CURRENT or the log, not a damaged snapshot file it cannot rebuild
    assert ("notellm index recover" in str(refused.value)) == case.startswith(("current", "log"))
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # refused, nothing touched
    code, out, err = index_cli(capsys, "check", str(folder))
    assert code == 2 and f"problem: {folder}/{message}" in out and err.count("\n") == 1


def test_the_service_start_refuses_a_damaged_index_with_one_line(tmp_path, capsys):
    folder, *_ = build(tmp_path)
    _truncate(folder / "snap-000001" / "vectors.npy")
    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.py")
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--config", tiny, "--index", str(folder), "--port", "0", "--set", f"paths.work_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"notellm serve: error: {folder}/snap-000001/vectors.npy: unreadable")


def test_check_reports_every_problem_not_just_the_first(tmp_path, capsys):
    folder, log, lines, _ = build(tmp_path)
    lines[1], lines[4] = garbage("flipped", lines[1]), garbage("eight_alnum", lines[4])
    log.write_bytes(b"".join(lines)[:-5])
    (folder / "snap-000001" / "notes.json").write_text("[]")
    code, out, _ = index_cli(capsys, "check", str(folder))
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert code == 2 and len(problems) == 4, out
    assert "notes.json: not a JSON object" in problems[0] and "record 2 at byte" in problems[1]
    assert "record 5 at byte" in problems[2] and "record 7 at byte" in problems[3] and "incomplete" in problems[3]
    assert "4 records verify (4 upserts, 0 deletes), 2 damaged, a torn tail" in out


@pytest.mark.parametrize("cfg", [RetrievalConfig(), TREE], ids=["brute_force", "tree"])
def test_recover_keeps_every_record_that_verifies_before_and_after_a_flipped_byte(tmp_path, capsys, cfg):
    folder, log, lines, states = build(tmp_path, cfg)
    lines[2] = garbage("flipped", lines[2])  # the upsert of a2, between six good records
    damaged = b"".join(lines)
    log.write_bytes(damaged)
    offset = len(b"".join(lines[:2]))
    code, out, _ = index_cli(capsys, "recover", str(folder))
    assert code == 0 and "and 6 log record(s) that verify" in out
    assert f"dropped: {log}: record 3 at byte {offset}: checksum mismatch" in out and "upsert of note 'a2'" in out
    expected = dict(states[-1])
    del expected["a2"]  # the one write whose record does not verify; a3, the n5 and a0 deletes after it are kept
    index = LiveIndex.open(folder, cfg)  # the service's start
    assert_state(index, expected)
    assert index.repairs == [] and index.params.brute_force == (cfg is not TREE)
    index.close()
    assert (folder / "CURRENT").read_text() == "snap-000002"
    aside = [p for p in folder.iterdir() if p.name.startswith("aside-")]
    assert len(aside) == 1 and (aside[0] / "snap-000001.log").read_bytes() == damaged  # kept, never deleted
    assert (aside[0] / "CURRENT").read_text() == "snap-000001" and (aside[0] / "snap-000001" / "ids.json").is_file()
    code, out, _ = index_cli(capsys, "check", str(folder))
    assert code == 0 and out.strip().endswith(f"{folder}: OK")


def test_recover_without_current_uses_the_newest_snapshot(tmp_path, capsys):
    folder, log, lines, states = build(tmp_path)
    (folder / "CURRENT").unlink()
    code, out, _ = index_cli(capsys, "recover", str(folder))
    assert code == 0 and "and 7 log record(s) that verify" in out
    assert_state(LiveIndex.open(folder, RetrievalConfig()), states[-1])


# --------------------------------------------------------------------------------------------------
# The parser on random damage (no index needed: bytes in, scan out)

OPS = st.one_of(
    st.builds(lambda i, v: {"op": "upsert", "id": f"n{i}", "vector": v, "title": "t", "category": ""},
              st.integers(0, 5), st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=4, max_size=4)),
    st.builds(lambda i: {"op": "delete", "id": f"n{i}"}, st.integers(0, 5)))
DAMAGE = st.lists(st.tuples(st.sampled_from(["flip", "insert", "truncate"]), st.floats(0, 1), st.binary(min_size=1, max_size=12)),
                  min_size=1, max_size=3)


def damage(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, where, payload in edits:
        at = min(int(where * len(out)), max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[at] ^= payload[0] or 1
        elif kind == "insert":
            out[at:at] = payload
        elif kind == "truncate":
            del out[at:]
    return bytes(out)


def assert_every_byte_accounted_for(scan: LogScan, data: bytes) -> None:
    spans = sorted([(r.offset, r.length) for r in scan.records] + [(d.offset, len(d.data)) for d in scan.damaged]
                   + ([(scan.torn.offset, len(scan.torn.data))] if scan.torn else []))
    position = 0
    for offset, length in spans:
        assert offset == position
        position += length
    assert position == len(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=8), edits=DAMAGE)
def test_the_log_parser_accounts_for_every_byte_of_random_damage(tmp_path, ops, edits):
    """Random flips, insertions and truncations: no uncaught exception; every byte is in a record that verifies
    or in a named damaged range (so a record not restored is reported, unless a cut removed it whole); no
    damaged bytes pass as a record; `read_log` (the service's start) raises only the typed error, only when a
    record before the last is damaged, and otherwise replays exactly what the scan keeps."""
    original = [record(op) for op in ops]
    data = damage(b"".join(original), edits)
    scan = scan_log(data, Path("log"), dim=4)
    assert_every_byte_accounted_for(scan, data)
    kept = [json.dumps(r.op) for r in scan.records]
    assert set(kept) <= {json.dumps(op) for op in ops}
    path = tmp_path / "snap-000001.log"
    path.write_bytes(data)
    try:
        strict = read_log(path, dim=4)
    except StoreFormatError as e:
        assert scan.damaged and f"record {scan.damaged[0].number} at byte {scan.damaged[0].offset}" in str(e)
    else:
        assert not scan.damaged and [r.op for r in strict.records] == [r.op for r in scan.records]


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(OPS, min_size=1, max_size=8), where=st.floats(0, 1))
def test_a_cut_log_keeps_every_whole_record_and_reports_the_cut_one(ops, where):
    """A cut anywhere: the records before it are restored (a record missing only its newline too), the one it
    cuts through is the torn tail, nothing is damaged."""
    original = [record(op) for op in ops]
    data = b"".join(original)
    cut = int(where * len(data))
    scan = scan_log(data[:cut], Path("log"), dim=4)
    ends = np.cumsum([len(line) for line in original])
    whole = int(np.sum(ends - 1 <= cut))  # a record is whole when at most its newline is cut
    assert [r.op for r in scan.records] == ops[:whole] and not scan.damaged
    assert (scan.torn is not None) == (whole < len(ops) and cut > (ends[whole - 1] if whole else 0))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return build(tmp_path_factory.mktemp("template"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=DAMAGE)
def test_the_service_start_on_random_log_damage_opens_what_verifies_or_refuses(template, tmp_path_factory, edits):
    """LiveIndex.open itself on random damage: it opens with exactly the notes the verified records leave (a torn
    tail cut off and listed in `repairs`), or refuses with the typed error; never another exception."""
    folder, log, lines, _ = template
    copy = tmp_path_factory.mktemp("damaged") / "idx"
    shutil.copytree(folder, copy)
    data = damage(b"".join(lines), edits)
    (copy / log.name).write_bytes(data)
    scan = scan_log(data, copy / log.name, dim=DIM)
    try:
        index = LiveIndex.open(copy, RetrievalConfig())
    except StoreFormatError:
        assert scan.damaged
        return
    held = {f"n{i}" for i in range(30)}
    for entry in scan.records:
        (held.add if entry.op["op"] == "upsert" else held.discard)(entry.op["id"])
    assert not scan.damaged and len(index) == len(held) and all(note_id in index for note_id in held)
    assert len(index.repairs) == (scan.torn is not None)
    index.close()
