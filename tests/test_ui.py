"""The web UI in a real browser: Debian's Chromium driven by Playwright against the session's
live gateway (real vLLM, the real default model). A judgment given on the page must come out
of `GET /v1/feedback` and `aligngate export`; a side-by-side choice must be a DPO pair; model
and user text must stay text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Gateway, run_cli

# Screenshots for the docs' Web UI page (docs/feedback/web-ui.md), test_arena.py's too:
# `ALIGNGATE_UI_SCREENSHOTS=docs make test` refreshes them.
SCREENSHOTS = os.environ.get("ALIGNGATE_UI_SCREENSHOTS")
TIMEOUT_MS = 120_000  # a streamed answer on 2 CPU cores, while other work shares them

pytestmark = pytest.mark.slow


@pytest.fixture
def page(browser, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    viewport = getattr(request, "param", {"width": 1100, "height": 900})
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], errors  # no uncaught script error on any page


def screenshot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    if SCREENSHOTS:
        folder = REPO / SCREENSHOTS
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / name), full_page=True)


def send(page, text: str) -> None:  # type: ignore[no-untyped-def]
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def feedback_rows(gateway: Gateway, completion_id: str) -> list[dict]:  # type: ignore[type-arg]
    rows = httpx.get(
        f"{gateway.url}/v1/feedback", params={"order": "desc", "limit": 200}, timeout=30
    ).json()["data"]
    return [r for r in rows if r["completion_id"] == completion_id]


def export(test_env: dict[str, str], fmt: str, tmp_path: Path) -> list[dict]:  # type: ignore[type-arg]
    out = tmp_path / f"{fmt}.json"
    done = run_cli(["export", "--format", fmt, "--out", str(out)], test_env)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def test_chat_streams_and_a_rejection_reaches_the_cut_export(
    gateway: Gateway, page, test_env: dict[str, str], tmp_path: Path
) -> None:
    page.goto(f"{gateway.url}/ui")
    page.get_by_label("Model", exact=True).select_option(gateway.model)
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("48")
    send(page, "What is the capital of France?")

    answer = page.locator(".answer").last
    accept = answer.get_by_role("button", name="Accept")
    accept.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('.answer[data-completion-id]') !== null")
    text = answer.locator(".text").inner_text()
    assert "Paris" in text, text
    completion_id = answer.get_attribute("data-completion-id")
    assert completion_id and completion_id.startswith("chatcmpl-")

    # The exact prompt the model received, from /v1/render.
    answer.get_by_text("Prompt the model received").click()
    prompt = answer.locator(".prompt-text")
    page.wait_for_function(
        "el => el.textContent.includes('capital of France')", arg=prompt.element_handle()
    )
    assert "<|im_start|>user" in prompt.inner_text()

    # Reject with a reason, from the keyboard.
    answer.get_by_role("button", name="Reject…").focus()
    page.keyboard.press("Enter")
    reason = "Too long: answer with the city's name only."
    answer.get_by_label("What is wrong with it? (your judgment)").fill(reason)
    answer.get_by_label("Rating (optional)").select_option("2")
    answer.get_by_role("button", name="Send judgment").click()
    answer.locator(".feedback-status", has_text="Judgment saved").wait_for()
    assert answer.locator("form.reject").is_hidden()
    screenshot(page, "ui-chat.png")

    (row,) = feedback_rows(gateway, completion_id)
    assert row["judgment"] == reason and row["label"] == "undesirable" and row["rating"] == 2
    items = export(test_env, "cut", tmp_path)
    mine = [i for i in items if i["judgment"] == reason]
    assert mine, items[-3:]
    assert mine[-1]["output"].strip() == text.strip()
    assert mine[-1]["instruction"] == "What is the capital of France?"


def test_side_by_side_preference_lands_as_a_dpo_pair(
    gateway: Gateway, page, test_env: dict[str, str], tmp_path: Path
) -> None:
    page.goto(f"{gateway.url}/ui")
    page.get_by_label("Mode", exact=True).select_option("side")
    page.get_by_label("Model", exact=True).select_option(gateway.model)
    page.get_by_label("Model B").select_option(gateway.model)  # two samples of one model
    page.get_by_label("Temperature").fill("1")
    page.get_by_label("Max tokens").fill("24")
    send(page, "Name a fruit.")

    preference = page.get_by_role("group", name="Which answer is better?")
    preference.wait_for()
    a, b = page.locator(".answer").all()[-2:]
    b_id, a_id = b.get_attribute("data-completion-id"), a.get_attribute("data-completion-id")
    b_text = b.locator(".text").inner_text()
    preference.get_by_role("button", name="B is better").click()
    preference.locator(".feedback-status", has_text="B preferred").wait_for()

    (row,) = feedback_rows(gateway, str(b_id))
    assert row["preferred_over"] == a_id
    pairs = export(test_env, "dpo", tmp_path)
    assert any(p["chosen"].strip() == b_text.strip() for p in pairs), pairs[-3:]


def _with_markup_first(stream: str, markup: str) -> str:
    """The SSE ``stream`` with ``markup`` put before the first content its model sent."""
    lines = stream.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line.removeprefix("data: "))
        delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
        if delta.get("content"):
            delta["content"] = markup + delta["content"]
            lines[i] = "data: " + json.dumps(chunk)
            return "\n".join(lines)
    raise AssertionError(f"no content in the stream: {stream[:500]}")


def test_model_and_user_text_render_as_text(gateway: Gateway, page) -> None:
    payload = "<script>window.__pwned = true</script><img src=x onerror='window.__pwned=true'>"

    # The model's real streamed answer, with markup in its first token, as a model that
    # repeats or is led into writing markup sends it (whether the small default model
    # repeats it greedily depends on the CPU's arithmetic: on an AVX2-only CI machine it
    # described the markup instead).
    def hostile_model(route) -> None:  # type: ignore[no-untyped-def]
        real = route.fetch()
        route.fulfill(response=real, body=_with_markup_first(real.text(), payload))

    page.route("**/v1/chat/completions", hostile_model)
    page.goto(f"{gateway.url}/ui")
    page.evaluate("window.__pwned = false")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("40")
    send(page, f"Repeat this HTML exactly: {payload}")
    answer = page.locator(".answer").last
    answer.get_by_role("button", name="Accept").wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('.answer[data-completion-id]')")
    response = answer.locator(".text").inner_text()
    print("model answered:", repr(response))
    assert response.startswith(payload)  # shown as text
    # The user's message is shown verbatim, as text; nothing in the transcript became markup.
    assert payload in page.locator(".turn.user").last.inner_text()
    assert page.locator("#transcript script, #transcript img").count() == 0
    assert page.evaluate("window.__pwned") is False

    # A judgment with markup, shown on the overview page, stays text too.
    completion_id = answer.get_attribute("data-completion-id")
    judgment = "</blockquote><script>window.__pwned = true</script> wrong"
    r = httpx.post(
        f"{gateway.url}/v1/feedback", json={"completion_id": completion_id, "judgment": judgment}
    )
    assert r.status_code == 201
    page.goto(f"{gateway.url}/ui/feedback")
    page.evaluate("window.__pwned = false")
    page.locator(".judgment", has_text="wrong").first.wait_for()
    assert page.locator(".judgment").first.inner_text() == judgment
    assert page.locator("#latest script").count() == 0
    assert page.evaluate("window.__pwned") is False


def test_overview_counts_filters_and_admin_downloads(gateway: Gateway, page) -> None:
    page.goto(f"{gateway.url}/ui/feedback")
    # This model's row exactly (its adapters, e.g. `…-iter2`, have rows of their own).
    counts = page.locator("#counts tbody tr").filter(
        has=page.locator("th, td").get_by_text(gateway.model, exact=True)
    )
    counts.wait_for()
    summary = httpx.get(f"{gateway.url}/v1/feedback/summary").json()["data"]
    mine = next(s for s in summary if s["model"] == gateway.model)
    cells = counts.locator("td").all_inner_texts()
    assert [int(c) for c in cells] == [
        mine[k]
        for k in ("total", "desirable", "undesirable", "neutral", "judgments", "preferences")
    ]

    page.get_by_label("Label", exact=True).select_option("undesirable")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.feedback-item')].length > 0 && "
        "[...document.querySelectorAll('.feedback-item')].every("
        "  li => li.dataset.verdict === 'undesirable')"
    )
    screenshot(page, "ui-feedback.png")

    # This browser is on loopback and the server has no admin key: admin actions are shown.
    with page.expect_download() as download:
        page.get_by_role("button", name="Download cut").click()
    path = download.value.path()
    assert download.value.suggested_filename == "aligngate-cut.json"
    records = json.loads(Path(path).read_text())
    assert any(r["judgment"] for r in records)


@pytest.mark.parametrize("page", [{"width": 390, "height": 844}], indirect=True)
def test_phone_width_and_labelled_controls(gateway: Gateway, page) -> None:
    for path in ("/ui", "/ui/arena", "/ui/leaderboard", "/ui/feedback"):
        response = page.goto(f"{gateway.url}{path}")
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        page.wait_for_load_state("networkidle")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} scrolls sideways by {overflow}px at phone width"
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, button')]
                 .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                              && !e.textContent.trim())
                 .map(e => e.outerHTML)"""
        )
        assert unlabelled == []
    # Keyboard only: Tab reaches the message box, Enter sends.
    page.goto(f"{gateway.url}/ui")
    page.wait_for_load_state("networkidle")
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "message":
            break
    else:
        raise AssertionError("Tab never reached the message box")
    page.keyboard.type("Hi")
    page.keyboard.press("Enter")
    page.locator(".answer[data-completion-id]").wait_for()
