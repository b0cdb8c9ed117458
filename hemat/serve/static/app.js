// hemat's web chat: streams /v1/chat/completions, shows reasoning apart from the answer, keeps
// conversations and settings in localStorage. No frameworks, no network beyond this server.
"use strict";

const store = {
  get(key, fallback) {
    try { const v = localStorage.getItem("hemat." + key); return v === null ? fallback : JSON.parse(v); }
    catch { return fallback; }
  },
  set(key, value) { localStorage.setItem("hemat." + key, JSON.stringify(value)); },
};

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), empty: $("empty"), prompt: $("prompt"), composer: $("composer"), send: $("send"),
  stop: $("stop"), list: $("conversations"), title: $("chat-title"), status: $("status"), model: $("model-info"),
  temperature: $("temperature"), temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"),
  system: $("system-prompt"), apiKey: $("api-key"), newChat: $("new-chat"),
};

let conversations = store.get("conversations", []);
let currentId = store.get("current", null);
let settings = Object.assign({ temperature: 0.7, maxTokens: null, system: "" }, store.get("settings", {}));
let modelName = null;
let controller = null; // AbortController of the reply being streamed

// ---- settings -------------------------------------------------------------------------------------
function loadSettings() {
  ui.temperature.value = settings.temperature;
  ui.temperatureValue.textContent = Number(settings.temperature).toFixed(2);
  ui.maxTokens.value = settings.maxTokens ?? "";
  ui.system.value = settings.system;
  ui.apiKey.value = store.get("apiKey", "");
}

function saveSettings() {
  settings = {
    temperature: Number(ui.temperature.value),
    maxTokens: parseInt(ui.maxTokens.value, 10) > 0 ? parseInt(ui.maxTokens.value, 10) : null, // null: up to the context
    system: ui.system.value,
  };
  ui.temperatureValue.textContent = settings.temperature.toFixed(2);
  store.set("settings", settings);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = store.get("apiKey", "");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text, isError = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", isError);
}

async function connect() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    if (r.status === 401) {
      ui.model.textContent = "API key needed";
      setStatus("This server needs an API key: enter it under Settings.", true);
      ui.apiKey.focus();
      return;
    }
    const data = await r.json();
    const model = data.data[0];
    modelName = model.id;
    ui.model.textContent = `${model.id} · context ${model.max_model_len ?? "?"} tokens`;
    setStatus("");
  } catch (e) {
    ui.model.textContent = "server unreachable";
    setStatus("Cannot reach the server.", true);
  }
}

// ---- conversations --------------------------------------------------------------------------------
function current() { return conversations.find((c) => c.id === currentId) || null; }

function save() { store.set("conversations", conversations); store.set("current", currentId); }

function newConversation() {
  const c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
  conversations.unshift(c);
  currentId = c.id;
  save();
  return c;
}

function renderList() {
  ui.list.replaceChildren();
  for (const c of conversations) {
    const item = document.createElement("div");
    item.className = "conversation" + (c.id === currentId ? " active" : "");
    const title = document.createElement("span");
    title.textContent = c.title;
    const del = document.createElement("button");
    del.className = "delete";
    del.type = "button";
    del.title = "Delete conversation";
    del.textContent = "×";
    del.addEventListener("click", (e) => {
      e.stopPropagation();
      conversations = conversations.filter((x) => x.id !== c.id);
      if (currentId === c.id) currentId = conversations[0]?.id ?? null;
      save();
      render();
    });
    item.append(title, del);
    item.addEventListener("click", () => { if (!controller) { currentId = c.id; save(); render(); } });
    ui.list.append(item);
  }
}

function render() {
  renderList();
  const c = current();
  ui.title.textContent = c ? c.title : "New chat";
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = Boolean(c && c.messages.length);
  if (c) for (const m of c.messages) ui.messages.append(messageView(m).root);
  scrollDown();
}

// ---- messages -------------------------------------------------------------------------------------
function messageView(m) {
  const root = document.createElement("div");
  root.className = "message " + m.role + (m.role === "assistant" && m.done !== false ? " done" : "");
  const view = { root };
  if (m.role === "assistant") {
    const details = document.createElement("details");
    details.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = reasoningLabel(m.reasoningSeconds);
    const text = document.createElement("div");
    text.className = "reasoning-text";
    text.textContent = m.reasoning || "";
    details.append(summary, text);
    details.hidden = !m.reasoning;
    root.append(details);
    Object.assign(view, { details, summary, reasoning: text });
  }
  const bubble = document.createElement("div");
  bubble.className = "bubble" + (m.error ? " error-text" : "");
  bubble.textContent = m.error || m.content || "";
  root.append(bubble);
  view.bubble = bubble;
  if (m.role === "assistant") {
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = m.stats || "";
    root.append(stats);
    view.stats = stats;
  }
  return view;
}

