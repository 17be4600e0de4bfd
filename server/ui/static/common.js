// Shared by the UI pages: keys kept in this browser session only, API calls that turn the
// gateway's OpenAI-style errors into messages, and an element builder that only ever sets
// text (model output and judgments are never parsed as HTML).

const KEYS = { api: "aligngate.apiKey", admin: "aligngate.adminKey", annotator: "aligngate.annotator" };

export function setting(name) {
  return sessionStorage.getItem(KEYS[name]) || "";
}

export function saveSetting(name, value) {
  if (value) sessionStorage.setItem(KEYS[name], value);
  else sessionStorage.removeItem(KEYS[name]);
}

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.param = error?.param ?? null;
    this.code = error?.code ?? null;
  }
}

function headers(admin, json) {
  const h = {};
  const key = setting(admin ? "admin" : "api");
  if (key) h.authorization = `Bearer ${key}`;
  if (json) h["content-type"] = "application/json";
  return h;
}

/** fetch() against the gateway; rejects with ApiError on a non-2xx answer. */
export async function call(path, { method = "GET", body, admin = false, raw = false, signal } = {}) {
  const response = await fetch(path, {
    method,
    headers: headers(admin, body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) {
    let error = null;
    try {
      error = (await response.json()).error;
    } catch {
      /* not JSON: keep the status */
    }
    throw new ApiError(response.status, error);
  }
  return raw ? response : response.json();
}

/** Whether the admin routes accept this browser (its admin key, or loopback without one). */
export async function isAdmin() {
  try {
    await call("/admin/whoami", { admin: true });
    return true;
  } catch {
    return false;
  }
}

/** el("button", {type: "button", onclick}, "text", child, …): text children become text nodes. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The served models and adapters, for a <select>. */
export async function loadModels(...selects) {
  const { data } = await call("/v1/models");
  for (const select of selects) {
    const keep = select.value;
    select.replaceChildren(
      ...data.map((m) =>
        el("option", { value: m.id }, m.parent ? `${m.id} (adapter on ${m.parent})` : m.id),
      ),
    );
    if (keep && data.some((m) => m.id === keep)) select.value = keep;
  }
  return data;
}

/** The keys panel in each page's header. */
export function wireKeys(onSaved) {
  const form = document.getElementById("keys-form");
  const fields = { api: "api-key", admin: "admin-key", annotator: "annotator" };
  for (const [name, id] of Object.entries(fields)) document.getElementById(id).value = setting(name);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    for (const [name, id] of Object.entries(fields)) saveSetting(name, document.getElementById(id).value.trim());
    document.getElementById("keys-status").textContent = "Saved for this browser session.";
    onSaved?.();
  });
}

export function showStatus(node, message, kind = "info") {
  node.textContent = message;
  node.dataset.kind = kind;
}
