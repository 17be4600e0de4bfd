// The leaderboard: Bradley–Terry ratings of decided battles (GET /v1/leaderboard), filtered
// by who judged them (people in the arena, or one AI judge), and the pairwise win rates.
import { call, el, showStatus, wireKeys } from "./common.js";

const $ = (id) => document.getElementById(id);

wireKeys(() => load());
$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  load();
});
load();

const fixed = (x) => (x === null || x === undefined ? "–" : x.toFixed(0));
const percent = (x) => (x === null || x === undefined ? "–" : `${Math.round(100 * x)}%`);

function fill(select, values, label) {
  const keep = select.value;
  const first = select.options[0];
  select.replaceChildren(first, ...values.map((v) => el("option", { value: v }, label(v))));
  select.value = values.includes(keep) ? keep : first.value;
}

async function load() {
  const params = new URLSearchParams();
  if ($("source").value) params.set("source", $("source").value);
  if ($("anchor").value) params.set("anchor", $("anchor").value);
  try {
    const board = await call(`/v1/leaderboard?${params}`);
    // Sources are never mixed unless asked: the default view is people's votes.
    const others = board.sources.filter((s) => s !== "human");
    fill($("source"), [...others, "all"], (s) => (s === "all" ? "all sources, mixed" : s.replace(/^judge:/, "judge ")));
    const models = board.data.map((r) => r.model);
    fill($("anchor"), [...models].sort(), (m) => m);
    $("ratings").tBodies[0].replaceChildren(
      ...board.data.map((r) =>
        el(
          "tr",
          { dataset: { model: r.model } },
          el("th", { scope: "row" }, r.model),
          el("td", {}, r.rank_low === null || r.rank_low === undefined || r.rank_low === r.rank_high ? r.rank : `${r.rank} (${r.rank_low}–${r.rank_high})`),
          el("td", {}, fixed(r.rating)),
          el("td", {}, r.bounded ? `${fixed(r.low)} – ${fixed(r.high)}` : "unbounded"),
          el("td", {}, r.battles),
          el("td", {}, r.wins),
          el("td", {}, r.losses),
          el("td", {}, r.ties),
        ),
      ),
    );
    $("win-rates").tHead.replaceChildren(
      el("tr", {}, el("th", { scope: "col" }, "Row vs column"), models.map((m) => el("th", { scope: "col" }, m))),
    );
    $("win-rates").tBodies[0].replaceChildren(
      ...models.map((row) =>
        el("tr", {}, el("th", { scope: "row" }, row), models.map((col) => el("td", {}, percent(board.win_rates[row]?.[col])))),
      ),
    );
    $("summary").textContent = board.battles
      ? `${board.source === "all" ? "all sources" : board.source} · ${board.battles} battles · anchor ${board.anchor} at ${board.anchor_rating} · ` +
        `${Math.round(board.confidence * 100)}% intervals from ${board.resamples} bootstrap resamples`
      : "No decided battles yet: vote in the arena.";
    showStatus($("status"), "");
  } catch (error) {
    if (error.param === "anchor" && $("anchor").value) {
      $("anchor").value = ""; // the anchor has no battles under this filter: the default one
      return load();
    }
    showStatus($("status"), `Could not load the leaderboard: ${error.message}`, "error");
  }
}
