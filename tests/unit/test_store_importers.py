"""Note store schemas and the three importers: hand-made fixtures with hand-computed expectations,
bad input (each error names file and position, or the record is skipped and counted). The real dumps
are checked against their SOURCES.md in tests/integration/test_stackexchange_dumps.py."""
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from notellm_jax.data import store
from notellm_jax.data.importers import jsonl, reference_csv, stackexchange
from notellm_jax.data.importers.builder import StoreBuilder
from notellm_jax.errors import InputFormatError


def _ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp())


def _xml(root: str, rows: list[str], bom: bool = True) -> bytes:
    body = "\n".join(f"  <row {r} />" for r in rows)
    text = f'<?xml version="1.0" encoding="utf-8"?>\n<{root}>\n{body}\n</{root}>\n'
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode()


def _run_import(fn, tmp_path: Path) -> tuple[dict, dict]:
    builder = StoreBuilder(tmp_path / "out")
    details = fn(builder)
    return {**builder.finish("test input"), **details}, {
        "notes": store.read_note_table(tmp_path / "out" / "notes.parquet").to_pylist(),
        "events": store.read_events(tmp_path / "out" / "events.parquet").to_pylist(),
        "links": store.read_links(tmp_path / "out" / "pairs_postlinks.parquet").to_pylist(),
        "given": store.read_pairs(tmp_path / "out" / "pairs_given.parquet").to_pylist(),
    }


# ----------------------------------------------------------------------------- store


def test_store_round_trip_and_missing_column(tmp_path):
    notes = [{"note_id": "s/1", "title": "T", "content": "C", "topics": ["a", "b"], "category": "s",
              "created_at": 5, "exposure": -1}]
    store.write_notes(notes, tmp_path / "notes.parquet")
    assert store.read_note_table(tmp_path / "notes.parquet").to_pylist() == notes
    with pytest.raises(store.StoreFormatError, match=r"pairs\.parquet: missing column 'score'"):
        store.write_pairs({"note_a": ["x"], "note_b": ["y"]}, tmp_path / "pairs.parquet")
    with pytest.raises(store.StoreFormatError, match=r"lack field 'exposure'"):
        store.write_notes([{k: v for k, v in notes[0].items() if k != "exposure"}], tmp_path / "n2.parquet")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        store.read_events(tmp_path / "missing.parquet")


def test_text_helpers():
    html = "<p>Use <code>x &lt; y</code> and&nbsp;<b>bold</b></p>\n<pre><code>a=1\nb=2</code></pre><p>end</p>"
    assert stackexchange.html_to_text(html) == "Use x < y and\xa0bold a=1 b=2 end".replace("\xa0", " ")
    assert stackexchange.parse_tags("<neural-networks><c++>") == ["neural-networks", "c++"]
    assert stackexchange.parse_tags("|neural-networks|c++|") == ["neural-networks", "c++"]
    assert stackexchange.parse_tags("") == []
    assert stackexchange.site_category("ai.stackexchange.com") == "ai"
    assert stackexchange.site_category("economics.stackexchange.com-2011beta") == "economics"
    assert stackexchange.site_category("stackoverflow.com") == "stackoverflow"


# ----------------------------------------------------------------------------- Stack Exchange


