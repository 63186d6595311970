"""Importers that fill the note store (`store.py`) from three kinds of input.

- Stack Exchange data dumps (`import_stackexchange`): a folder of site folders, each with Posts.xml
  and, where present, Comments.xml, Votes.xml, PostLinks.xml and Users.xml (old Area 51 dumps use
  lower-case names). Questions become notes; asking, answering, commenting (on a question or one of
  its answers) and favouriting (VoteTypeId=5 with a UserId) become events on the question.
- The reference code's CSV format (`import_reference_csv`): notes_*.csv + note_pairs_*.csv.
- Generic JSONL (`import_generic`): notes.jsonl with the store's fields + events.jsonl.

Every importer feeds one `StoreBuilder`, which owns the rules shared by all sources: duplicate note
ids keep the first record; a note with neither title nor content is unusable and skipped; an empty
title, empty content or no topics is kept and counted; events, links and pairs that name an unknown
note are dropped and counted. Every skipped record is counted under a reason in the returned stats.

Malformed input raises `InputFormatError` naming the file and the position (line/column for XML,
JSONL and CSV; byte offset for bytes that are not UTF-8). Inputs are decoded strictly as UTF-8 (an
XML file's BOM is accepted): a wrong encoding is an error, never silent replacement characters.
"""
from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from notellm_jax.config import Config
from notellm_jax.data import store
from notellm_jax.errors import InputFormatError, MissingInputError


# ----------------------------------------------------------------------------- shared builder


class StoreBuilder:
    """Collects notes (streamed to Parquet), events, explicit links and given pairs, with counts.

    `finish()` validates events/links/pairs against the note ids and writes the store files; the
    notes file is renamed into place last, so its presence means the import completed.
    """

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._notes = store.NoteWriter(self.data_dir / "notes.parquet")
        self._note_ids: set[str] = set()
        self._events: dict[str, list[Any]] = {name: [] for name in store.EVENTS_SCHEMA.names}
        self._links: list[tuple[str, str, str]] = []
        self._given_pairs: list[tuple[str, str, float]] = []
        self.skipped: Counter[str] = Counter()
        self.flagged: Counter[str] = Counter()
        self.notes_read = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def add_note(self, note: Mapping[str, Any]) -> bool:
        """Add one note record (NOTES_SCHEMA fields); False when skipped (counted by reason)."""
        self.notes_read += 1
        if note["note_id"] in self._note_ids:
            self.skip("note.duplicate_id")
            return False
        if not note["title"] and not note["content"]:
            self.skip("note.no_title_and_no_content")
            return False
        for flag, empty in (("empty_title", not note["title"]), ("empty_content", not note["content"]),
                            ("no_topics", not note["topics"])):
            self.flagged[flag] += int(empty)
        self._note_ids.add(note["note_id"])
        self._notes.add(note)
        return True

    def add_event(self, user_id: str, note_id: str, timestamp: int, action: str) -> None:
        for name, value in zip(store.EVENTS_SCHEMA.names, (user_id, note_id, timestamp, action)):
            self._events[name].append(value)

    def add_link(self, note_a: str, note_b: str, link_type: str) -> None:
        self._links.append((note_a, note_b, link_type))

    def add_given_pair(self, note_a: str, note_b: str, score: float) -> None:
        self._given_pairs.append((note_a, note_b, score))

    def _known_pairs(self, rows: list[tuple], kind: str) -> list[tuple]:
        """Rows whose two notes exist, minus self-pairs and repeats (first kept), all counted."""
        kept, seen = [], set()
        for row in rows:
            key = (row[0], row[1])
            if row[0] not in self._note_ids or row[1] not in self._note_ids:
                self.skip(f"{kind}.unknown_note")
            elif row[0] == row[1]:
                self.skip(f"{kind}.self_pair")
            elif key in seen:
                self.skip(f"{kind}.duplicate")
            else:
                seen.add(key)
                kept.append(row)
        return kept

    def _known_events(self) -> pa.Table:
        events = store.to_table(self._events, store.EVENTS_SCHEMA, "events")
        known = pc.is_in(events["note_id"], value_set=pa.array(sorted(self._note_ids), pa.string()))
        self.skipped["event.unknown_note"] += len(events) - (pc.sum(known).as_py() or 0)
        return events.filter(known)

    def finish(self) -> dict[str, Any]:
        """Write events/links/given pairs, then the notes file; return the import counts."""
        events = self._known_events()
        store.write_events(events, self.data_dir / "events.parquet")
        links = self._known_pairs(self._links, "link")
        store.write_links({name: [r[i] for r in links] for i, name in enumerate(store.LINKS_SCHEMA.names)},
                          self.data_dir / "pairs_postlinks.parquet")
        given = self._known_pairs(self._given_pairs, "given_pair")
        store.write_pairs({name: [r[i] for r in given] for i, name in enumerate(store.PAIRS_SCHEMA.names)},
                          self.data_dir / "pairs_given.parquet")
        self._notes.close()
        actions = pc.value_counts(events["action"]).to_pylist() if len(events) else []
        return {
            "notes_read": self.notes_read,
            "notes_written": self._notes.rows,
            "notes_flagged_kept": dict(sorted(self.flagged.items())),
            "events_written": len(events),
            "events_per_action": {a["values"]: a["counts"] for a in sorted(actions, key=lambda a: a["values"])},
            "users": len(pc.unique(events["user_id"])) if len(events) else 0,
            "notes_with_events": len(pc.unique(events["note_id"])) if len(events) else 0,
            "links_written": len(links),
            "given_pairs_written": len(given),
            "skipped": dict(sorted(self.skipped.items())),
        }

    def abort(self) -> None:
        """Drop the partial notes file after a failed import."""
        self._notes.close()
        (self.data_dir / "notes.parquet").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- text helpers


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML fragment; block tags become spaces so words do not run together."""

    BLOCK_TAGS = frozenset({"p", "br", "div", "li", "ul", "ol", "pre", "blockquote", "hr", "tr", "td", "th",
                            "h1", "h2", "h3", "h4", "h5", "h6", "table"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.BLOCK_TAGS:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        self.handle_starttag(tag, [])

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_to_text(html: str) -> str:
    """Clean text from a post body: tags stripped (code text kept), entities unescaped, whitespace collapsed."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return " ".join("".join(parser.parts).split())


