// Search page: text, image (file picker, drag-and-drop, paste) and "more like this" queries against the JSON API.
// Every piece of data from the server goes into the page with textContent or as an attribute, never as HTML.
"use strict";

const PAGE_SIZE = 24;
const maxUploadBytes = parseFloat(document.body.dataset.maxUploadMb) * 1024 * 1024;
const $ = (id) => document.getElementById(id);
const results = $("results"), statusLine = $("status"), moreButton = $("more"), viewer = $("viewer");
let current = null;  // {kind: "text"|"image"|"similar", q, file, id, target, offset, label}

function setStatus(message, isError = false) {
  statusLine.textContent = message;
  statusLine.classList.toggle("error", isError);
}

function request(query) {
  const k = PAGE_SIZE, offset = query.offset;
  if (query.kind === "text") {
    return fetch(`/api/search?${new URLSearchParams({q: query.q, k, offset})}`);
  }
  if (query.kind === "similar") {
    return fetch(`/api/search/similar?${new URLSearchParams({id: query.id, k, offset})}`);
  }
  const form = new FormData();
  form.append("image", query.file);
  form.append("target", query.target);
  form.append("k", k);
  form.append("offset", offset);
  return fetch("/api/search/image", {method: "POST", body: form});
}

// The query image stays visible above its results; text queries hide it.
function showQueryImage(query) {
  const preview = $("query-preview"), image = $("query-image");
  if (query.kind !== "image") { preview.hidden = true; return; }
  if (image.dataset.file !== query.label || !image.src) {
    if (image.src.startsWith("blob:")) URL.revokeObjectURL(image.src);
    image.src = URL.createObjectURL(query.file);
    image.dataset.file = query.label;
  }
  $("query-name").textContent = query.label;
  preview.hidden = false;
}

async function run(query, append = false) {
  current = query;
  if (!append) {
    showQueryImage(query);
    window.scrollTo({top: 0});
  }
  moreButton.hidden = true;
  setStatus(append ? "Loading more…" : "Searching…");
  results.setAttribute("aria-busy", "true");
  let body;
  try {
    const response = await request(query);
    body = await response.json().catch(() => ({error: `server answered ${response.status}`}));
    if (!response.ok) throw new Error(body.error || `server answered ${response.status}`);
  } catch (error) {
    results.removeAttribute("aria-busy");
    setStatus(`Error: ${error.message}`, true);
    return;
  }
  if (query !== current) return;  // a newer search started meanwhile
  results.removeAttribute("aria-busy");
  if (!append) results.replaceChildren();
  results.classList.toggle("captions", query.target === "captions");
  body.results.forEach((hit) => results.append(query.target === "captions" ? captionCard(hit) : imageCard(hit)));
  const shown = results.children.length;
  if (shown === 0) {
    setStatus(`No results for ${query.label}.`);
  } else {
    setStatus(`${shown} results for ${query.label} · ${body.took_ms.toFixed(1)} ms`);
  }
  moreButton.hidden = body.results.length < PAGE_SIZE;
}

function thumb(hit, alt) {
  const img = document.createElement("img");
  img.src = hit.thumbnail;
  img.alt = alt;
  img.loading = "lazy";
  return img;
}

// One result card: thumbnail, score and a line of text; a click opens the image's viewer.
function card(hit, text, className) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.dataset.id = hit.id;
  const label = document.createElement("div");
  label.className = "text";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3) + " ";
  label.append(score, text);
  button.append(thumb(hit, text), label);
  button.addEventListener("click", () => openViewer(hit.id));
  item.append(button);
  return item;
}

const imageCard = (hit) => card(hit, hit.captions[0] || hit.image, "card");
const captionCard = (hit) => card(hit, hit.caption, "card caption-hit");

async function openViewer(id) {
  const response = await fetch(`/api/images/${id}`);
  const info = await response.json();
  if (!response.ok) { setStatus(`Error: ${info.error}`, true); return; }
  $("viewer-image").src = info.url;
  $("viewer-image").alt = info.captions[0] || info.image;
  $("viewer-title").textContent = `${info.image} (${info.width}×${info.height})`;
  $("viewer-captions").replaceChildren(...info.captions.map((c) => {
    const li = document.createElement("li");
    li.textContent = c;
    return li;
  }));
  $("viewer-similar").onclick = () => {
    viewer.close();
    run({kind: "similar", id, offset: 0, target: "images", label: `images like ${info.image}`});
  };
  viewer.showModal();
}

function searchImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { setStatus("Error: that file is not an image.", true); return; }
  if (file.size > maxUploadBytes) {
    setStatus(`Error: the image is larger than ${document.body.dataset.maxUploadMb} MB.`, true);
    return;
  }
  const target = document.querySelector("input[name=target]:checked").value;
  run({kind: "image", file, target, offset: 0, label: file.name || "the pasted image"});
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("q").value.trim();
  if (!q) { setStatus("Type something to search for.", true); return; }
  run({kind: "text", q, offset: 0, target: "images", label: `“${q}”`});
});
moreButton.addEventListener("click", () => run({...current, offset: results.children.length}, true));
$("file").addEventListener("change", (event) => searchImage(event.target.files[0]));
// Switching between "similar images" and "captions that describe it" re-runs the image query on screen.
document.querySelectorAll("input[name=target]").forEach((radio) => radio.addEventListener("change", () => {
  if (current && current.kind === "image") run({...current, target: radio.value, offset: 0});
}));

const dropZone = $("drop-zone");
dropZone.addEventListener("dragover", (event) => { event.preventDefault(); dropZone.classList.add("dragging"); });
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  searchImage(event.dataTransfer.files[0]);
});
dropZone.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
});
document.addEventListener("paste", (event) => {
  const item = [...event.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) searchImage(item.getAsFile());
});