function reasoningLabel(seconds) {
  return seconds == null ? "Reasoning" : `Reasoning · ${seconds.toFixed(1)} s`;
}

function scrollDown() { ui.messages.scrollTop = ui.messages.scrollHeight; }

function formatUsd(x) {
  if (x === 0) return "$0";
  if (x >= 0.01) return "$" + x.toFixed(4);
  return "$" + x.toPrecision(2);
}

function statsLine(usage, seconds, stopped) {
  const parts = [];
  if (usage) {
    parts.push(`${usage.completion_tokens} tokens`);
    if (seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
    if (usage.cost) parts.push(formatUsd(usage.cost.total_usd));
  }
  if (stopped) parts.push("stopped");
  return parts.join(" · ");
}

// ---- sending --------------------------------------------------------------------------------------
async function send(text) {
  const c = current() || newConversation();
  if (!c.messages.length) c.title = text.slice(0, 48) || "New chat";
  c.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "", reasoning: "", done: false };
  c.messages.push(reply);
  save();
  render();
  const view = messageView(reply);
  ui.messages.lastChild.replaceWith(view.root);

  const history = [];
  if (settings.system.trim()) history.push({ role: "system", content: settings.system });
  for (const m of c.messages.slice(0, -1)) if (!m.error) history.push({ role: m.role, content: m.content });

  controller = new AbortController();
  ui.send.hidden = true;
  ui.stop.hidden = false;
  setStatus("generating…");
  const start = performance.now();
  let first = null;
  let answerStart = null; // when the answer began: the reasoning took first..answerStart
  let usage = null;
  let stopped = false;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: modelName || "hemat", messages: history, stream: true, stream_options: { include_usage: true },
        temperature: settings.temperature, ...(settings.maxTokens ? { max_tokens: settings.maxTokens } : {}),
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error?.message || `HTTP ${response.status}`);
    }
    for await (const data of sseEvents(response)) {
      if (data.error) throw new Error(data.error.message);
      if (data.usage) usage = data.usage;
      const delta = data.choices?.[0]?.delta;
      if (!delta) continue;
      if (delta.reasoning_content) {
        first ??= performance.now();
        reply.reasoning += delta.reasoning_content;
        view.details.hidden = false;
        view.details.open = true;
        view.reasoning.textContent = reply.reasoning;
      }
      if (delta.content) {
        first ??= performance.now();
        answerStart ??= performance.now();
        if (!reply.content && reply.reasoning) view.details.open = false; // the answer has started
        reply.content += delta.content;
        view.bubble.textContent = reply.content;
      }
      scrollDown();
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else {
      reply.error = e.message;
      view.bubble.textContent = e.message;
      view.bubble.classList.add("error-text");
    }
  }
  const seconds = first ? (performance.now() - first) / 1000 : (performance.now() - start) / 1000;
  if (reply.reasoning) {
    reply.reasoningSeconds = ((answerStart ?? performance.now()) - (first ?? start)) / 1000;
    view.summary.textContent = reasoningLabel(reply.reasoningSeconds);
  }
  reply.stats = statsLine(usage, seconds, stopped);
  reply.done = true;
  view.stats.textContent = reply.stats;
  view.root.classList.add("done");
  setStatus("");
  controller = null;
  ui.send.hidden = false;
  ui.stop.hidden = true;
  save();
  renderList();
}

// Parse a text/event-stream body into the JSON of each `data:` event, until `data: [DONE]`.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ---- wiring ---------------------------------------------------------------------------------------
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || controller) return;
  ui.prompt.value = "";
  ui.prompt.style.height = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); ui.composer.requestSubmit(); }
});
ui.prompt.addEventListener("input", () => {
  ui.prompt.style.height = "";
  ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, 200) + "px";
});
ui.stop.addEventListener("click", () => controller?.abort());
ui.newChat.addEventListener("click", () => { if (!controller) { currentId = null; save(); render(); ui.prompt.focus(); } });
for (const el of [ui.temperature, ui.maxTokens, ui.system]) el.addEventListener("input", saveSettings);
ui.apiKey.addEventListener("change", () => { store.set("apiKey", ui.apiKey.value.trim()); connect(); });

loadSettings();
render();
connect();
ui.prompt.focus();
