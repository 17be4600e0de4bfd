"""The store, on SQLite and on a real PostgreSQL server: records, feedback, idempotency,
validation against stored completions, pagination, concurrency, migrations."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from server.errors import IdempotencyConflict, InvalidRequest, NotFound
from server.store import ANONYMOUS_KEY, ChoiceRecord, CompletionRecord, FeedbackCreate, Store
from server.store.database import migrate


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store.open(store_url)
    yield s
    s.close()


def completion(
    cid: str, prompt: str = "P", model: str = "m", n: int = 1, key_id: str = ANONYMOUS_KEY
) -> CompletionRecord:
    """A stored completion; ``key_id``: whose (the caller of an app without keys is
    ``anonymous``)."""
    return CompletionRecord(
        id=cid,
        created_at=time.time(),
        endpoint="chat",
        model=model,
        family="chat",
        template_fingerprint="f" * 16,
        request=[{"role": "user", "content": prompt}],
        prompt_text=f"<user>{prompt}<assistant>",
        sampling={"temperature": 0.0},
        choices=[ChoiceRecord(i, f"answer {i} to {prompt}", "stop") for i in range(n)],
        prompt_tokens=5,
        completion_tokens=3 * n,
        latency_ms=12.5,
        key_id=key_id,
    )


async def test_completion_round_trip(store: Store) -> None:
    store.record_completion(completion("c1", n=2)).result(timeout=10)
    record, feedback = await store.get_completion("c1")
    assert record.request == [{"role": "user", "content": "P"}]
    assert [c.text for c in record.choices] == ["answer 0 to P", "answer 1 to P"]
    assert record.sampling == {"temperature": 0.0}
    assert feedback == []
    with pytest.raises(NotFound):
        await store.get_completion("missing")


async def test_feedback_is_stored_and_shown_with_its_completion(store: Store) -> None:
    store.record_completion(completion("c1")).result(timeout=10)
    row, created = await store.add_feedback(
        FeedbackCreate(completion_id="c1", judgment="Too vague.", annotator="ann-1")
    )
    assert created and row.id.startswith("fb-") and row.model == "m"
    _, feedback = await store.get_completion("c1")
    assert [(f.id, f.judgment, f.annotator) for f in feedback] == [(row.id, "Too vague.", "ann-1")]


async def test_idempotency(store: Store) -> None:
    store.record_completion(completion("c1")).result(timeout=10)
    fb = FeedbackCreate(completion_id="c1", rating=5, rating_scale="stars", idempotency_key="k")
    first, created = await store.add_feedback(fb)
    again, created_again = await store.add_feedback(fb)
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        await store.add_feedback(
            FeedbackCreate(completion_id="c1", rating=1, rating_scale="stars", idempotency_key="k")
        )
    # The same key under another API key is another record.
    other, created_other = await store.add_feedback(
        FeedbackCreate(
            completion_id="c1", rating=5, rating_scale="stars", idempotency_key="k", key_id="key-2"
        )
    )
    assert created_other and other.id != first.id
    rows, _ = await store.list_feedback()
    assert len(rows) == 2


async def test_concurrent_duplicates_store_one_row(store: Store) -> None:
    store.record_completion(completion("c1")).result(timeout=10)
    fb = FeedbackCreate(completion_id="c1", label="desirable", idempotency_key="same")
    results = await asyncio.gather(*(store.add_feedback(fb) for _ in range(20)))
    assert len({row.id for row, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_feedback_is_checked_against_the_stored_completion(store: Store) -> None:
    store.record_completion(completion("c1", prompt="A")).result(timeout=10)
    store.record_completion(completion("c2", prompt="A")).result(timeout=10)
    store.record_completion(completion("c3", prompt="B")).result(timeout=10)
    store.record_completion(completion("c4", prompt="A", model="other")).result(timeout=10)
    with pytest.raises(NotFound) as missing:
        await store.add_feedback(FeedbackCreate(completion_id="nope", rating=1))
    assert missing.value.param == "completion_id"
    with pytest.raises(InvalidRequest) as out_of_range:
        await store.add_feedback(FeedbackCreate(completion_id="c1", choice_index=1, rating=1))
    assert out_of_range.value.param == "choice_index"
    with pytest.raises(InvalidRequest, match="same prompt"):
        await store.add_feedback(FeedbackCreate(completion_id="c1", preferred_over="c3"))
    with pytest.raises(NotFound):
        await store.add_feedback(FeedbackCreate(completion_id="c1", preferred_over="nope"))
    with pytest.raises(InvalidRequest, match="itself"):
        await store.add_feedback(FeedbackCreate(completion_id="c1", preferred_over="c1"))
    row, _ = await store.add_feedback(FeedbackCreate(completion_id="c1", preferred_over="c2"))
    assert row.preferred_over == "c2"
    # Side by side: another model, the same rendered prompt.
    across, _ = await store.add_feedback(FeedbackCreate(completion_id="c4", preferred_over="c1"))
    # Refused feedback left nothing behind.
    rows, _ = await store.list_feedback()
    assert {r.id for r in rows} == {row.id, across.id}


async def test_listing_filters_and_cursor_pagination(store: Store) -> None:
    store.record_completion(completion("c1", model="a")).result(timeout=10)
    store.record_completion(completion("c2", model="b")).result(timeout=10)
    ids = []
    for i in range(7):
        row, _ = await store.add_feedback(
            FeedbackCreate(
                completion_id="c1" if i % 2 == 0 else "c2",
                label="desirable" if i < 5 else "undesirable",
            )
        )
        ids.append(row.id)
    pages, cursor = [], None
    while True:
        rows, cursor = await store.list_feedback(limit=3, after=cursor)
        pages.append([r.id for r in rows])
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == ids  # oldest first, nothing lost or repeated
    only_a, _ = await store.list_feedback(model="a")
    assert [r.id for r in only_a] == ids[0::2]
    bad, _ = await store.list_feedback(label="undesirable")
    assert [r.id for r in bad] == ids[5:]
    middle = (await store.list_feedback())[0][3].created_at
    recent, _ = await store.list_feedback(since=middle)
    assert [r.id for r in recent] == ids[3:]
    with pytest.raises(InvalidRequest):
        await store.list_feedback(after="not-a-cursor")


async def test_many_concurrent_writes_all_land(store: Store) -> None:
    store.record_completion(completion("c1")).result(timeout=10)
    results = await asyncio.gather(
        *(
            store.add_feedback(FeedbackCreate(completion_id="c1", rating=1, idempotency_key=str(i)))
            for i in range(200)
        )
    )
    assert all(created for _, created in results)
    rows, _ = await store.list_feedback(limit=1000)
    assert sorted(r.idempotency_key for r in rows) == sorted(str(i) for i in range(200))


def test_migrations_apply_once(store_url: str) -> None:
    first = Store.open(store_url)
    assert migrate(first.engine) == []  # open() applied everything already
    first.close()
    second = Store.open(store_url)
    assert migrate(second.engine) == []
    second.close()


async def test_export_rows_join_feedback_and_completions(store: Store) -> None:
    store.record_completion(completion("c1", prompt="A")).result(timeout=10)
    store.record_completion(completion("c2", prompt="A")).result(timeout=10)
    await store.add_feedback(FeedbackCreate(completion_id="c1", preferred_over="c2"))
    rows, records = store.export_rows()
    assert [r.completion_id for r in rows] == ["c1"]
    assert set(records) == {"c1", "c2"}


def test_sqlite_is_durable_by_configuration(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    s = Store.open(f"sqlite:///{tmp_path / 'd.db'}")
    with s.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    s.close()


async def test_trust_comes_from_the_key_not_the_annotator_label(store: Store) -> None:
    """A key that posts under a trusted annotator's name does not pass the online loop's
    gate; the trusted key's judgments do, whatever label they carry."""
    store.record_completion(completion("c1")).result(timeout=10)
    await store.add_feedback(
        FeedbackCreate(completion_id="c1", judgment="Poison.", annotator="alice", key_id="mallory")
    )
    await store.add_feedback(
        FeedbackCreate(completion_id="c1", judgment="Too vague.", annotator="x", key_id="alice")
    )
    rows, _ = store.export_rows(trusted=["alice"])
    assert [(r.judgment, r.key_id) for r in rows] == [("Too vague.", "alice")]
    assert store.export_rows(trusted=[])[0] == []  # reviewed only: none are