def parse_tags(tags: str) -> list[str]:
    """Stack Exchange Tags attribute -> topics: "<a><b>" (classic dumps) or "|a|b|" (dumps from 2024)."""
    if tags.startswith("<"):
        return re.findall(r"<([^<>]+)>", tags)
    return [t for t in tags.split("|") if t]


def site_category(folder_name: str) -> str:
    """Category of a site folder: "ai.stackexchange.com" -> "ai", "economics.stackexchange.com-2011beta" -> "economics"."""
    name = re.sub(r"-\d{4}beta$", "", folder_name)
    return re.sub(r"(\.stackexchange)?\.(com|net|org)$", "", name)


def _utf8_error(path: Path) -> str | None:
    """'byte offset N (line L): invalid UTF-8 byte 0x..' for the first undecodable byte, else None."""
    offset = 0
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"byte offset {offset + e.start} (line {line_number}): invalid UTF-8 byte "
                        f"0x{line[e.start]:02x}")
            offset += len(line)
    return None


def _timestamp(text: str) -> int:
    """Dump dates ("2016-08-02T15:39:14.947" or "2010-12-14") are UTC -> unix seconds."""
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp())


# ----------------------------------------------------------------------------- Stack Exchange


def iter_rows(path: Path) -> Iterator[dict[str, str]]:
    """Stream the attribute dicts of a dump file's <row> elements, freeing each element after use."""
    context = ET.iterparse(path, events=("start", "end"))
    root = None
    try:
        for event, element in context:
            if root is None:
                root = element
            elif event == "end" and element.tag == "row":
                yield dict(element.attrib)
                root.clear()
    except ET.ParseError as e:
        line, column = e.position
        encoding = _utf8_error(path)
        detail = f"; {encoding}" if encoding else ""
        reason = str(e).split(":")[0]
        raise InputFormatError(f"{path}: malformed XML at line {line}, column {column} ({reason}){detail}") from None


def _dump_file(site_dir: Path, name: str) -> Path | None:
    """The dump file `name` in `site_dir`, matched case-insensitively (old dumps use posts.xml)."""
    matches = [p for p in site_dir.iterdir() if p.name.lower() == name.lower()]
    return matches[0] if matches else None


def stackexchange_site_dirs(root: Path, sites: list[str]) -> list[Path]:
    """The site folders to import: `root` itself if it holds Posts.xml, else its sub-folders that do."""
    if not root.is_dir():
        raise MissingInputError(f"Stack Exchange input folder not found: {root}")
    if _dump_file(root, "Posts.xml"):
        return [root]
    available = sorted(p for p in root.iterdir() if p.is_dir() and _dump_file(p, "Posts.xml"))
    if not available:
        raise InputFormatError(f"{root}: no site folder with a Posts.xml")
    if not sites:
        return available
    by_name = {p.name: p for p in available}
    unknown = [s for s in sites if s not in by_name]
    if unknown:
        raise InputFormatError(f"{root}: unknown site(s) {unknown}; available: {sorted(by_name)}")
    return [by_name[s] for s in sites]


