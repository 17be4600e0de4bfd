// The arena: one message, two anonymous answers (POST /v1/arena/battles), one vote
// (POST /v1/arena/battles/{id}/vote), then the two models' names.
import { call, setting, showStatus, wireKeys } from "./common.js";

const $ = (id) => document.getElementById(id);
const status = $("status");
const votes = [...document.querySelectorAll("#battle [data-winner]")];
const WORDS = { a: "A is better", b: "B is better", tie: "A tie", both_bad: "Both are bad" };
let battle = null;
let busy = false;

wireKeys();
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("battle-form").requestSubmit();
  }
});
$("battle-form").addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});
for (const button of votes) button.addEventListener("click", () => vote(button.dataset.winner));

function show(side, answer) {
  const node = $(`answer-${side}`);
  node.querySelector(".text").textContent = answer.content ?? "";
  node.querySelector(".model").textContent = answer.model ?? "hidden";
  node.dataset.model = answer.model ?? "";
}

async function start() {
  const text = $("message").value;
  if (busy || !text.trim()) return;
  busy = true;
  $("start").disabled = true;
  $("battle").hidden = true;
  showStatus(status, "Two models are answering…");
  try {
    battle = await call("/v1/arena/battles", {
      method: "POST",
      body: {
        messages: [{ role: "user", content: text }],
        temperature: Number($("temperature").value),
        max_tokens: Number.parseInt($("max-tokens").value, 10),
      },
    });
    show("a", battle.a);
    show("b", battle.b);
    $("battle").dataset.battleId = battle.id;
    delete $("battle").dataset.winner;
    for (const button of votes) button.disabled = false;
    showStatus($("vote-status"), "");
    $("battle").hidden = false;
    showStatus(status, "Which answer is better? The names show after your vote.");
  } catch (error) {
    showStatus(status, `No battle: ${error.message}`, "error");
  } finally {
    busy = false;
    $("start").disabled = false;
  }
}

async function vote(winner) {
  if (!battle) return;
  const annotator = setting("annotator");
  for (const button of votes) button.disabled = true;
  try {
    const done = await call(`/v1/arena/battles/${encodeURIComponent(battle.id)}/vote`, {
      method: "POST",
      body: { winner, ...(annotator ? { annotator } : {}) },
    });
    show("a", done.a);
    show("b", done.b);
    $("battle").dataset.winner = winner;
    let stored = "kept as a battle outcome";
    if (done.preference_id) stored = `stored as a preference (${done.preference_id})`;
    else if (done.preference_note) stored = `not a preference pair: ${done.preference_note}`;
    showStatus($("vote-status"), `${WORDS[winner]}: ${stored}. A was ${done.a.model}, B was ${done.b.model}.`, "ok");
    battle = null;
    $("message").value = "";
  } catch (error) {
    showStatus($("vote-status"), `Vote not saved: ${error.message}`, "error");
    for (const button of votes) button.disabled = false;
  }
}
