"""The store behind OpenAI's Stored Completions API, on SQLite and on a real PostgreSQL
server: metadata stored with a record, listed by cursor and filter, replaced, and deletion
(with what derives from it; refused while reviewed feedback or a battle holds it)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import inspect

from server.errors import Conflict, NotFound
from server.store import FeedbackCreate, Store
from server.store.database import migrate, open_engine
from server.store.records import JudgeCallRow
from tests.test_store import completion

ALICE = "alice"
BOB = "bob"


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store.open(store_url)
    yield s
    s.close()


def put(store: Store, cid: str, *, at: float, metadata=None, **kwargs) -> None:  # type: ignore[no-untyped-def]
    record = dataclasses.replace(completion(cid, **kwargs), created_at=at, metadata=metadata)
    store.record_completion(record).result(timeout=10)


async def test_metadata_is_stored_with_the_record(store: Store) -> None:
    pairs = {"topic": "geo", 'odd "key".with.dots': "v" * 512}
    put(store, "c1", at=1.0, metadata=pairs, key_id=ALICE)
    put(store, "c2", at=2.0, key_id=ALICE)
    assert (await store.get_chat_completion("c1", owner=ALICE)).metadata == pairs
    assert (await store.get_chat_completion("c2", owner=ALICE)).metadata == {}
    record, _ = await store.get_completion("c1", owner=ALICE)
    assert record.metadata == pairs
    with pytest.raises(NotFound):
        await store.get_chat_completion("c1", owner=BOB)
    assert (await store.get_chat_completion("c1")).id == "c1"  # the admin: any key's
    text = dataclasses.replace(completion("t1", key_id=ALICE), endpoint="completions")
    store.record_completion(text).result(timeout=10)
    with pytest.raises(NotFound):  # text completions are not chat completions
        await store.get_chat_completion("t1", owner=ALICE)


async def test_listing_filters_orders_and_pages(store: Store) -> None:
    for i in range(5):
        put(
            store,
            f"c{i}",
            at=10.0 + i,
            model="m" if i % 2 == 0 else "other",
            metadata={"run": "a" if i < 3 else "b", "i": str(i), 'k"q': "x"},
            key_id=ALICE,
        )
    put(store, "bob1", at=11.5, key_id=BOB)
    text = dataclasses.replace(completion("t1", key_id=ALICE), endpoint="completions")
    store.record_completion(text).result(timeout=10)

    async def ids(**kwargs) -> tuple[list[str], bool]:  # type: ignore[no-untyped-def]
        records, more = await store.list_chat_completions(**kwargs)
        return [r.id for r in records], more

    assert await ids(owner=ALICE) == (["c0", "c1", "c2", "c3", "c4"], False)
    assert await ids(owner=ALICE, newest_first=True, limit=2) == (["c4", "c3"], True)
    assert await ids(owner=ALICE, newest_first=True, limit=2, after="c3") == (["c2", "c1"], True)
    assert await ids(owner=ALICE, limit=2, after="c3") == (["c4"], False)
    assert await ids(owner=ALICE, model="m") == (["c0", "c2", "c4"], False)
    assert await ids(owner=ALICE, metadata={"run": "a"}) == (["c0", "c1", "c2"], False)
    assert await ids(owner=ALICE, metadata={"run": "a", "i": "1"}) == (["c1"], False)
    assert await ids(owner=ALICE, metadata={'k"q': "x", "run": "b"}) == (["c3", "c4"], False)
    assert await ids(owner=ALICE, metadata={"run": "c"}) == ([], False)
    assert await ids(owner=ALICE, model="other", metadata={"run": "a"}) == (["c1"], False)
    assert await ids(owner=BOB) == (["bob1"], False)
    assert (await ids())[0] == ["c0", "c1", "bob1", "c2", "c3", "c4"]  # the admin
    records, _ = await store.list_chat_completions(owner=ALICE, limit=1)
    assert records[0].metadata == {"run": "a", "i": "0", 'k"q': "x"}
    for foreign in ("bob1", "t1", "missing"):  # a cursor the caller cannot see
        with pytest.raises(NotFound) as refused:
            await store.list_chat_completions(owner=ALICE, after=foreign)
        assert refused.value.param == "after"


async def test_update_replaces_metadata(store: Store) -> None:
    put(store, "c1", at=1.0, metadata={"a": "1", "b": "2"}, key_id=ALICE)
    updated = await store.update_chat_metadata("c1", {"b": "3", "c": "4"}, owner=ALICE)
    assert updated.metadata == {"b": "3", "c": "4"}
    assert (await store.get_chat_completion("c1")).metadata == {"b": "3", "c": "4"}
    records, _ = await store.list_chat_completions(owner=ALICE, metadata={"a": "1"})
    assert records == []
    with pytest.raises(NotFound):
        await store.update_chat_metadata("c1", {"x": "y"}, owner=BOB)
    assert (await store.update_chat_metadata("c1", None, owner=None)).metadata == {}


def _judge_call(cid: str, verdict: dict[str, object]) -> JudgeCallRow:
    return JudgeCallRow(
        id=f"jc-{uuid.uuid4().hex}",
        created_at=time.time(),
        judge="strict",
        kind="pairwise",
        judge_model="m",
        prompt_version="pairwise.txt@abc",
        completion_id=cid,
        choice_index=0,
        other_choice_index=1,
        verdict=verdict,
        raw_replies=[f"Answer A of {cid} is ..."],
        latency_ms=1.0,
        requests=1,
        prompt_tokens=10,
        completion_tokens=5,
        source="live",
    )


async def test_item_11_deleting_a_completion_deletes_what_derives_from_it(store: Store) -> None:
    """Issue 32, item 11: a completion with feedback could not be deleted (409), even when
    the feedback was an AI judge's verdict sampled from live traffic, and an AI judge's tie
    (a call without feedback) outlived the completion it quoted. Now the delete takes with
    it every unreviewed feedback row on it or naming it (people's pending judgments, judges'
    verdicts) and every judge call about it; reviewed feedback (accepted training data) and
    arena battles still hold it (409, nothing deleted)."""
    put(store, "c1", at=1.0, metadata={"a": "1"}, key_id=ALICE)
    for cid, at in (("c2", 2.0), ("c3", 3.0), ("c4", 4.0)):
        put(store, cid, at=at, n=2, key_id=ALICE)
    with pytest.raises(NotFound):
        await store.delete_chat_completion("c1", owner=BOB)
    assert await store.delete_chat_completion("c1", owner=ALICE) == {
        "feedback": 0,
        "judge_calls": 0,
    }
    with pytest.raises(NotFound):
        await store.get_chat_completion("c1")
    with pytest.raises(NotFound):
        await store.delete_chat_completion("c1", owner=ALICE)
    assert (await store.list_chat_completions(metadata={"a": "1"}))[0] == []

    # c2: a person's pending judgment, a judge's verdict, a judge's tie; the rejected side
    # of a preference on c3.
    await store.add_feedback(FeedbackCreate("c2", judgment="Wrong.", key_id=ALICE), owner=ALICE)
    verdict = FeedbackCreate("c2", preferred_over="c2", preferred_over_choice=1, key_id="judge")
    await store.add_judge_call(_judge_call("c2", {"outcome": "a"}), verdict)
    await store.add_judge_call(_judge_call("c2", {"outcome": "tie"}), None)
    await store.add_feedback(FeedbackCreate("c3", preferred_over="c2", key_id=ALICE), owner=ALICE)
    await store.add_judge_call(_judge_call("c4", {"outcome": "tie"}), None)
    assert await store.delete_chat_completion("c2", owner=ALICE) == {
        "feedback": 3,
        "judge_calls": 2,
    }
    assert await store.list_judge_calls(completion_id="c2") == []
    left, _ = await store.list_feedback()
    assert left == []  # c3's preference named c2: it went too
    assert len(await store.list_judge_calls(completion_id="c4")) == 1  # another's stays

    # Reviewed feedback is training data: the delete is refused and nothing goes.
    row, _ = await store.add_feedback(FeedbackCreate("c3", rating=1, key_id=ALICE), owner=ALICE)
    await store.add_feedback(FeedbackCreate("c3", judgment="Pending.", key_id=ALICE), owner=ALICE)
    await store.set_reviewed([row.id], True)
    with pytest.raises(Conflict, match="reviewed feedback"):
        await store.delete_chat_completion("c3", owner=None)
    assert (await store.get_chat_completion("c3")).id == "c3"
    _, feedback = await store.get_completion("c3")
    assert len(feedback) == 2


async def test_a_database_from_before_metadata_gains_the_table(store_url: str) -> None:
    from alembic import command

    from server.store.database import alembic_config

    engine = open_engine(store_url)
    config = alembic_config()
    with engine.connect() as conn:  # a database as the revisions before m003 left it
        config.attributes["connection"] = conn
        command.upgrade(config, "m002")
        conn.commit()
    assert "completion_metadata" not in inspect(engine).get_table_names()
    assert migrate(engine)[0] == "m003"
    assert "completion_metadata" in inspect(engine).get_table_names()
    engine.dispose()
    s = Store.open(store_url)
    try:
        put(s, "c1", at=1.0, metadata={"a": "1"})
        records, _ = await s.list_chat_completions(metadata={"a": "1"})
        assert [r.id for r in records] == ["c1"]
    finally:
        s.close()


async def test_a_read_waits_for_the_record_queued_before_it(store: Store) -> None:
    """The gateway answers before its record commits; a client that retrieves or lists right
    after its answer still finds it."""
    gate = threading.Event()
    store._writer.submit(lambda conn: gate.wait(10))  # the writer is busy
    put_queued = dataclasses.replace(completion("c1"), metadata={"a": "1"})
    store.record_completion(put_queued)
    read = asyncio.create_task(store.get_chat_completion("c1"))
    listed = asyncio.create_task(store.list_chat_completions(metadata={"a": "1"}))
    await asyncio.sleep(0.2)
    assert not read.done() and not listed.done()
    gate.set()
    assert (await read).metadata == {"a": "1"}
    assert [r.id for r in (await listed)[0]] == ["c1"]