def _parse_fields(row: Mapping[str, str], spec: Mapping[str, Callable[[str], Any]], kind: str,
                  builder: StoreBuilder) -> dict[str, Any] | None:
    """Parse the required attributes in `spec`; None (counted as kind.missing_X / kind.bad_X) if any fails."""
    values = {}
    for name, parse in spec.items():
        text = row.get(name)
        if text is None or text == "":
            builder.skip(f"{kind}.missing_{name}")
            return None
        try:
            values[name] = parse(text)
        except ValueError:
            builder.skip(f"{kind}.bad_{name}")
            return None
    return values


class _SiteImporter:
    """Imports one site folder: notes from Posts.xml, then events from answers, comments and votes."""

    LINK_TYPES = {"1": "linked", "3": "duplicate"}

    def __init__(self, site_dir: Path, builder: StoreBuilder):
        self.site_dir, self.site, self.builder = site_dir, site_dir.name, builder
        self.category = site_category(self.site)
        self.accounts = self._read_accounts()
        self.thread_of: dict[int, int] = {}  # post id -> id of its question (questions map to themselves)
        self.counts: Counter[str] = Counter()

    def note_id(self, question_id: int) -> str:
        return f"{self.site}/{question_id}"

    def _read_accounts(self) -> dict[str, str]:
        """Users.xml Id -> cross-site AccountId, for the dumps that carry it."""
        path = _dump_file(self.site_dir, "Users.xml")
        rows = iter_rows(path) if path else ()
        return {r["Id"]: r["AccountId"] for r in rows if r.get("Id") and r.get("AccountId")}

    def user_key(self, user_id: str | None, kind: str) -> str | None:
        """'account:<AccountId>' where known, else '<site>:<UserId>'; None (counted) for no/community user."""
        if not user_id:
            self.builder.skip(f"{kind}.no_user")
            return None
        if user_id == "-1":  # the "Community" bot account, not a person
            self.builder.skip(f"{kind}.community_user")
            return None
        account = self.accounts.get(user_id)
        return f"account:{account}" if account else f"{self.site}:{user_id}"

    def event(self, user_id: str | None, question_id: int, timestamp: int, action: str) -> None:
        user = self.user_key(user_id, action)
        if user is not None:
            self.builder.add_event(user, self.note_id(question_id), timestamp, action)
            self.counts[f"events_{action}"] += 1

    def run(self) -> dict[str, Any]:
        answers = self._read_posts()
        self._add_answers(answers)
        for name, handler in (("Comments.xml", self._comment), ("Votes.xml", self._vote),
                              ("PostLinks.xml", self._link)):
            path = _dump_file(self.site_dir, name)
            for row in iter_rows(path) if path else ():
                handler(row)
        files = sorted(p.name for p in self.site_dir.iterdir() if p.suffix.lower() == ".xml")
        return {"category": self.category, "files": files, "users_with_account_id": len(self.accounts),
                **dict(sorted(self.counts.items()))}

    def _read_posts(self) -> list[dict[str, Any]]:
        """Questions -> notes + ask events; answers are returned to be resolved once all questions are known."""
        answers = []
        for row in iter_rows(_dump_file(self.site_dir, "Posts.xml")):
            post_type = row.get("PostTypeId")
            if post_type == "1":
                self._question(row)
            elif post_type == "2":
                fields = _parse_fields(row, {"Id": int, "ParentId": int, "CreationDate": _timestamp}, "answer",
                                       self.builder)
                if fields:
                    answers.append({**fields, "OwnerUserId": row.get("OwnerUserId")})
            else:
                self.builder.skip("post.not_question_or_answer")
        return answers

    def _question(self, row: Mapping[str, str]) -> None:
        fields = _parse_fields(row, {"Id": int, "CreationDate": _timestamp}, "question", self.builder)
        if not fields:
            return
        views = row.get("ViewCount", "")
        note = {
            "note_id": self.note_id(fields["Id"]),
            "title": " ".join(row.get("Title", "").split()),
            "content": html_to_text(row.get("Body", "")),
            "topics": parse_tags(row.get("Tags", "")),
            "category": self.category,
            "created_at": fields["CreationDate"],
            "exposure": int(views) if views.isdigit() else -1,
        }
        if self.builder.add_note(note):
            self.counts["questions"] += 1
            self.thread_of[fields["Id"]] = fields["Id"]
            self.event(row.get("OwnerUserId"), fields["Id"], fields["CreationDate"], "ask")

    def _add_answers(self, answers: list[dict[str, Any]]) -> None:
        for answer in answers:
            question = self.thread_of.get(answer["ParentId"])
            if question is None or question != answer["ParentId"]:
                self.builder.skip("answer.unknown_question")
                continue
            self.thread_of[answer["Id"]] = question
            self.counts["answers"] += 1
            self.event(answer["OwnerUserId"], question, answer["CreationDate"], "answer")

    def _comment(self, row: Mapping[str, str]) -> None:
        fields = _parse_fields(row, {"PostId": int, "CreationDate": _timestamp}, "comment", self.builder)
        if not fields:
            return
        question = self.thread_of.get(fields["PostId"])
        if question is None:
            self.builder.skip("comment.not_on_question_thread")
            return
        self.event(row.get("UserId"), question, fields["CreationDate"], "comment")

    def _vote(self, row: Mapping[str, str]) -> None:
        if row.get("VoteTypeId") != "5":
            self.builder.skip("vote.not_favorite")
            return
        fields = _parse_fields(row, {"PostId": int, "CreationDate": _timestamp}, "favorite", self.builder)
        if not fields:
            return
        if self.thread_of.get(fields["PostId"]) != fields["PostId"]:
            self.builder.skip("favorite.not_on_question")
            return
        self.event(row.get("UserId"), fields["PostId"], fields["CreationDate"], "favorite")

    def _link(self, row: Mapping[str, str]) -> None:
        fields = _parse_fields(row, {"PostId": int, "RelatedPostId": int, "LinkTypeId": str}, "link", self.builder)
        if not fields:
            return
        a, b = fields["PostId"], fields["RelatedPostId"]
        if self.thread_of.get(a) != a or self.thread_of.get(b) != b:
            self.builder.skip("link.not_between_questions")
            return
        self.counts["links"] += 1
        link_type = self.LINK_TYPES.get(fields["LinkTypeId"], f"type_{fields['LinkTypeId']}")
        self.builder.add_link(self.note_id(a), self.note_id(b), link_type)


