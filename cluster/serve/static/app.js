// The render service's page: plain JS, no build step. Every request carries the bearer token;
// images and the video are fetched with it and shown from blob URLs. Progress comes over
// server-sent events read with fetch() (EventSource cannot send headers), resumed with
// Last-Event-ID when the connection drops.
"use strict";

const $ = (id) => document.getElementById(id);
const FINAL = new Set(["done", "failed", "cancelled"]);
let watching = null; // {id, controller}

function token() { return $("token").value.trim(); }
function headers(extra = {}) { return { Authorization: `Bearer ${token()}`, ...extra }; }

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!response.ok) {
    let message = `${response.status}`;
    try { const e = (await response.json()).error; message = `${e.message}${e.field ? ` (${e.field})` : ""}`; } catch (_) {}
    throw new Error(message);
  }
  return response;
}

async function blobUrl(path) {
  const blob = await (await api(path)).blob();
  return URL.createObjectURL(blob);
}

function setImage(img, url) {
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  img.dataset.url = url;
  img.src = url;
}

async function loadInfo() {
  try {
    const info = await (await api("/v1/info")).json();
    $("example").innerHTML = info.examples.map((n) => `<option>${n}</option>`).join("");
    $("steps").max = info.limits.max_steps;
  } catch (e) { $("message").textContent = `info: ${e.message}`; }
}

async function submit(event) {
  event.preventDefault();
  $("message").textContent = "";
  const request = {
    prompt: $("prompt").value,
    seed: Number($("seed").value),
    steps: Number($("steps").value),
    fps: Number($("fps").value),
    metrics: $("metrics").checked,
    alignment: { intra_frame: $("intra").checked, background: $("background").checked, inter_frame: $("inter").value },
  };
  const source = document.querySelector("input[name=source]:checked").value;
  let options;
  if (source === "upload") {
    const file = $("upload").files[0];
    if (!file) { $("message").textContent = "choose a pose file to upload"; return; }
    const form = new FormData();
    form.append("request", JSON.stringify(request));
    form.append("poses", file);
    options = { method: "POST", body: form };
  } else {
    request.example = $("example").value;
    options = { method: "POST", body: JSON.stringify(request), headers: { "Content-Type": "application/json" } };
  }
  $("submit").disabled = true;
  try {
    const view = await (await api("/v1/renders", options)).json();
    watch(view.id, request.metrics);
    refreshList();
  } catch (e) {
    $("message").textContent = e.message;
  } finally {
    $("submit").disabled = false;
  }
}

function showProgress(done, total, state, eta) {
  $("eta").textContent = eta > 0 && !FINAL.has(state) ? `about ${Math.ceil(eta)} s left` : "";
  const percent = state === "done" ? 100 : total ? Math.floor((100 * done) / total) : 0;
  $("progress").value = percent;
  $("percent").textContent = `${percent} %`;
  $("count").textContent = `${done} / ${total}`;
  $("state").textContent = state;
  $("state").className = `state-${state}`;
}

function watch(id, scored) {
  if (watching) watching.controller.abort();
  const controller = new AbortController();
  watching = { id, controller };
  $("current").hidden = false;
  $("current-id").textContent = id;
  $("video-box").hidden = true;
  $("extras").hidden = true;
  $("latest").removeAttribute("src");
  showProgress(0, 0, "queued");
  follow(id, controller, scored, null, 0);
}

async function follow(id, controller, scored, lastId, tries) {
  let total = 0, done = 0, state = "queued";
  try {
    const extra = lastId === null ? {} : { "Last-Event-ID": String(lastId) };
    const response = await api(`/v1/renders/${id}/events`, { headers: extra, signal: controller.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done: closed } = await reader.read();
      if (closed) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const fields = {};
        for (const line of block.split("\n")) {
          const at = line.indexOf(": ");
          if (at > 0 && !line.startsWith(":")) fields[line.slice(0, at)] = line.slice(at + 2);
        }
        if (!fields.event) continue;
        const data = JSON.parse(fields.data);
        if (fields.id) lastId = Number(fields.id);
        if (fields.event === "end") { await finished(id, data.state, scored); return; }
        if (data.frames_total) total = data.frames_total;
        if (data.frames_done !== undefined) done = data.frames_done;
        if (data.state) state = data.state;
        if (fields.event === "frame") {
          blobUrl(`/v1/renders/${id}/frames/${data.frame}`).then((u) => setImage($("latest"), u)).catch(() => {});
        }
        if (fields.event === "error") $("message").textContent = data.error;
        showProgress(done, total, state, data.eta_s);
      }
    }
    setTimeout(() => follow(id, controller, scored, lastId, 0), 500); // stream ended early: resume
  } catch (e) {
    if (controller.signal.aborted) return;
    if (tries < 20) setTimeout(() => follow(id, controller, scored, lastId, tries + 1), 1000 * (tries + 1));
    else $("message").textContent = `events: ${e.message}`;
  }
}

