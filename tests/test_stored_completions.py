"""OpenAI's Stored Completions API, driven by the official `openai` SDK against the real
gateway: create with metadata, retrieve, list (filters, cursor pages, order), the messages,
update, delete, and OpenAI's metadata limits. Per-key scoping: tests/test_hardening.py."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from tests.conftest import Gateway


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, gateway: Gateway, text: str, **kwargs):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(
        model=gateway.model,
        messages=[{"role": "user", "content": text}],
        max_tokens=4,
        temperature=0,
        **kwargs,
    )


def tag() -> str:
    """A metadata value of this test's own: the session's store is shared."""
    return uuid.uuid4().hex


def test_create_with_metadata_then_retrieve(client: openai.OpenAI, gateway: Gateway) -> None:
    run = tag()
    reply = ask(client, gateway, "Name a colour.", metadata={"run": run, "topic": "colours"})
    got = client.chat.completions.retrieve(reply.id)
    assert (got.id, got.object, got.model) == (reply.id, "chat.completion", reply.model)
    # The record's time is when it was stored, after the answer was generated.
    assert reply.created <= got.created <= reply.created + 60
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == reply.choices[0].message.content
    assert got.choices[0].finish_reason == reply.choices[0].finish_reason
    assert got.usage == reply.usage
    assert got.to_dict()["metadata"] == {"run": run, "topic": "colours"}
    # The gateway's own record view shows the metadata too.
    record = httpx.get(f"{gateway.url}/v1/completions/{reply.id}", timeout=30).json()
    assert record["metadata"] == {"run": run, "topic": "colours"}
    plain = ask(client, gateway, "Hi")
    assert client.chat.completions.retrieve(plain.id).to_dict()["metadata"] == {}


def test_list_filters_pages_and_orders(client: openai.OpenAI, gateway: Gateway) -> None:
    run = tag()
    ids = [
        ask(client, gateway, f"Count to {i}.", metadata={"run": run, "i": str(i)}).id
        for i in range(3)
    ]
    text = client.completions.create(
        model=gateway.model, prompt="One", max_tokens=2, extra_body={"metadata": {"run": run}}
    )
    ask(client, gateway, "Not this one.", metadata={"run": run}, store=False)

    page = client.chat.completions.list(metadata={"run": run})
    assert [c.id for c in page.data] == ids  # oldest first; text completions are not listed
    assert page.has_more is False
    assert [c.to_dict()["metadata"]["i"] for c in page.data] == ["0", "1", "2"]
    first = client.chat.completions.list(metadata={"run": run}, limit=2)
    assert [c.id for c in first.data] == ids[:2] and first.has_more is True
    second = client.chat.completions.list(metadata={"run": run}, limit=2, after=ids[1])
    assert [c.id for c in second.data] == ids[2:] and second.has_more is False
    # The SDK follows the cursor itself.
    assert [c.id for c in client.chat.completions.list(metadata={"run": run}, limit=1)] == ids
    newest = client.chat.completions.list(metadata={"run": run}, order="desc", limit=2)
    assert [c.id for c in newest.data] == ids[::-1][:2]
    both = client.chat.completions.list(metadata={"run": run, "i": "1"}, model=gateway.model)
    assert [c.id for c in both.data] == [ids[1]]
    assert client.chat.completions.list(metadata={"run": run}, model="other").data == []

    raw = httpx.get(
        f"{gateway.url}/v1/chat/completions",
        params={"metadata[run]": run, "limit": 2, "order": "desc"},
        timeout=30,
    ).json()
    assert raw["object"] == "list"
    assert (raw["first_id"], raw["last_id"], raw["has_more"]) == (ids[2], ids[1], True)
    # A text completion is a record (its gateway view stays), not a stored chat completion.
    assert httpx.get(f"{gateway.url}/v1/completions/{text.id}", timeout=30).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(text.id)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.list(after="chatcmpl-nope")
    assert unknown.value.body["param"] == "after"  # type: ignore[index]


def test_messages_are_the_request_as_sent(client: openai.OpenAI, gateway: Gateway) -> None:
    parts = [{"type": "text", "text": "Name "}, {"type": "text", "text": "a fruit."}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": parts},
    ]
    reply = client.chat.completions.create(
        model=gateway.model,
        messages=messages,
        max_tokens=4,  # type: ignore[arg-type]
    )
    page = client.chat.completions.messages.list(reply.id)
    assert [(m.id, m.role, m.content) for m in page.data] == [
        (f"{reply.id}-0", "system", "Be brief."),
        (f"{reply.id}-1", "user", "Hi"),
        (f"{reply.id}-2", "assistant", "Hello."),
        (f"{reply.id}-3", "user", "Name a fruit."),
    ]
    assert page.data[3].to_dict()["content_parts"] == parts
    assert page.data[0].to_dict().get("content_parts") is None
    first = client.chat.completions.messages.list(reply.id, limit=3)
    assert len(first.data) == 3 and first.has_more is True
    walked = client.chat.completions.messages.list(reply.id, limit=1)
    assert [m.id for m in walked] == [f"{reply.id}-{i}" for i in range(4)]
    newest = client.chat.completions.messages.list(reply.id, order="desc", limit=2)
    assert [m.id for m in newest.data] == [f"{reply.id}-3", f"{reply.id}-2"]
    rest = client.chat.completions.messages.list(reply.id, order="desc", after=f"{reply.id}-2")
    assert [m.id for m in rest.data] == [f"{reply.id}-1", f"{reply.id}-0"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.messages.list(reply.id, after=f"{reply.id}-9")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.messages.list("chatcmpl-nope")


def test_update_replaces_metadata(client: openai.OpenAI, gateway: Gateway) -> None:
    run = tag()
    reply = ask(client, gateway, "Hi", metadata={"run": run, "draft": "yes"})
    updated = client.chat.completions.update(reply.id, metadata={"run": run, "verdict": "ok"})
    assert updated.id == reply.id
    assert updated.to_dict()["metadata"] == {"run": run, "verdict": "ok"}
    retrieved = client.chat.completions.retrieve(reply.id).to_dict()
    assert retrieved["metadata"] == {"run": run, "verdict": "ok"}
    assert [c.id for c in client.chat.completions.list(metadata={"verdict": "ok", "run": run})] == [
        reply.id
    ]
    assert list(client.chat.completions.list(metadata={"draft": "yes", "run": run})) == []
    cleared = client.chat.completions.update(reply.id, metadata=None)
    assert cleared.to_dict()["metadata"] == {}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.update("chatcmpl-nope", metadata={"a": "b"})


def test_delete_takes_unreviewed_feedback_and_refuses_reviewed(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    run = tag()
    doomed = ask(client, gateway, "Hi", metadata={"run": run})
    deleted = client.chat.completions.delete(doomed.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (
        doomed.id,
        "chat.completion.deleted",
        True,
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(doomed.id)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.messages.list(doomed.id)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.delete(doomed.id)
    assert httpx.get(f"{gateway.url}/v1/completions/{doomed.id}", timeout=30).status_code == 404
    assert list(client.chat.completions.list(metadata={"run": run})) == []

    # Unreviewed feedback derives from it: it goes with the completion (issue 32, item 11).
    judged = ask(client, gateway, "Hi")
    posted = httpx.post(
        f"{gateway.url}/v1/feedback",
        json={"completion_id": judged.id, "judgment": "Too short."},
        timeout=30,
    )
    assert posted.status_code == 201
    gone = httpx.delete(f"{gateway.url}/v1/chat/completions/{judged.id}", timeout=30).json()
    assert gone["deleted"] and gone["deleted_with_it"] == {"feedback": 1, "judge_calls": 0}
    feedback_ids = [
        f["id"] for f in httpx.get(f"{gateway.url}/v1/feedback", timeout=30).json()["data"]
    ]
    assert posted.json()["id"] not in feedback_ids

    # Reviewed feedback is training data: refused, and it and its feedback stay.
    kept = ask(client, gateway, "Hi")
    posted = httpx.post(
        f"{gateway.url}/v1/feedback",
        json={"completion_id": kept.id, "judgment": "Too short."},
        timeout=30,
    )
    review = httpx.post(
        f"{gateway.url}/admin/feedback/review", json={"ids": [posted.json()["id"]]}, timeout=30
    )
    assert review.status_code == 200, review.text
    with pytest.raises(openai.ConflictError) as refused:
        client.chat.completions.delete(kept.id)
    assert refused.value.body["param"] == "completion_id"  # type: ignore[index]
    assert "reviewed feedback" in refused.value.body["message"]  # type: ignore[index]
    record = httpx.get(f"{gateway.url}/v1/completions/{kept.id}", timeout=30).json()
    assert [f["judgment"] for f in record["feedback"]] == ["Too short."]


def test_metadata_limits(client: openai.OpenAI, gateway: Gateway) -> None:
    at_limits = {f"{i:02d}".ljust(64, "k"): "v" * 512 for i in range(16)}
    reply = ask(client, gateway, "Hi", metadata=at_limits)
    assert client.chat.completions.retrieve(reply.id).to_dict()["metadata"] == at_limits
    too_much = [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"": "v"},
        {"k": 1},
        {"k": None},
        ["k", "v"],
    ]
    for metadata in too_much:
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, gateway, "Hi", extra_body={"metadata": metadata})
        assert refused.value.body["param"] == "metadata", metadata  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.update(reply.id, metadata=metadata)  # type: ignore[arg-type]
        assert refused.value.body["param"] == "metadata", metadata  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(
            model=gateway.model, prompt="One", max_tokens=1, extra_body={"metadata": too_much[0]}
        )
    assert refused.value.body["param"] == "metadata"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.list(metadata=too_much[0])
    assert refused.value.body["param"] == "metadata"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.list(limit=101)


def test_nul_in_an_id_or_filter_is_a_400(gateway: Gateway) -> None:
    """PostgreSQL cannot compare text holding NUL: refused before the store is asked."""
    base = f"{gateway.url}/v1/chat/completions"
    cases = [
        ("GET", f"{base}/chatcmpl-%00", {}, "completion_id"),
        ("DELETE", f"{base}/chatcmpl-%00", {}, "completion_id"),
        ("GET", f"{base}/chatcmpl-%00/messages", {}, "completion_id"),
        ("GET", base, {"after": "chatcmpl-\x00"}, "after"),
        ("GET", base, {"model": "m\x00"}, "model"),
        ("GET", base, {"metadata[k]": "v\x00"}, "metadata"),
    ]
    for method, url, params, param in cases:
        response = httpx.request(method, url, params=params, timeout=30)
        assert response.status_code == 400, (method, url, params, response.text)
        assert response.json()["error"]["param"] == param
