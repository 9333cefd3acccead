// ChatGoT's page: a conversation in the corpus's dialogue style, streamed from /v1/chat/completions.
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;
let messages = [];  // {role, content}: what the API is sent each turn
let controller = null;

function key() { return sessionStorage.getItem("trainlab-api-key") || $("apikey").value || ""; }

function headers() {
  const h = {"Content-Type": "application/json"};
  if (key()) h["Authorization"] = "Bearer " + key();
  return h;
}

function addTurn(kind, speaker, text) {
  const div = document.createElement("div");
  div.className = "turn " + kind;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = speaker + ": ";
  const said = document.createElement("span");
  said.className = "said";
  said.textContent = text;
  div.append(who, said);
  $("conversation").append(div);
  div.scrollIntoView({block: "end"});
  return said;
}

function number(id) { return Number($(id).value); }

async function send(line) {
  messages.push({role: "user", content: line});
  addTurn("user", info.dialogue.user, line);
  const said = addTurn("bot", info.dialogue.bot, "");
  const body = {model: info.model, messages: messages, stream: true, temperature: number("temperature"),
                top_k: number("top_k"), top_p: number("top_p"), repetition_penalty: number("repetition_penalty"),
                max_tokens: number("max_tokens")};
  if ($("stop_at").value) body.stop_at = $("stop_at").value;
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false; $("status").textContent = "";
  let reply = "";
  let first = null;  // when the first character arrived: the rate is of the answer's own streaming
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body),
                                                          signal: controller.signal});
    if (!response.ok) {
      const err = await response.json().catch(() => ({error: {message: response.statusText}}));
      throw new Error(err.error ? err.error.message : response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const piece = (chunk.choices[0].delta || {}).content || "";
        if (piece && first === null) first = performance.now();
        reply += piece;
        said.textContent = reply;
        $("conversation").scrollTop = $("conversation").scrollHeight;  // follow the answer as it grows
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      said.textContent = reply + " [stopped]";
    } else {
      $("status").textContent = String(e.message || e);
    }
  } finally {
    messages.push({role: "assistant", content: reply});
    const chars = [...reply].length;
    const seconds = first === null ? 0 : (performance.now() - first) / 1000;
    const speed = document.createElement("span");
    speed.className = "speed";
    speed.textContent = chars > 1 && seconds > 0 ? ` ${chars} characters, ${((chars - 1) / seconds).toFixed(0)}/s`
                                                 : ` ${chars} characters`;
    said.parentElement.append(speed);
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
    $("line").focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const line = $("line").value.trim();
  if (!line || controller) return;
  $("line").value = "";
  if ($("apikey").value) sessionStorage.setItem("trainlab-api-key", $("apikey").value);
  send(line);
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  $("conversation").textContent = "";
  $("status").textContent = "conversation forgotten";
});

fetch("/info").then((r) => r.json()).then((data) => {
  info = data;
  const loss = data.val_loss === undefined ? "" : `, val loss ${data.val_loss.toFixed(3)}`;
  $("model").textContent = `run ${data.run}, step ${data.step}${loss}; ${data.dialogue.style} dialogue, ` +
                           `you are ${data.dialogue.user}, the model is ${data.dialogue.bot}`;
  $("speaker").textContent = data.dialogue.user + ":";
  $("keybox").hidden = !data.auth;
}).catch((e) => { $("status").textContent = "cannot reach the server: " + e; });