def import_stackexchange(root: Path, sites: list[str], builder: StoreBuilder) -> dict[str, Any]:
    """Import every site folder under `root` (or the listed `sites`); returns per-site counts.

    Note ids are "<site folder>/<question Id>" (two betas of one site have overlapping Ids), the
    category is the site name. Events: ask (question owner, question time), answer (answer owner on
    the parent question, answer time), comment (commenter on the question of the commented post),
    favorite (VoteTypeId=5 voter; old dumps store the vote day only, i.e. midnight UTC). The Community
    bot (UserId -1) and rows without a user are counted, not turned into events.
    """
    return {"sites": {d.name: _SiteImporter(d, builder).run() for d in stackexchange_site_dirs(root, sites)}}


# ----------------------------------------------------------------------------- reference CSV

CSV_NOTE_COLUMNS = ("note_id", "title", "content", "image_id", "category")
# Inline hashtags "#tag#" (Xiaohongshu topics may end in "[话题]", which is not part of the tag).
HASHTAG = re.compile(r"#([^#\s]+)#")


def split_hashtags(content: str) -> tuple[str, list[str]]:
    """Content with its inline #tag# hashtags removed (they are the hashtag task's answers) and the tags."""
    topics = [t.removesuffix("[话题]") for t in HASHTAG.findall(content)]
    return " ".join(HASHTAG.sub(" ", content).split()), topics