async def test_feedback_is_numbered_in_commit_order(store: Store) -> None:
    store.record_completion(completion("c1")).result(timeout=10)
    before = store.feedback_watermark()
    rows = [
        (await store.add_feedback(FeedbackCreate(completion_id="c1", rating=1)))[0]
        for _ in range(3)
    ]
    assert [r.seq for r in rows] == [before + 1, before + 2, before + 3]
    assert store.feedback_watermark() == before + 3
    window, _ = store.export_rows(after_seq=before + 1, through_seq=before + 3)
    assert [r.id for r in window] == [rows[1].id, rows[2].id]


def test_a_judgment_committed_after_an_export_falls_in_the_next_window(store: Store) -> None:
    """A write stamped (created_at) before the export's read but committed after it: a
    wall-clock window ``created_at < until`` would have lost it to both iterations; the
    commit-ordered watermark puts it in the next one."""
    import threading

    from server.store.records import FeedbackRow
    from server.store.schema import FEEDBACK_SEQUENCE, feedback
    from server.store.store import _feedback_values, _next_seq

    store.record_completion(completion("c1")).result(timeout=10)
    stamped = time.time() - 60  # well before the export below
    numbered, release, done = threading.Event(), threading.Event(), threading.Event()

    def slow_writer() -> None:
        with store.engine.begin() as conn:  # one transaction, held open across the export
            row = FeedbackRow(
                id="fb-late",
                created_at=stamped,
                completion_id="c1",
                choice_index=0,
                model="m",
                judgment="Late but real.",
                rating=None,
                rating_scale=None,
                label=None,
                preferred_over=None,
                annotator=None,
                key_id=ANONYMOUS_KEY,
                idempotency_key=None,
                payload_hash="h",
                seq=_next_seq(conn, FEEDBACK_SEQUENCE),
            )
            conn.execute(feedback.insert().values(**_feedback_values(row)))
            numbered.set()
            release.wait(timeout=30)
        done.set()

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert numbered.wait(timeout=30)
    # The first iteration's export runs while the write is numbered but not committed.
    until = time.time()
    first_mark = store.feedback_watermark()
    first, _ = store.export_rows(through_seq=first_mark)
    assert [r.id for r in first] == []
    release.set()
    writer.join(timeout=30)
    assert done.is_set()
    # The old rule would now miss it for good: it is stamped before the first window's end.
    assert [r.id for r in store.export_rows(since=until)[0]] == []
    second, _ = store.export_rows(after_seq=first_mark, through_seq=store.feedback_watermark())
    assert [r.id for r in second] == ["fb-late"]


