"""The real Stack Exchange dumps under the shared folder, imported whole, against the counts in SOURCES.md."""
from notellm_jax.data import store
from notellm_jax.data.importers import stackexchange
from notellm_jax.data.importers.builder import StoreBuilder


def test_real_stackexchange_counts_match_sources_md(shared_dir, tmp_path):
    """All 16 real site folders: totals equal SOURCES.md's table; every answer/comment/favourite is an event
    or a counted skip."""
    builder = StoreBuilder(tmp_path / "out")
    details = stackexchange.import_stackexchange(shared_dir / "data" / "stackexchange", [], builder)
    stats = {**builder.finish(str(shared_dir / "data" / "stackexchange")), **details}
    out = {"notes": store.read_note_table(tmp_path / "out" / "notes.parquet").to_pylist()}
    skipped = stats["skipped"]
    assert stats["notes_written"] == 5930 and len(stats["sites"]) == 16
    actions = stats["events_per_action"]
    assert actions["answer"] + skipped["answer.no_user"] + skipped.get("answer.unknown_question", 0) == 12677
    assert actions["comment"] + sum(v for k, v in skipped.items() if k.startswith("comment.")) == 20502
    assert actions["favorite"] + skipped.get("favorite.not_on_question", 0) + skipped.get("favorite.no_user", 0) \
        == 2759
    assert stats["links_written"] + skipped.get("link.duplicate", 0) == 723
    categories = {n["category"] for n in out["notes"]}
    assert "sexuality" in categories and "economics" in categories and len(categories) == 15
    assert all(n["title"] and n["content"] and n["topics"] for n in out["notes"])