def _read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each CSV row, after checking the header names every required column."""
    csv.field_size_limit(2**31 - 1)  # note contents can exceed the 128 KiB default
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for column in required:
                if column not in header:
                    raise InputFormatError(f"{path}: missing column {column!r} (header: {header})")
            for row in reader:
                if None in row or any(row[c] is None for c in required):
                    raise InputFormatError(f"{path}:{reader.line_num}: row has {len(row)} fields, header has "
                                           f"{len(header)}")
                yield reader.line_num, row
    except UnicodeDecodeError:
        raise InputFormatError(f"{path}: not UTF-8 at {_utf8_error(path)}") from None


def import_reference_csv(folder: Path, builder: StoreBuilder, category_depth: int) -> dict[str, Any]:
    """Import notes_*.csv and note_pairs_*.csv (the reference code's format) from `folder`.

    category = the first `category_depth` levels of the '@'-joined path (0 = whole path). The CSV has
    no dates: created_at is an optional column, else the note's ordinal over the files in name order
    (so a time split becomes a split by file order). exposure: optional column, else -1. image_id
    is not stored. note_pairs files: the first two columns are note ids (an optional `score` column,
    else 1.0); they become given pairs.
    """
    note_files = sorted(folder.glob("notes_*.csv"))
    if not note_files:
        raise MissingInputError(f"{folder}: no notes_*.csv files")
    ordinal = 0
    for path in note_files:
        for line, row in _read_csv(path, CSV_NOTE_COLUMNS):
            content, topics = split_hashtags(row["content"])
            path_levels = row["category"].split("@")
            try:
                created_at = int(row["created_at"]) if row.get("created_at") else ordinal
                exposure = int(row["exposure"]) if row.get("exposure") else -1
            except ValueError as e:
                raise InputFormatError(f"{path}:{line}: {e}") from None
            builder.add_note({"note_id": row["note_id"], "title": row["title"].strip(), "content": content,
                              "topics": topics, "category": "@".join(path_levels[:category_depth or None]),
                              "created_at": created_at, "exposure": exposure})
            ordinal += 1
    pair_files = sorted(folder.glob("note_pairs_*.csv"))
    for path in pair_files:
        _import_pair_csv(path, builder)
    return {"note_files": [p.name for p in note_files], "pair_files": [p.name for p in pair_files]}


def _import_pair_csv(path: Path, builder: StoreBuilder) -> None:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if len(header) < 2:
        raise InputFormatError(f"{path}: needs two note id columns, header is {header}")
    for line, row in _read_csv(path, tuple(header[:2])):
        try:
            score = float(row["score"]) if row.get("score") else 1.0
        except ValueError as e:
            raise InputFormatError(f"{path}:{line}: {e}") from None
        builder.add_given_pair(row[header[0]], row[header[1]], score)


# ----------------------------------------------------------------------------- generic JSONL


def _read_jsonl(path: Path, required: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a bad line or a missing field raises with file:line."""
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputFormatError(f"{path}:{line_number}:{e.colno}: invalid JSON: {e.msg}") from None
                missing = [k for k in required if k not in record]
                if missing:
                    raise InputFormatError(f"{path}:{line_number}: missing field(s) {missing}")
                yield record
    except UnicodeDecodeError:
        raise InputFormatError(f"{path}: not UTF-8 at {_utf8_error(path)}") from None


def import_generic(folder: Path, builder: StoreBuilder) -> dict[str, Any]:
    """Import notes.jsonl (store fields; exposure optional, -1) and, if present, events.jsonl."""
    notes_path, events_path = folder / "notes.jsonl", folder / "events.jsonl"
    if not notes_path.is_file():
        raise MissingInputError(f"{notes_path} not found")
    required = tuple(n for n in store.NOTES_SCHEMA.names if n != "exposure")
    for record in _read_jsonl(notes_path, required):
        builder.add_note({**{"exposure": -1}, **{k: record[k] for k in record if k in store.NOTES_SCHEMA.names}})
    if events_path.is_file():
        for record in _read_jsonl(events_path, tuple(store.EVENTS_SCHEMA.names)):
            builder.add_event(str(record["user_id"]), str(record["note_id"]), int(record["timestamp"]),
                              str(record["action"]))
    return {"events_file": events_path.is_file()}


# ----------------------------------------------------------------------------- entry point


def import_source(config: Config, data_dir: Path) -> dict[str, Any]:
    """Run the importer named by config.data.source on config.data.input_path; write the store into data_dir."""
    source = config.data.source
    folder = config.resolve(config.data.input_path)
    importers: dict[str, Callable[[StoreBuilder], dict[str, Any]]] = {
        "stackexchange": lambda b: import_stackexchange(folder, config.data.sites, b),
        "reference_csv": lambda b: import_reference_csv(folder, b, config.data.csv_category_depth),
        "generic": lambda b: import_generic(folder, b),
    }
    if source not in importers:
        raise ValueError(f"data.source={source!r}: expected one of {sorted(importers)}")
    builder = StoreBuilder(data_dir)
    try:
        details = importers[source](builder)
    except BaseException:
        builder.abort()
        raise
    return {"source": source, "input": str(folder), **builder.finish(), **details}


__all__ = ["InputFormatError", "StoreBuilder", "html_to_text", "parse_tags", "site_category", "iter_rows",
           "import_stackexchange", "import_reference_csv", "import_generic", "import_source", "split_hashtags"]