async function finished(id, state, scored) {
  const view = await (await api(`/v1/renders/${id}`)).json();
  showProgress(view.frames_done, view.frames_total, view.state);
  refreshList();
  if (state !== "done") { if (view.error) $("message").textContent = view.error; return; }
  const video = $("video");
  video.src = await blobUrl(`/v1/renders/${id}/video`);
  $("download").href = video.src;
  $("download").download = `${id}.mp4`;
  $("video-box").hidden = false;
  video.play().catch(() => {});
  $("extras").hidden = false;
  blobUrl(`/v1/renders/${id}/contact-sheet`).then((u) => setImage($("sheet"), u)).catch(() => {});
  if (scored) {
    try {
      const metrics = await (await api(`/v1/renders/${id}/metrics`)).json();
      $("metrics-text").textContent = JSON.stringify(metrics.aggregate || metrics, null, 1);
      $("metrics-box").hidden = false;
    } catch (_) {}
  }
}

async function cancel(id) {
  try { await api(`/v1/renders/${id}/cancel`, { method: "POST" }); } catch (e) { $("message").textContent = e.message; }
  refreshList();
}

async function remove(id) {
  try { await api(`/v1/renders/${id}`, { method: "DELETE" }); } catch (e) { $("message").textContent = e.message; }
  if (thumbs.has(id)) { URL.revokeObjectURL(thumbs.get(id)); thumbs.delete(id); }
  if (watching && watching.id === id) { watching.controller.abort(); watching = null; $("current").hidden = true; }
  refreshList();
}

const thumbs = new Map(); // render id -> blob URL of its first frame (fetched once)

function cell(row, ...children) {
  const td = row.insertCell();
  td.append(...children);
  return td;
}

function button(label, kind, id) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `small ${kind}`;
  b.textContent = label;
  b.dataset[kind] = id;
  return b;
}

function thumbnail(r) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = "";
  if (thumbs.has(r.id)) img.src = thumbs.get(r.id);
  else if (r.frames_done > 0) {
    thumbs.set(r.id, "");
    blobUrl(`${r.links.frames}0`).then((u) => { thumbs.set(r.id, u); img.src = u; }).catch(() => thumbs.delete(r.id));
  }
  return img;
}

function renderRow(body, r) {
  const row = body.insertRow();
  row.dataset.id = r.id;
  cell(row, thumbnail(r));
  const link = document.createElement("a");
  link.href = "#";
  link.dataset.watch = r.id;
  link.textContent = r.prompt; // text, never HTML: prompts are user input
  link.title = `${r.id}: ${r.prompt}`;
  cell(row, link).className = "prompt";
  cell(row, r.state).className = `state-${r.state}`;
  cell(row, `${r.frames_done} / ${r.frames_total}`);
  cell(row, new Date(r.created * 1000).toLocaleTimeString());
  const actions = FINAL.has(r.state) ? [] : [button("cancel", "cancel", r.id), " "];
  cell(row, ...actions, button("delete", "delete", r.id));
}

async function refreshList() {
  $("token-hint").hidden = Boolean(token());
  if (!token()) return;
  try {
    const list = await (await api("/v1/renders?limit=50")).json();
    const body = document.createElement("tbody");
    for (const r of list.renders) renderRow(body, r);
    $("renders").tBodies[0].replaceWith(body);
  } catch (e) {
    $("message").textContent = `list: ${e.message}`;
    if (e.message.startsWith("missing or unknown bearer token")) $("token-hint").hidden = false;
  }
}

function tokenFromHash() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (!fromHash) return false;
  localStorage.setItem("avatar-token", fromHash);
  history.replaceState(null, "", location.pathname);
  $("token").value = fromHash;
  return true;
}

function init() {
  if (!tokenFromHash()) $("token").value = localStorage.getItem("avatar-token") || "";
  $("token").addEventListener("change", () => { localStorage.setItem("avatar-token", token()); loadInfo(); refreshList(); });
  window.addEventListener("hashchange", () => { if (tokenFromHash()) { loadInfo(); refreshList(); } });
  $("form").addEventListener("submit", submit);
  $("refresh").addEventListener("click", refreshList);
  $("renders").addEventListener("click", (event) => {
    const target = event.target.closest("[data-cancel],[data-delete],[data-watch]");
    if (!target) return;
    event.preventDefault();
    if (target.dataset.cancel) cancel(target.dataset.cancel);
    else if (target.dataset.delete) remove(target.dataset.delete);
    else watch(target.dataset.watch, false);
  });
  loadInfo();
  refreshList();
  setInterval(refreshList, 4000);
}

init();
