"""The web chat page: one self-contained HTML page served by the same FastAPI app as the OpenAI API.

Why not Gradio: it is a large dependency with its own server and queue; this page is ~150 lines, talks to the
same ``/v1/chat/completions`` endpoint (so web chat goes through the same batcher, adapters and error handling as
API clients), streams with ``fetch`` + a response body reader over server-sent events, and is easy to drive in a
headless browser test. The conversation lives in the page (OpenAI ``messages``); choosing a new image starts a
new conversation, as in LLaVA.
"""

from __future__ import annotations

import io
from functools import lru_cache

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from PIL import Image, ImageDraw

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>road_vlm chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 860px; margin: 1.5em auto; padding: 0 1em; color: #222; }
  header { display: flex; flex-wrap: wrap; gap: .6em; align-items: center; margin-bottom: 1em; }
  #preview { max-width: 160px; max-height: 160px; border: 1px solid #ccc; display: none; }
  #log { border: 1px solid #ddd; border-radius: 6px; padding: .6em; min-height: 12em; background: #fafafa; }
  .msg { margin: .4em 0; white-space: pre-wrap; }
  .msg.user::before { content: "You: "; font-weight: bold; }
  .msg.assistant::before { content: "Assistant: "; font-weight: bold; color: #05a; }
  #error { color: #b00; white-space: pre-wrap; }
  form { display: flex; gap: .5em; margin-top: .8em; }
  #question { flex: 1; padding: .4em; }
</style>
</head>
<body>
<h1>road_vlm chat</h1>
<header>
  <label>Model <select id="model"></select></label>
  <input type="file" id="image-input" accept="image/*">
  <button type="button" id="demo-image">Use demo image</button>
  <button type="button" id="reset">New conversation</button>
  <img id="preview" alt="current image">
</header>
<div id="log" aria-live="polite"></div>
<div id="error" role="alert"></div>
<form id="ask">
  <input id="question" autocomplete="off" placeholder="Ask about the image...">
  <button id="send" type="submit">Send</button>
</form>
<p><small>Status: <span id="status">loading</span></small></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let messages = [];      // the conversation, in OpenAI format
let imageUrl = null;    // data: URL of the current image, sent with the first user message
let busy = false;
// With `--api-key`, open the page as http://HOST:PORT/#key=KEY: the key stays in the browser (a fragment is
// never sent to the server) and goes out only as the Authorization header of API calls.
const apiKey = new URLSearchParams(location.hash.slice(1)).get("key");
const authHeaders = apiKey ? {"Authorization": "Bearer " + apiKey} : {};

function setStatus(s) { $("status").textContent = s; }
function showError(text) { $("error").textContent = text || ""; }
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  return div;
}
function resetConversation() {
  messages = [];
  $("log").textContent = "";
  showError("");
}
function useImage(dataUrl) {
  imageUrl = dataUrl;
  $("preview").src = dataUrl;
  $("preview").style.display = "inline";
  resetConversation();   // a new image starts a new conversation (LLaVA-1.5 takes one image per conversation)
}
function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) { return response.status + " " + response.statusText; }
}
async function loadModels() {
  const response = await fetch("/v1/models", {headers: authHeaders});
  if (!response.ok) { showError(await errorText(response)); return; }
  const body = await response.json();
  const select = $("model");
  select.textContent = "";
  for (const m of body.data) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.adapter ? m.id : m.id + " (base, no adapter)";
    select.appendChild(option);
  }
  // Prefer the first adapter: usually what the user came to try.
  if (body.data.length > 1) select.value = body.data[1].id;
  setStatus("idle");
}
async function ask(question) {
  const content = [{type: "text", text: question}];
  if (messages.length === 0 && imageUrl) content.push({type: "image_url", image_url: {url: imageUrl}});
  const outgoing = messages.concat([{role: "user", content: content}]);
  addMessage("user", question);
  const answer = addMessage("assistant", "");
  busy = true; $("send").disabled = true; setStatus("generating"); showError("");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: Object.assign({"Content-Type": "application/json"}, authHeaders),
      body: JSON.stringify({model: $("model").value, messages: outgoing, stream: true}),
    });
    if (!response.ok) { answer.remove(); showError(await errorText(response)); return; }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", text = "", finished = false;
    while (!finished) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") { finished = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) { showError(chunk.error.message); continue; }
        const delta = chunk.choices.length ? chunk.choices[0].delta : {};
        if (delta.content) { text += delta.content; answer.textContent = text; }
      }
    }
    messages = outgoing.concat([{role: "assistant", content: text}]);
    answer.dataset.done = "1";
  } catch (e) {
    answer.remove(); showError("request failed: " + e);
  } finally {
    busy = false; $("send").disabled = false; setStatus("idle");
  }
}
$("image-input").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (file) useImage(await readAsDataUrl(file));
});
$("demo-image").addEventListener("click", async () => {
  const response = await fetch("/demo.png");
  useImage(await readAsDataUrl(await response.blob()));
});
$("reset").addEventListener("click", resetConversation);
$("ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question || busy) return;
  $("question").value = "";
  ask(question);
});
loadModels().catch((e) => showError("cannot list models: " + e));
</script>
</body>
</html>
"""


@lru_cache(maxsize=1)
def demo_image_png() -> bytes:
    """A small generated picture (a red square and a yellow circle on blue) for trying the page offline."""
    image = Image.new("RGB", (96, 64), (40, 90, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 16, 40, 48), fill=(220, 30, 30))
    draw.ellipse((56, 16, 88, 48), fill=(240, 210, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def add_web_routes(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and the demo image at ``/demo.png`` on an app from ``create_app``."""

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/demo.png")
    async def demo() -> Response:
        return Response(demo_image_png(), media_type="image/png")
