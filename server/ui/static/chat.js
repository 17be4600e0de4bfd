// The chat page: stream answers from one model (or two side by side), show the exact prompt
// each model received, and take a judgment on every answer.
import { call, el, loadModels, setting, showStatus, wireKeys } from "./common.js";

const $ = (id) => document.getElementById(id);
const transcript = $("transcript");
const status = $("status");
let history = []; // the conversation sent with the next request: [{role, content}]
let busy = false;
let cards = 0; // for unique element ids

wireKeys(() => refreshModels());
refreshModels();

$("mode").addEventListener("change", () => {
  $("model-b-field").hidden = $("mode").value !== "side";
});
$("new-chat").addEventListener("click", () => {
  history = [];
  transcript.replaceChildren();
  showStatus(status, "New conversation.");
  $("message").focus();
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

async function refreshModels() {
  try {
    const models = await loadModels($("model"), $("model-b"));
    if (models.length > 1 && $("model-b").value === $("model").value) $("model-b").selectedIndex = 1;
  } catch (error) {
    showStatus(status, `Could not list models: ${error.message}`, "error");
  }
}

function sampling() {
  const temperature = Number($("temperature").value);
  const maxTokens = Number.parseInt($("max-tokens").value, 10);
  return { temperature, max_tokens: maxTokens };
}

async function send() {
  const text = $("message").value;
  if (busy || !text.trim()) return;
  const side = $("mode").value === "side";
  const models = side ? [$("model").value, $("model-b").value] : [$("model").value];
  const messages = [...history, { role: "user", content: text }];
  busy = true;
  $("send").disabled = true;
  transcript.append(el("li", { class: "turn user" }, el("div", { class: "role" }, "You"), el("div", { class: "text" }, text)));
  $("message").value = "";

  const answers = models.map((model, i) => answerCard(model, messages, side ? "AB"[i] : null));
  const turn = el("li", { class: side ? "turn assistant side" : "turn assistant" }, answers.map((a) => a.node));
  transcript.append(turn);
  showStatus(status, side ? "Two answers streaming…" : "Streaming…");
  const results = await Promise.allSettled(answers.map((a) => a.run(sampling())));
  const done = results.filter((r) => r.status === "fulfilled");
  if (done.length === 0) {
    showStatus(status, "No answer: see the error above.", "error");
  } else {
    // The conversation continues with the (first) answer; a side-by-side choice replaces it.
    history = [...messages, { role: "assistant", content: answers[results.indexOf(done[0])].text() }];
    showStatus(status, "Done. Accept or reject each answer.");
    if (side && done.length === 2) turn.append(preferenceBar(answers, messages));
  }
  busy = false;
  $("send").disabled = false;
  $("message").focus();
}

/** One streamed answer with its prompt view and its accept / reject controls. */
function answerCard(model, messages, label) {
  const n = ++cards;
  const body = el("div", { class: "text", "aria-busy": "true" });
  const promptText = el("pre", { class: "prompt-text" }, "…");
  const prompt = el("details", { class: "prompt" }, el("summary", {}, "Prompt the model received"), promptText);
  let promptLoaded = false;
  prompt.addEventListener("toggle", async () => {
    if (!prompt.open || promptLoaded) return;
    promptLoaded = true;
    try {
      const rendered = await call("/v1/render", { method: "POST", body: { model, messages } });
      promptText.textContent = rendered.text;
      promptText.title = `${rendered.family} · ${rendered.template} · ${rendered.token_ids.length} tokens`;
    } catch (error) {
      promptLoaded = false;
      promptText.textContent = `Could not render: ${error.message}`;
    }
  });

  const feedbackStatus = el("p", { class: "feedback-status", role: "status" });
  const accept = el("button", { type: "button", disabled: true }, "Accept");
  const reject = el("button", { type: "button", disabled: true, "aria-expanded": "false", "aria-controls": `reject-${n}` }, "Reject…");
  const reason = el("textarea", { id: `reason-${n}`, rows: 3, required: true, maxlength: 8000 });
  const rating = el(
    "select",
    { id: `rating-${n}` },
    el("option", { value: "" }, "none"),
    [1, 2, 3, 4, 5].map((r) => el("option", { value: r }, `${r} ★`)),
  );
  const cancel = el("button", { type: "button" }, "Cancel");
  const rejectForm = el(
    "form",
    { class: "reject", id: `reject-${n}`, hidden: true },
    el("label", { for: `reason-${n}` }, "What is wrong with it? (your judgment)"),
    reason,
    el("label", { for: `rating-${n}` }, "Rating (optional)"),
    rating,
    el("div", { class: "row" }, el("button", { type: "submit" }, "Send judgment"), cancel),
  );
  const actions = el("div", { class: "actions" }, accept, reject);
  const node = el(
    "section",
    { class: "answer", "aria-label": label ? `Answer ${label}` : "Answer" },
    el("header", {}, label ? el("strong", {}, `${label} · `) : null, el("span", { class: "model" }, model)),
    body,
    prompt,
    actions,
    rejectForm,
    feedbackStatus,
  );

  let completionId = null;
  let answerText = "";

  async function feedback(payload, done) {
    const annotator = setting("annotator");
    for (const b of [accept, reject]) b.disabled = true;
    try {
      const row = await call("/v1/feedback", {
        method: "POST",
        body: { completion_id: completionId, ...payload, ...(annotator ? { annotator } : {}) },
      });
      showStatus(feedbackStatus, `${done} (${row.id})`, "ok");
      node.dataset.feedback = payload.judgment ? "rejected" : "accepted";
      return true;
    } catch (error) {
      showStatus(feedbackStatus, `Not saved: ${error.message}`, "error");
      return false;
    } finally {
      for (const b of [accept, reject]) b.disabled = false;
    }
  }

  accept.addEventListener("click", () => feedback({ label: "desirable" }, "Accepted"));
  reject.addEventListener("click", () => {
    rejectForm.hidden = false;
    reject.setAttribute("aria-expanded", "true");
    reason.focus();
  });
  cancel.addEventListener("click", () => {
    rejectForm.hidden = true;
    reject.setAttribute("aria-expanded", "false");
    reject.focus();
  });
  rejectForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const payload = { judgment: reason.value, label: "undesirable" };
    if (rating.value) Object.assign(payload, { rating: Number(rating.value), rating_scale: "stars" });
    if (await feedback(payload, "Judgment saved")) {
      feedbackStatus.before(el("blockquote", { class: "judgment" }, reason.value));
      reason.value = "";
      rejectForm.hidden = true;
      reject.setAttribute("aria-expanded", "false");
    }
  });

  async function run(params) {
    try {
      const response = await call("/v1/chat/completions", {
        method: "POST",
        raw: true,
        body: { model, messages, stream: true, store: true, ...params },
      });
      const result = await readStream(response, (delta) => {
        answerText += delta;
        body.textContent = answerText;
      });
      completionId = result.id;
      node.dataset.completionId = completionId;
      if (result.finish === "length") body.after(el("p", { class: "cut" }, "Cut at max tokens."));
      for (const b of [accept, reject]) b.disabled = false;
    } catch (error) {
      body.append(el("span", { class: "error" }, `Error: ${error.message}`));
      throw error;
    } finally {
      body.setAttribute("aria-busy", "false");
    }
  }

  return { node, run, text: () => answerText, id: () => completionId };
}

