"""The arena on the live gateway (real vLLM on the CPU): the default model against a LoRA
adapter of it. Battles answer blind through the chat serving path, votes become DPO pairs in
`aligngate export`, ties and both-bad stay battle outcomes, and the leaderboard rates them —
over the API and in a real browser."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.errors import Conflict
from server.evaluation.arena import draw_pair
from tests.conftest import Gateway, run_cli
from tests.test_ui import page, screenshot  # noqa: F401  (the browser page fixture)

pytestmark = pytest.mark.slow
TUNED = "arena:tuned"


@pytest.fixture(scope="module")
def contenders(gateway: Gateway, arena_adapter: str) -> Iterator[list[str]]:
    # The arena draws from every served model: adapters that earlier tests left on the
    # session gateway (online iterations) would let the browser's random pair form a group
    # that never met the API test's pairs, which the leaderboard refuses to rate together.
    for card in httpx.get(f"{gateway.url}/v1/models", timeout=30).json()["data"]:
        if card.get("parent") and not card.get("alias_of") and card["id"] != TUNED:
            httpx.delete(f"{gateway.url}/admin/adapters/{card['id']}", timeout=60)
    r = httpx.post(
        f"{gateway.url}/admin/adapters", json={"name": TUNED, "path": arena_adapter}, timeout=120
    )
    assert r.status_code == 201, r.text
    yield [gateway.model, TUNED]
    httpx.delete(f"{gateway.url}/admin/adapters/{TUNED}", timeout=60)


def start(gateway: Gateway, question: str, **extra: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 12, **extra}
    return httpx.post(f"{gateway.url}/v1/arena/battles", json=body, timeout=180)


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


def test_the_pair_is_two_different_models_in_a_random_order() -> None:
    rng = random.Random(1)
    orders = {tuple(draw_pair(None, ["x", "y", "z"], rng)) for _ in range(200)}
    assert len(orders) == 6  # every ordered pair of different models comes up
    assert {tuple(draw_pair(["x", "y"], [], rng)) for _ in range(50)} == {("x", "y"), ("y", "x")}
    with pytest.raises(Conflict, match="only `x` is served"):
        draw_pair(None, ["x"], rng)


def test_battle_vote_export_and_leaderboard(
    gateway: Gateway, contenders: list[str], test_env: dict[str, str], tmp_path: Path
) -> None:
    before = {
        "battles": metric(gateway, "aligngate_arena_battles_total", source="human"),
        "ties": metric(gateway, "aligngate_arena_votes_total", winner="tie"),
        "preferred": metric(gateway, "aligngate_feedback_total", source="human", label="preferred"),
    }
    r = start(gateway, "Name a colour.", models=contenders, temperature=0)
    assert r.status_code == 200, r.text
    battle = r.json()
    # Blind: the two answers, no names (nor completion ids, which would name them).
    assert battle["status"] == "open" and battle["winner"] is None
    assert battle["a"]["content"] and battle["b"]["content"]
    assert not any(name in r.text for name in contenders)
    assert battle["a"]["model"] is None and battle["b"]["completion_id"] is None
    url = f"{gateway.url}/v1/arena/battles/{battle['id']}"
    assert httpx.get(url).json()["a"] == battle["a"]

    voted = httpx.post(f"{url}/vote", json={"winner": "a", "annotator": "tester"}, timeout=30)
    assert voted.status_code == 200, voted.text
    shown = voted.json()
    assert shown["status"] == "decided" and shown["winner"] == "a"
    assert {shown["a"]["model"], shown["b"]["model"]} == set(contenders)
    assert shown["a"]["content"] == battle["a"]["content"]
    again = httpx.post(f"{url}/vote", json={"winner": "b"}, timeout=30)
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    assert httpx.post(f"{url}-nope/vote", json={"winner": "a"}).status_code == 404

    # The answers are the serving path's stored records; the vote is a preference between them.
    stored = httpx.get(f"{gateway.url}/v1/completions/{shown['a']['completion_id']}").json()
    assert stored["model"] == shown["a"]["model"]
    assert stored["choices"][0]["text"] == battle["a"]["content"]
    (preference,) = [f for f in stored["feedback"] if f["id"] == shown["preference_id"]]
    assert preference["preferred_over"] == shown["b"]["completion_id"]
    out = tmp_path / "dpo.json"
    done = run_cli(["export", "--format", "dpo", "--out", str(out)], test_env)
    assert done.returncode == 0, done.stderr
    pairs = json.loads(out.read_text())
    assert {"chosen": battle["a"]["content"], "rejected": battle["b"]["content"]} in [
        {"chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs
    ]
    assert stored["prompt_text"] in {p["prompt"] for p in pairs}

    # A tie and a both-bad vote are battle outcomes, not preferences.
    for question, winner in (("Name a fruit.", "tie"), ("Name a tree.", "both_bad")):
        other = start(gateway, question, models=contenders).json()
        decided = httpx.post(
            f"{gateway.url}/v1/arena/battles/{other['id']}/vote", json={"winner": winner}
        ).json()
        assert decided["winner"] == winner and decided["preference_id"] is None
        # A battle's answer is evaluation data: not deleted, though no feedback names it.
        gone = httpx.delete(
            f"{gateway.url}/v1/chat/completions/{decided['a']['completion_id']}", timeout=30
        )
        assert gone.status_code == 409 and "arena battle" in gone.json()["error"]["message"]

    board = httpx.get(f"{gateway.url}/v1/leaderboard", params={"source": "human"}, timeout=60)
    assert board.status_code == 200, board.text
    board = board.json()
    rows = {row["model"]: row for row in board["data"]}
    assert set(contenders) <= set(rows) and board["battles"] >= 3
    assert board["resamples"] >= 1000 and board["confidence"] == 0.95
    assert board["sources"] == ["human"] and board["source"] == "human"
    for row in rows.values():
        assert row["low"] <= row["rating"] <= row["high"] and row["battles"] >= 3
        assert 1 <= row["rank_low"] <= row["rank_high"] <= len(rows)
    # Sources are never mixed unless asked: the default view is people's votes, named.
    default = httpx.get(f"{gateway.url}/v1/leaderboard", timeout=60).json()
    assert default["source"] == "human" and default["battles"] == board["battles"]
    mixed = httpx.get(f"{gateway.url}/v1/leaderboard", params={"source": "all"}, timeout=60)
    assert mixed.status_code == 200 and mixed.json()["source"] == "all"
    assert mixed.json()["battles"] >= board["battles"]
    tuned = rows[TUNED]
    assert 0 < board["win_rates"][TUNED][gateway.model] < 1  # one decisive vote, two ties
    anchored = httpx.get(
        f"{gateway.url}/v1/leaderboard", params={"anchor": TUNED}, timeout=60
    ).json()
    assert {r["model"]: r["rating"] for r in anchored["data"]}[TUNED] == 1000.0
    assert tuned["ties"] >= 2
    # The filter by source: a judge that judged nothing has an empty board.
    judged = httpx.get(f"{gateway.url}/v1/leaderboard", params={"source": "judge:nobody"})
    assert judged.status_code == 200 and judged.json()["data"] == []
    bad = httpx.get(f"{gateway.url}/v1/leaderboard", params={"source": "robots"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "source"

    assert metric(gateway, "aligngate_arena_battles_total", source="human") == before["battles"] + 3
    assert metric(gateway, "aligngate_arena_votes_total", winner="tie") == before["ties"] + 1
    assert (
        metric(gateway, "aligngate_feedback_total", source="human", label="preferred")
        == before["preferred"] + 1
    )


def test_battle_requests_are_checked(gateway: Gateway, contenders: list[str]) -> None:
    same = start(gateway, "Hi", models=[gateway.model, gateway.model])
    assert same.status_code == 400 and same.json()["error"]["param"] == "models"
    aliases = [m for m in httpx.get(f"{gateway.url}/v1/models").json()["data"] if "@" in m["id"]]
    if aliases:  # an alias battles as the version it serves: not against that version
        alias = start(gateway, "Hi", models=[aliases[0]["id"], aliases[0]["alias_of"]])
        assert alias.status_code == 400 and "two different models" in alias.text
    missing = start(gateway, "Hi", models=[gateway.model, "nope"])
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    vote = httpx.post(f"{gateway.url}/v1/arena/battles/x/vote", json={"winner": "c"})
    assert vote.status_code == 400 and vote.json()["error"]["param"] == "winner"
    nul = httpx.get(f"{gateway.url}/v1/arena/battles/x%00y")
    assert nul.status_code == 400, nul.text


def test_battle_mode_in_the_browser_then_the_leaderboard(
    gateway: Gateway,
    contenders: list[str],
    page,  # noqa: F811
) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{gateway.url}/ui/arena")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("12")
    page.get_by_label("Message").fill("Name an animal.")
    page.get_by_role("button", name="Start battle").click()
    vote = page.get_by_role("group", name="Your vote")
    vote.wait_for()
    assert page.locator(".answer .model").all_inner_texts() == ["hidden", "hidden"]
    screenshot(page, "ui-arena.png")
    vote.get_by_role("button", name="B is better").click()
    page.locator("#vote-status", has_text="stored as a preference").wait_for()
    revealed = [page.locator(f"#answer-{side}").get_attribute("data-model") for side in ("a", "b")]
    served = {m["id"] for m in httpx.get(f"{gateway.url}/v1/models").json()["data"]}
    assert len(set(revealed)) == 2 and set(revealed) <= served

    page.goto(f"{gateway.url}/ui/leaderboard")
    for model in revealed:
        page.locator(f'#ratings tr[data-model="{model}"]').wait_for()
    headers = page.locator("#win-rates thead th").all_inner_texts()
    assert set(revealed) <= set(headers)
    page.get_by_label("Judged by").select_option("human")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_load_state("networkidle")
    assert "battles" in page.locator("#summary").inner_text()
    screenshot(page, "ui-leaderboard.png")


def test_item_1_battle_answers_stay_blind_until_the_vote(
    gateway: Gateway, contenders: list[str], test_env: dict[str, str]
) -> None:
    """Issue 32, item 1: a battle's answers are stored completions under the voter's key,
    and the Stored Completions routes showed them with their models' names before the vote.
    Until the vote they read as missing on every route; then they are the voter's records."""
    from sqlalchemy import create_engine, select

    from server.store.schema import battles

    listed = f"{gateway.url}/v1/chat/completions"
    r = start(gateway, "Name a river.", models=contenders)
    assert r.status_code == 200, r.text
    battle = r.json()
    assert not any(name in r.text for name in contenders)
    assert not any(name in value for value in r.headers.values() for name in contenders)
    engine = create_engine(test_env["ALIGNGATE_DATABASE_URL"])
    with engine.connect() as conn:  # the ids the voter is not shown
        ids = conn.execute(
            select(battles.c.completion_a, battles.c.completion_b).where(
                battles.c.id == battle["id"]
            )
        ).one()
    engine.dispose()
    for completion_id in ids:
        for url in (
            f"{listed}/{completion_id}",
            f"{listed}/{completion_id}/messages",
            f"{gateway.url}/v1/completions/{completion_id}",
        ):
            assert httpx.get(url, timeout=30).status_code == 404, url
        renamed = httpx.post(f"{listed}/{completion_id}", json={"metadata": {"k": "v"}})
        assert renamed.status_code == 404
        label = {"completion_id": completion_id, "label": "desirable"}
        judged = httpx.post(f"{gateway.url}/v1/feedback", json=label)
        assert judged.status_code == 404, judged.text
    newest = httpx.get(listed, params={"order": "desc", "limit": 100}, timeout=30).json()
    assert not {c["id"] for c in newest["data"]} & set(ids)
    for model in contenders:
        mine = httpx.get(listed, params={"model": model, "limit": 100}, timeout=30).json()
        assert not {c["id"] for c in mine["data"]} & set(ids)

    decided = httpx.post(
        f"{gateway.url}/v1/arena/battles/{battle['id']}/vote", json={"winner": "tie"}
    ).json()
    assert {decided["a"]["completion_id"], decided["b"]["completion_id"]} == set(ids)
    shown = httpx.get(f"{listed}/{decided['a']['completion_id']}", timeout=30)
    assert shown.status_code == 200 and shown.json()["model"] == decided["a"]["model"]
    newest = httpx.get(listed, params={"order": "desc", "limit": 100}, timeout=30).json()
    assert set(ids) <= {c["id"] for c in newest["data"]}
