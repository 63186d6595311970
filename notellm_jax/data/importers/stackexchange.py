"""Stack Exchange data dumps: a folder of site folders, each with Posts.xml and, where present,
Comments.xml, Votes.xml, PostLinks.xml and Users.xml (old Area 51 dumps use lower-case names).

Questions become notes; asking, answering, commenting (on a question or one of its answers) and
favouriting (VoteTypeId=5 with a UserId) become events on the question (`import_stackexchange`).
Malformed XML raises `InputFormatError` with line and column (and the first bad UTF-8 byte, if any).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from notellm_jax.data.importers.builder import StoreBuilder, parse_timestamp, utf8_error
from notellm_jax.errors import InputFormatError, MissingInputError


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


_SITE_NOTE_ID = re.compile(r"(?P<name>[^/]+?)(?:\.stackexchange)?\.(?:com|net|org)(?P<beta>-\d{4}beta)?/\d+")


def site_of(note_id: str) -> str | None:
    """The site of a note imported here, from its id "<site folder>/<question Id>": "coffee.stackexchange.com/485"
    -> "coffee", "economics.stackexchange.com-2011beta/7" -> "economics-2011beta" (unlike the category, a
    beta keeps its year: it is another site than the later live one). None for an id of any other form."""
    match = _SITE_NOTE_ID.fullmatch(str(note_id))
    return match["name"] + (match["beta"] or "") if match else None


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
        encoding = utf8_error(path)
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
                spec = {"Id": int, "ParentId": int, "CreationDate": parse_timestamp}
                fields = _parse_fields(row, spec, "answer", self.builder)
                if fields:
                    answers.append({**fields, "OwnerUserId": row.get("OwnerUserId")})
            else:
                self.builder.skip("post.not_question_or_answer")
        return answers

    def _question(self, row: Mapping[str, str]) -> None:
        fields = _parse_fields(row, {"Id": int, "CreationDate": parse_timestamp}, "question", self.builder)
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
        fields = _parse_fields(row, {"PostId": int, "CreationDate": parse_timestamp}, "comment", self.builder)
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
        fields = _parse_fields(row, {"PostId": int, "CreationDate": parse_timestamp}, "favorite", self.builder)
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