@pytest.fixture
def mini_dump(tmp_path) -> Path:
    """Two sites: 'new.stackexchange.com' (all files, AccountIds) and an old beta (lower-case posts.xml only)."""
    root = tmp_path / "dumps"
    site = root / "new.stackexchange.com"
    site.mkdir(parents=True)
    (site / "Posts.xml").write_bytes(_xml("posts", [
        'Id="1" PostTypeId="1" CreationDate="2020-01-01T10:00:00.000" ViewCount="50" OwnerUserId="7" '
        'Title="How  to brew?" Body="&lt;p&gt;Use &lt;code&gt;a &amp;lt; b&lt;/code&gt;&lt;/p&gt;" '
        'Tags="&lt;brew&gt;&lt;hops&gt;"',
        'Id="2" PostTypeId="2" ParentId="1" CreationDate="2020-01-02T00:00:00.000" OwnerUserId="8"',
        'Id="3" PostTypeId="1" CreationDate="2020-01-03T00:00:00.000" OwnerUserId="8" Title="Second" '
        'Body="&lt;p&gt;x&lt;/p&gt;" Tags="|malt|"',
        'Id="4" PostTypeId="1" OwnerUserId="8" Title="No date" Body="b"',        # skipped: no CreationDate
        'Id="5" PostTypeId="2" ParentId="99" CreationDate="2020-01-04T00:00:00.000" OwnerUserId="7"',
        'Id="6" PostTypeId="4" CreationDate="2020-01-04T00:00:00.000"',          # tag wiki
        'Id="7" PostTypeId="2" ParentId="3" CreationDate="2020-01-05T00:00:00.000"',  # deleted user
    ]))
    (site / "Comments.xml").write_bytes(_xml("comments", [
        'Id="1" PostId="2" CreationDate="2020-01-06T00:00:00.000" UserId="9"',   # on answer 2 -> question 1
        'Id="2" PostId="3" CreationDate="2020-01-07T00:00:00.000" UserId="-1"',  # Community bot
        'Id="3" PostId="6" CreationDate="2020-01-07T00:00:00.000" UserId="9"',   # on a tag wiki
    ]))
    (site / "Votes.xml").write_bytes(_xml("votes", [
        'Id="1" PostId="3" VoteTypeId="5" UserId="9" CreationDate="2020-01-08T00:00:00.000"',
        'Id="2" PostId="3" VoteTypeId="2" CreationDate="2020-01-08T00:00:00.000"',
        'Id="3" PostId="2" VoteTypeId="5" UserId="9" CreationDate="2020-01-08T00:00:00.000"',
    ]))
    (site / "PostLinks.xml").write_bytes(_xml("postlinks", [
        'Id="1" PostId="3" RelatedPostId="1" LinkTypeId="3" CreationDate="2020-01-09T00:00:00.000"',
        'Id="2" PostId="3" RelatedPostId="2" LinkTypeId="1" CreationDate="2020-01-09T00:00:00.000"',
    ]))
    (site / "Users.xml").write_bytes(_xml("users", ['Id="7" AccountId="1007"', 'Id="8" AccountId="1008"',
                                                    'Id="9"']))
    beta = root / "old.stackexchange.com-2011beta"
    beta.mkdir()
    (beta / "posts.xml").write_bytes(_xml("posts", [
        'Id="1" PostTypeId="1" CreationDate="2011-05-01" OwnerUserId="7" Title="" Body="&lt;p&gt;body only&lt;/p&gt;"',
    ], bom=False))
    return root


def test_stackexchange_mini_dump(mini_dump, tmp_path):
    stats, out = _run_import(lambda b: stackexchange.import_stackexchange(mini_dump, [], b), tmp_path)
    assert out["notes"] == [
        {"note_id": "new.stackexchange.com/1", "title": "How to brew?", "content": "Use a < b",
         "topics": ["brew", "hops"], "category": "new", "created_at": _ts("2020-01-01T10:00:00"), "exposure": 50},
        {"note_id": "new.stackexchange.com/3", "title": "Second", "content": "x", "topics": ["malt"],
         "category": "new", "created_at": _ts("2020-01-03"), "exposure": -1},
        {"note_id": "old.stackexchange.com-2011beta/1", "title": "", "content": "body only", "topics": [],
         "category": "old", "created_at": _ts("2011-05-01"), "exposure": -1},
    ]
    q1, q3, old = "new.stackexchange.com/1", "new.stackexchange.com/3", "old.stackexchange.com-2011beta/1"
    assert sorted((e["user_id"], e["note_id"], e["timestamp"], e["action"]) for e in out["events"]) == sorted([
        ("account:1007", q1, _ts("2020-01-01T10:00:00"), "ask"),
        ("account:1008", q1, _ts("2020-01-02"), "answer"),
        ("account:1008", q3, _ts("2020-01-03"), "ask"),
        ("new.stackexchange.com:9", q1, _ts("2020-01-06"), "comment"),
        ("new.stackexchange.com:9", q3, _ts("2020-01-08"), "favorite"),
        ("old.stackexchange.com-2011beta:7", old, _ts("2011-05-01"), "ask"),
    ])
    assert out["links"] == [{"note_a": q3, "note_b": q1, "link_type": "duplicate"}]
    assert stats["skipped"] == {
        "question.missing_CreationDate": 1, "answer.unknown_question": 1, "post.not_question_or_answer": 1,
        "answer.no_user": 1, "comment.community_user": 1, "comment.not_on_question_thread": 1,
        "vote.not_favorite": 1, "favorite.not_on_question": 1, "link.not_between_questions": 1,
        "event.unknown_note": 0}
    assert stats["notes_flagged_kept"] == {"empty_title": 1, "empty_content": 0, "no_topics": 1}
    assert stats["events_per_action"] == {"answer": 1, "ask": 3, "comment": 1, "favorite": 1}
    assert stats["users"] == 4
    assert stats["sites"]["old.stackexchange.com-2011beta"]["files"] == ["posts.xml"]