/** Which of two answers to the same prompt is better: stored as a DPO pair. */
function preferenceBar(answers, messages) {
  const bar = el("div", { class: "preference", role: "group", "aria-label": "Which answer is better?" });
  const note = el("p", { class: "feedback-status", role: "status" });
  const buttons = answers.map((winner, i) =>
    el(
      "button",
      {
        type: "button",
        onclick: async () => {
          const loser = answers[1 - i];
          const annotator = setting("annotator");
          for (const b of buttons) b.disabled = true;
          try {
            const row = await call("/v1/feedback", {
              method: "POST",
              body: { completion_id: winner.id(), preferred_over: loser.id(), ...(annotator ? { annotator } : {}) },
            });
            showStatus(note, `${"AB"[i]} preferred (${row.id})`, "ok");
            bar.dataset.preferred = "AB"[i];
            if (history.at(-2)?.content === messages.at(-1).content) {
              history[history.length - 1] = { role: "assistant", content: winner.text() };
            }
          } catch (error) {
            showStatus(note, `Not saved: ${error.message}`, "error");
          } finally {
            for (const b of buttons) b.disabled = false;
          }
        },
      },
      `${"AB"[i]} is better`,
    ),
  );
  bar.append(el("span", {}, "Which is better?"), ...buttons, note);
  return bar;
}

/** Read an OpenAI chat-completions SSE stream; an error event rejects. */
async function readStream(response, onDelta) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let id = null;
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return { id, finish };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        id = chunk.id ?? id;
        for (const choice of chunk.choices ?? []) {
          if (choice.delta?.content) onDelta(choice.delta.content);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  return { id, finish };
}