def test_migration_numbers_feedback_of_an_older_database(store_url: str) -> None:
    """A database from before m002 (no sequence, no token ids) is upgraded in place: its
    feedback is numbered in creation order and new feedback continues after it."""
    from sqlalchemy import delete, text

    from server.store.database import open_engine
    from server.store.schema import MIGRATIONS, completions, feedback, migrations_table

    engine = open_engine(store_url)
    with engine.begin() as conn:
        migrations_table.create(conn, checkfirst=True)
        MIGRATIONS[0][1](conn)  # m001 only ...
        conn.execute(migrations_table.insert().values(name=MIGRATIONS[0][0], applied_at=0.0))
        for table, column in [
            ("feedback", "seq"),
            ("feedback", "preferred_over_choice"),
            ("completions", "prompt_token_ids"),
            ("completions", "prompt_bos"),
        ]:  # ... and the tables as m001 made them before these columns existed
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(
            text(
                "INSERT INTO completions (id, created_at, endpoint, model, family, "
                "template_fingerprint, request, prompt_text, sampling, choices, prompt_tokens, "
                "completion_tokens, latency_ms, status) VALUES ('c1', 1.0, 'chat', 'm', 'chat', "
                "'f', '[]', 'P', '{}', '[{\"index\": 0, \"text\": \"a\", \"finish_reason\": "
                "\"stop\"}]', 1, 1, 1.0, 'finished')"
            )
        )
        for i, at in enumerate([30.0, 10.0, 20.0]):
            conn.execute(
                text(
                    "INSERT INTO feedback (id, created_at, completion_id, choice_index, model, "
                    "key_id, payload_hash, reviewed) VALUES "
                    f"('fb-{i}', {at}, 'c1', 0, 'm', 'anonymous', 'h', false)"
                )
            )
    engine.dispose()
    store = Store.open(store_url)  # applies m002
    try:
        rows, records = store.export_rows()
        assert [(r.id, r.seq) for r in rows] == [("fb-1", 1), ("fb-2", 2), ("fb-0", 3)]
        assert records["c1"].prompt_token_ids is None and records["c1"].choices[0].token_ids is None
        assert store.feedback_watermark() == 3
        row, _ = asyncio.run(store.add_feedback(FeedbackCreate(completion_id="c1", rating=1)))
        assert row.seq == 4
    finally:
        with store.engine.begin() as conn:
            conn.execute(delete(feedback))
            conn.execute(delete(completions))
        store.close()