def test_stackexchange_site_selection(mini_dump, tmp_path):
    _, out = _run_import(lambda b: stackexchange.import_stackexchange(mini_dump, ["old.stackexchange.com-2011beta"], b),
                         tmp_path)
    assert [n["note_id"] for n in out["notes"]] == ["old.stackexchange.com-2011beta/1"]
    with pytest.raises(InputFormatError, match="unknown site.*nope.*available"):
        stackexchange.stackexchange_site_dirs(mini_dump, ["nope"])


def test_truncated_xml_names_file_and_line(mini_dump, tmp_path):
    posts = mini_dump / "new.stackexchange.com" / "Posts.xml"
    posts.write_bytes(posts.read_bytes()[:-40])
    with pytest.raises(InputFormatError, match=r"Posts\.xml: malformed XML at line \d+, column \d+"):
        stackexchange.import_stackexchange(mini_dump, ["new.stackexchange.com"], StoreBuilder(tmp_path / "o"))


def test_malformed_xml_names_line_and_column(tmp_path):
    path = tmp_path / "Comments.xml"
    path.write_bytes(b'<comments>\n  <row Id="1" PostId=2 />\n</comments>\n')
    with pytest.raises(InputFormatError, match=r"Comments\.xml: malformed XML at line 2, column \d+"):
        list(stackexchange.iter_rows(path))


def test_non_utf8_xml_names_byte_offset(tmp_path):
    data = _xml("posts", ['Id="1" PostTypeId="1" CreationDate="2020-01-01" Title="caf\xe9"']).replace(
        "café".encode(), b"caf\xe9")
    path = tmp_path / "Posts.xml"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(InputFormatError, match=rf"Posts\.xml: .*byte offset {offset} \(line 3\): invalid UTF-8 byte 0xe9"):
        list(stackexchange.iter_rows(path))


# ----------------------------------------------------------------------------- reference CSV


def _write_csv(path: Path, text: str, encoding: str = "utf-8") -> None:
    path.write_bytes(text.encode(encoding))


def test_reference_csv(tmp_path):
    src = tmp_path / "csv"
    src.mkdir()
    _write_csv(src / "notes_a.csv", "note_id,title,content,image_id,category\n"
               "n1,Hello,Great food #美食[话题]# here #travel#,img1,life@food@noodles\n"
               'n2,,"no tags, just text",img2,life@travel\n'
               "n1,Dup,dup,img3,x\n"
               ",,,img4,x\n")
    _write_csv(src / "notes_b.csv", "note_id,title,content,image_id,category,created_at\n"
               "n3,Third,#only#,img5,tech,1700000000\n")
    _write_csv(src / "note_pairs_0.csv", "note_id_1,note_id_2\nn1,n2\nn2,n3\nn1,ghost\nn1,n1\nn1,n2\n")
    stats, out = _run_import(lambda b: reference_csv.import_reference_csv(src, b, category_depth=1), tmp_path)
    assert out["notes"] == [
        {"note_id": "n1", "title": "Hello", "content": "Great food here", "topics": ["美食", "travel"],
         "category": "life", "created_at": 0, "exposure": -1},
        {"note_id": "n2", "title": "", "content": "no tags, just text", "topics": [], "category": "life",
         "created_at": 1, "exposure": -1},
        {"note_id": "n3", "title": "Third", "content": "", "topics": ["only"], "category": "tech",
         "created_at": 1700000000, "exposure": -1},
    ]
    assert [(p["note_a"], p["note_b"], p["score"]) for p in out["given"]] == [("n1", "n2", 1.0), ("n2", "n3", 1.0)]
    assert stats["skipped"] == {"note.duplicate_id": 1, "note.no_title_and_no_content": 1,
                                "given_pair.unknown_note": 1, "given_pair.self_pair": 1,
                                "given_pair.duplicate": 1, "event.unknown_note": 0}
    assert stats["notes_flagged_kept"] == {"empty_title": 1, "empty_content": 1, "no_topics": 1}


