"use strict";
// The road_vlm chat page. Every ticked model gets a column; a question goes to all of them at once, so the server
// runs them as one mixed-adapter batch, and each answer streams into its own column (server-sent events).
// Each column keeps its own conversation in OpenAI format; a new image starts new conversations (LLaVA-1.5 takes
// one image per conversation).
const $ = (id) => document.getElementById(id);
const EXAMPLES = [
  "Describe the image briefly.",
  "What color is the shape? Answer the question using a single word or phrase.",
  "Is there a circle in the image? Answer the question using a single word or phrase.",
  "What is in the image?",
];
let columns = [];       // {model, messages, el, log, meta, error}
let imageUrl = null;    // data: URL of the current image, sent with the first user message of a conversation
let lastQuestion = null;
let running = 0;
// With `--api-key`, open the page as http://HOST:PORT/#key=KEY: the key stays in the browser (a fragment is
// never sent to the server) and goes out only as the Authorization header of API calls.
const apiKey = new URLSearchParams(location.hash.slice(1)).get("key");
const authHeaders = apiKey ? {"Authorization": "Bearer " + apiKey} : {};

function setStatus(s) { $("status").textContent = s; }
function showError(text) { $("error").textContent = text || ""; }
function el(tag, props, children) {
  const node = Object.assign(document.createElement(tag), props || {});
  for (const child of children || []) node.appendChild(child);
  return node;
}
function addMessage(column, role, text) {
  const div = el("div", {className: "msg " + role, textContent: text});
  column.log.appendChild(div);
  return div;
}
function selectedModels() {
  return Array.from(document.querySelectorAll("#model-list input:checked")).map((box) => box.value);
}
function buildColumns() {
  const area = $("columns");
  area.textContent = "";
  columns = selectedModels().map((model) => {
    const column = {model: model, messages: []};
    column.log = el("div", {className: "log"});
    column.meta = el("div", {className: "meta"});
    column.error = el("div", {className: "column-error", role: "alert"});
    const copy = el("button", {type: "button", className: "copy", textContent: "Copy answer"});
    copy.addEventListener("click", () => copyAnswer(column, copy));
    column.el = el("section", {className: "column"}, [el("h2", {textContent: model}), column.log, column.meta,
                                                      column.error, copy]);
    column.el.dataset.model = model;
    area.appendChild(column.el);
    return column;
  });
  lastQuestion = null;
  updateButtons();
}
function resetConversation() {
  for (const column of columns) {
    column.messages = [];
    column.log.textContent = ""; column.meta.textContent = ""; column.error.textContent = "";
  }
  lastQuestion = null;
  showError("");
  updateButtons();
}
function updateButtons() {
  $("send").disabled = running > 0 || columns.length === 0;
  $("regenerate").disabled = running > 0 || lastQuestion === null;
  setStatus(running > 0 ? "generating" : "idle");
}
function useImage(dataUrl) {
  imageUrl = dataUrl;
  $("preview").src = dataUrl || "";
  $("preview").style.display = dataUrl ? "inline" : "none";
  resetConversation();
}
function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
async function useImageFile(file) {
  if (!file || !file.type.startsWith("image/")) { showError("not an image: " + (file ? file.name : "nothing")); return; }
  useImage(await readAsDataUrl(file));
}
async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) { return response.status + " " + response.statusText; }
}
function samplingFields() {
  const fields = {temperature: Number($("temperature").value), top_p: Number($("top-p").value)};
  if ($("max-tokens").value !== "") fields.max_tokens = Number($("max-tokens").value);
  if ($("stop").value !== "") fields.stop = [$("stop").value];
  return fields;
}
async function copyAnswer(column, button) {
  const answers = column.log.querySelectorAll(".msg.assistant");
  const text = answers.length ? answers[answers.length - 1].textContent : "";
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch (e) {
    button.textContent = "Copy failed";
  }
  setTimeout(() => { button.textContent = "Copy answer"; }, 1500);
}
async function loadModels() {
  const response = await fetch("/v1/models", {headers: authHeaders});
  if (!response.ok) { showError(await errorText(response)); return; }
  const body = await response.json();
  const list = $("model-list");
  list.textContent = "";
  body.data.forEach((m, i) => {
    const box = el("input", {type: "checkbox", value: m.id, id: "model-" + i});
    box.checked = body.data.length > 1 ? i === 1 : true;  // the first adapter: usually what the user came to try
    box.addEventListener("change", buildColumns);
    list.appendChild(el("label", {htmlFor: box.id}, [box, document.createTextNode(
      m.root ? m.id : m.id + " (base, no adapter)")]));  // adapters name their base as "root"
  });
  buildColumns();
}
async function askColumn(column, question, sampling) {
  const content = [{type: "text", text: question}];
  if (column.messages.length === 0 && imageUrl) content.push({type: "image_url", image_url: {url: imageUrl}});
  const outgoing = column.messages.concat([{role: "user", content: content}]);
  const asked = addMessage(column, "user", question);
  const answer = addMessage(column, "assistant", "");
  column.error.textContent = ""; column.meta.textContent = "";
  const start = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: Object.assign({"Content-Type": "application/json"}, authHeaders),
      body: JSON.stringify(Object.assign({model: column.model, messages: outgoing, stream: true,
                                          stream_options: {include_usage: true}}, sampling)),
    });
    if (!response.ok) { asked.remove(); answer.remove(); column.error.textContent = await errorText(response); return; }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", text = "", finished = false, tokens = null, reason = null;
    while (!finished) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") { finished = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) { column.error.textContent = chunk.error.message; continue; }
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        if (!chunk.choices.length) continue;
        if (chunk.choices[0].finish_reason) reason = chunk.choices[0].finish_reason;
        const delta = chunk.choices[0].delta;
        if (delta.content) { text += delta.content; answer.textContent = text; }
      }
    }
    const seconds = (performance.now() - start) / 1000;
    column.messages = outgoing.concat([{role: "assistant", content: text}]);
    column.meta.textContent = `${tokens === null ? "?" : tokens} token${tokens === 1 ? "" : "s"} · ` +
      `${seconds.toFixed(2)} s` +
      (reason ? ` · ${reason}` : "");
    answer.dataset.done = "1";
  } catch (e) {
    asked.remove(); answer.remove(); column.error.textContent = "request failed: " + e;
  }
}
async function ask(question) {
  if (running > 0 || columns.length === 0) return;
  showError("");
  const sampling = samplingFields();
  lastQuestion = question;
  running = columns.length;
  updateButtons();
  await Promise.all(columns.map((column) => askColumn(column, question, sampling).finally(() => {
    running -= 1;
    updateButtons();
  })));
}
function regenerate() {
  if (lastQuestion === null || running > 0) return;
  for (const column of columns) {  // forget the last turn: the question goes out again
    const last = column.messages.length;
    if (last >= 2 && column.messages[last - 1].role === "assistant") column.messages = column.messages.slice(0, -2);
    const shown = column.log.querySelectorAll(".msg");
    if (shown.length >= 2) { shown[shown.length - 1].remove(); shown[shown.length - 2].remove(); }
  }
  ask(lastQuestion);
}

$("image-input").addEventListener("change", (ev) => useImageFile(ev.target.files[0]));
$("demo-image").addEventListener("click", async () => {
  const response = await fetch("/demo.png");
  useImage(await readAsDataUrl(await response.blob()));
});
$("remove-image").addEventListener("click", () => useImage(null));
const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault(); drop.classList.remove("over");
  useImageFile(ev.dataTransfer.files[0]);
});
document.addEventListener("paste", (ev) => {
  const item = Array.from(ev.clipboardData ? ev.clipboardData.items : []).find((i) => i.type.startsWith("image/"));
  if (item) { ev.preventDefault(); useImageFile(item.getAsFile()); }
});
for (const question of EXAMPLES) {
  const button = el("button", {type: "button", textContent: question.split("?")[0] + (question.includes("?") ? "?" : "")});
  button.title = question;
  button.addEventListener("click", () => { $("question").value = question; $("question").focus(); });
  $("examples").appendChild(button);
}
$("reset").addEventListener("click", resetConversation);
$("regenerate").addEventListener("click", regenerate);
$("ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question || running > 0) return;
  $("question").value = "";
  ask(question);
});
loadModels().catch((e) => showError("cannot list models: " + e));