async def test_a_preference_names_the_losing_choice_of_the_same_prompt(store: Store) -> None:
    """``preferred_over_choice`` says which choice lost; a request with several prompts
    pairs only choices of one prompt."""
    several = completion("multi", n=2)
    several.endpoint = "completions"
    several.choices = [
        ChoiceRecord(0, "x", "stop", prompt_text="first prompt"),
        ChoiceRecord(1, "y", "stop", prompt_text="second prompt"),
    ]
    store.record_completion(several).result(timeout=10)
    store.record_completion(completion("pair", n=3)).result(timeout=10)
    row, _ = await store.add_feedback(
        FeedbackCreate(
            completion_id="pair", choice_index=2, preferred_over="pair", preferred_over_choice=0
        )
    )
    assert (row.preferred_over, row.preferred_over_choice, row.rejected_choice) == ("pair", 0, 0)
    with pytest.raises(InvalidRequest, match="itself"):
        await store.add_feedback(
            FeedbackCreate(
                completion_id="pair", choice_index=1, preferred_over="pair", preferred_over_choice=1
            )
        )
    with pytest.raises(InvalidRequest, match="out of range"):
        await store.add_feedback(
            FeedbackCreate(completion_id="pair", preferred_over="pair", preferred_over_choice=3)
        )
    with pytest.raises(InvalidRequest, match="same prompt"):
        await store.add_feedback(
            FeedbackCreate(
                completion_id="multi",
                choice_index=0,
                preferred_over="multi",
                preferred_over_choice=1,
            )
        )
    with pytest.raises(InvalidRequest, match="needs preferred_over"):
        await store.add_feedback(
            FeedbackCreate(completion_id="pair", rating=1, preferred_over_choice=1)
        )


async def test_an_explicit_reward_round_trips(store: Store) -> None:
    store.record_completion(completion("c1", n=2)).result(timeout=10)
    rated = FeedbackCreate(completion_id="c1", rating=1, rating_scale="thumbs")
    # No reward: the payload (and so a replay's hash) is what it was before the field.
    assert "reward" not in rated.payload()
    row, _ = await store.add_feedback(
        FeedbackCreate(completion_id="c1", choice_index=1, reward=-2.5, idempotency_key="x")
    )
    assert (row.explicit_reward, row.reward(), row.polarity()) == (-2.5, -2.5, None)
    await store.add_feedback(rated)
    _, feedback = await store.get_completion("c1")
    assert [(f.explicit_reward, f.reward()) for f in feedback] == [(-2.5, -2.5), (None, 1.0)]
    rows, _ = store.export_rows()
    assert [r.explicit_reward for r in rows] == [-2.5, None]
    again, created = await store.add_feedback(
        FeedbackCreate(completion_id="c1", choice_index=1, reward=-2.5, idempotency_key="x")
    )
    assert not created and again.id == row.id
    with pytest.raises(IdempotencyConflict):
        await store.add_feedback(
            FeedbackCreate(completion_id="c1", choice_index=1, reward=3.0, idempotency_key="x")
        )


def test_m006_adds_the_reward_column_to_an_older_database(store_url: str) -> None:
    """A database at m005 (feedback without ``reward``) gains the column; its rows read
    as having no explicit reward, and new rows store one."""
    from sqlalchemy import delete, inspect, text

    from server.store.database import open_engine
    from server.store.schema import MIGRATIONS, completions, feedback, migrations_table

    engine = open_engine(store_url)
    with engine.begin() as conn:
        migrations_table.create(conn, checkfirst=True)
        for name, apply in MIGRATIONS[:5]:  # m001 … m005
            apply(conn)
            conn.execute(migrations_table.insert().values(name=name, applied_at=0.0))
        # m001 builds today's table; without the column, it is the table as m005 left it.
        conn.execute(text("ALTER TABLE feedback DROP COLUMN reward"))
    assert "reward" not in {c["name"] for c in inspect(engine).get_columns("feedback")}
    engine.dispose()
    store = Store.open(store_url)
    try:
        store.record_completion(completion("c1")).result(timeout=10)
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO feedback (id, created_at, completion_id, choice_index, model, "
                    "label, key_id, payload_hash, reviewed, seq) VALUES "
                    "('fb-old', 1.0, 'c1', 0, 'm', 'desirable', 'anonymous', 'h', false, 0)"
                )
            )
        assert migrate(store.engine) == []
        row, _ = asyncio.run(store.add_feedback(FeedbackCreate(completion_id="c1", reward=0.25)))
        rows, _ = store.export_rows()
        assert [(r.id, r.explicit_reward, r.reward()) for r in rows] == [
            ("fb-old", None, 1.0),
            (row.id, 0.25, 0.25),
        ]
    finally:
        with store.engine.begin() as conn:
            conn.execute(delete(feedback))
            conn.execute(delete(completions))
        store.close()
