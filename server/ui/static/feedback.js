// The feedback overview: counts per model, the latest feedback with the responses it is
// about, filters, and (for admins) downloads of every export format.
import { call, el, isAdmin, showStatus, wireKeys } from "./common.js";

const $ = (id) => document.getElementById(id);
const FORMATS = ["cut", "kto", "dpo", "quark"];
const PAGE = 20;
let cursor = null;

wireKeys(() => refresh());
$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  loadLatest(true);
});
$("more").addEventListener("click", () => loadLatest(false));
refresh();

async function refresh() {
  await Promise.all([loadCounts(), loadLatest(true), showExports()]);
}

async function loadCounts() {
  try {
    const { data } = await call("/v1/feedback/summary");
    const columns = ["total", "desirable", "undesirable", "neutral", "judgments", "preferences"];
    $("counts").tBodies[0].replaceChildren(
      ...data.map((row) =>
        el("tr", {}, el("th", { scope: "row" }, row.model), columns.map((c) => el("td", {}, row[c]))),
      ),
    );
    const select = $("filter-model");
    const keep = select.value;
    select.replaceChildren(el("option", { value: "" }, "all"), ...data.map((r) => el("option", { value: r.model }, r.model)));
    select.value = data.some((r) => r.model === keep) ? keep : "";
  } catch (error) {
    showStatus($("status"), `Could not load counts: ${error.message}`, "error");
  }
}

function verdict(fb) {
  if (fb.preferred_over) return "preferred";
  if (fb.label) return fb.label;
  if (fb.rating !== null) return `${fb.rating} (${fb.rating_scale})`;
  return fb.judgment ? "undesirable" : "neutral";
}

async function loadLatest(fresh) {
  if (fresh) {
    cursor = null;
    $("latest").replaceChildren();
  }
  const params = new URLSearchParams({ order: "desc", limit: String(PAGE) });
  if ($("filter-model").value) params.set("model", $("filter-model").value);
  if ($("filter-label").value) params.set("label", $("filter-label").value);
  if (cursor) params.set("after", cursor);
  try {
    const page = await call(`/v1/feedback?${params}`);
    cursor = page.next_cursor;
    $("more").hidden = !page.has_more;
    const rows = $("filter-judged").checked ? page.data.filter((fb) => fb.judgment) : page.data;
    const items = await Promise.all(rows.map(feedbackItem));
    $("latest").append(...items);
    if ($("latest").children.length === 0) showStatus($("status"), "No feedback yet.");
    else showStatus($("status"), "");
  } catch (error) {
    showStatus($("status"), `Could not load feedback: ${error.message}`, "error");
  }
}

async function feedbackItem(fb) {
  let instruction = "";
  let response = "";
  try {
    const completion = await call(`/v1/completions/${encodeURIComponent(fb.completion_id)}`);
    const choice = completion.choices.find((c) => c.index === fb.choice_index);
    response = choice ? choice.text : "";
    const request = completion.request;
    instruction = Array.isArray(request) ? (request.findLast((m) => m.role === "user")?.content ?? "") : String(request);
    if (typeof instruction !== "string") instruction = JSON.stringify(instruction);
  } catch (error) {
    response = `(response unavailable: ${error.message})`;
  }
  const when = new Date(fb.created_at * 1000).toLocaleString();
  return el(
    "li",
    { class: "feedback-item", dataset: { id: fb.id, verdict: verdict(fb) } },
    el(
      "p",
      { class: "meta" },
      el("strong", {}, verdict(fb)),
      ` · ${fb.model} · ${when}`,
      fb.annotator ? ` · by ${fb.annotator}` : "",
      fb.reviewed ? " · reviewed" : "",
    ),
    fb.judgment ? el("blockquote", { class: "judgment" }, fb.judgment) : null,
    el("details", {}, el("summary", {}, "Instruction and response"),
      el("p", { class: "label" }, "Instruction"), el("pre", { class: "prompt-text" }, instruction),
      el("p", { class: "label" }, "Response"), el("pre", { class: "prompt-text response" }, response)),
  );
}

async function showExports() {
  const admin = await isAdmin();
  $("exports").hidden = !admin;
  if (!admin) return;
  $("export-buttons").replaceChildren(
    ...FORMATS.map((format) => el("button", { type: "button", onclick: () => download(format) }, `Download ${format}`)),
  );
}

async function download(format) {
  const params = new URLSearchParams({ format });
  if ($("filter-model").value) params.set("model", $("filter-model").value);
  try {
    const response = await call(`/admin/export?${params}`, { admin: true, raw: true });
    const blob = await response.blob();
    const disposition = response.headers.get("content-disposition") || "";
    const name = /filename="([^"]+)"/.exec(disposition)?.[1] ?? `aligngate-${format}.json`;
    const link = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
    showStatus($("export-status"), `Downloaded ${name}.`, "ok");
  } catch (error) {
    showStatus($("export-status"), `Export failed: ${error.message}`, "error");
  }
}