def test_reference_csv_category_depth_zero_keeps_path(tmp_path):
    _write_csv(tmp_path / "notes_x.csv", "note_id,title,content,image_id,category\nn1,T,c,i,a@b@c\nn2,U,d,i,a\n")
    _write_csv(tmp_path / "note_pairs_x.csv", "a,b\nn1,n2\n")
    _, out = _run_import(lambda b: reference_csv.import_reference_csv(tmp_path, b, category_depth=0), tmp_path)
    assert out["notes"][0]["category"] == "a@b@c"


def test_reference_csv_bad_input(tmp_path):
    _write_csv(tmp_path / "notes_x.csv", "note_id,title,content,category\nn1,T,c,food\n")
    with pytest.raises(InputFormatError, match=r"notes_x\.csv: missing column 'image_id'"):
        reference_csv.import_reference_csv(tmp_path, StoreBuilder(tmp_path / "o1"), 1)
    _write_csv(tmp_path / "notes_x.csv", "note_id,title,content,image_id,category\nn1,T,c\n")
    with pytest.raises(InputFormatError, match=r"notes_x\.csv:2: row has"):
        reference_csv.import_reference_csv(tmp_path, StoreBuilder(tmp_path / "o2"), 1)
    raw = "note_id,title,content,image_id,category\nn1,Caf\xe9,c,i,food\n".encode("latin-1")
    (tmp_path / "notes_x.csv").write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(InputFormatError, match=rf"notes_x\.csv: not UTF-8 at byte offset {offset} \(line 2\)"):
        reference_csv.import_reference_csv(tmp_path, StoreBuilder(tmp_path / "o3"), 1)


# ----------------------------------------------------------------------------- generic JSONL


def _jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_generic_jsonl(tmp_path):
    note = {"note_id": "a", "title": "A", "content": "x", "topics": ["t"], "category": "c", "created_at": 1}
    _jsonl(tmp_path / "notes.jsonl", [note, {**note, "title": "dup"}, {**note, "note_id": "b", "exposure": 9}])
    _jsonl(tmp_path / "events.jsonl", [{"user_id": "u", "note_id": "a", "timestamp": 3, "action": "click"},
                                       {"user_id": "u", "note_id": "zz", "timestamp": 4, "action": "click"}])
    stats, out = _run_import(lambda b: jsonl.import_generic(tmp_path, b), tmp_path)
    assert out["notes"] == [{**note, "exposure": -1}, {**note, "note_id": "b", "exposure": 9}]
    assert out["events"] == [{"user_id": "u", "note_id": "a", "timestamp": 3, "action": "click"}]
    assert stats["skipped"] == {"note.duplicate_id": 1, "event.unknown_note": 1}


def test_generic_jsonl_schema_examples_import(tmp_path):
    """The example lines of jsonl.py's docstring (the user-facing schema) import as the schema says."""
    note_line, event_line = [line.strip() for line in jsonl.__doc__.splitlines() if line.strip().startswith("{")]
    (tmp_path / "notes.jsonl").write_text(note_line + "\n")
    (tmp_path / "events.jsonl").write_text(event_line + "\n")
    stats, out = _run_import(lambda b: jsonl.import_generic(tmp_path, b), tmp_path)
    note, event = json.loads(note_line), json.loads(event_line)
    assert out["notes"] == [{**note, "created_at": _ts(note["created_at"].removesuffix("Z"))}]
    assert out["events"] == [event]
    assert not any(stats["skipped"].values())


def test_generic_jsonl_bad_input(tmp_path):
    (tmp_path / "notes.jsonl").write_text('{"note_id": "a"}\n')
    with pytest.raises(InputFormatError, match=r"notes\.jsonl:1: missing field\(s\) \['title'"):
        jsonl.import_generic(tmp_path, StoreBuilder(tmp_path / "o1"))
    (tmp_path / "notes.jsonl").write_text('\n{"note_id": \n')
    with pytest.raises(InputFormatError, match=r"notes\.jsonl:2:\d+: invalid JSON"):
        jsonl.import_generic(tmp_path, StoreBuilder(tmp_path / "o2"))
