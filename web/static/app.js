// Search page: compound text queries (POST /api/search: a text, added images, "without" words, the relevance cutoff,
// filters, mode, dedupe and sort), image-only queries (file picker, drag-and-drop, paste) and "more like this".
// Every piece of data from the server goes into the page with textContent or as an attribute, never as HTML.
"use strict";

const PAGE_SIZE = 24;
const WITHOUT_WEIGHT = -0.5;  // a "without …" term's weight (Marqo's example): pushes results away, never cancels
const MAX_ADDED = 15;  // the server takes 16 terms: the text plus 15 added ones
const STOPWORDS = new Set("a an and are as at be by for from in is it of on or the to with".split(" "));  // keywords.py
const WORD = /[\p{L}\p{N}]+/gu;  // a word as the catalog's tokenizer cuts them: letters and digits
const maxUploadBytes = parseFloat(document.body.dataset.maxUploadMb) * 1024 * 1024;
const $ = (id) => document.getElementById(id);
const results = $("results"), statusLine = $("status"), moreButton = $("more"), viewer = $("viewer");
// A server with several indexes: the page's index (?index=NAME) goes with every request; none asks for the default.
const opened = new URLSearchParams(window.location.search);
const indexName = opened.get("index") || "";
const api = (path, params = {}) => {
  const query = new URLSearchParams(indexName ? {...params, index: indexName} : params).toString();
  return query ? `${path}?${query}` : path;
};
// kind "compound": {terms, options, words, label}; "image": {file, target}; "similar": {id}; all: offset, label
let current = null;
const added = [];  // what the user added to the text: {kind: "image", name, data, url} or {kind: "without", text}

function setStatus(message, isError = false) {
  statusLine.textContent = message;
  statusLine.classList.toggle("error", isError);
}

// The footer: per index in use, its type, size and recall@10 against exact search (GET /api/stats).
function indexStatsLine(kind, s) {
  const parts = [`${kind} index ${s.factory}`, `${s.vectors.toLocaleString("en")} vectors`];
  if (s.exact) parts.push("exact search");
  else if (s.recall_at_10 != null) {
    const when = s.measured?.by ? ` (measured at ${s.measured.by})` : "";
    parts.push(`recall@10 ${s.recall_at_10.toFixed(3)} vs exact${when}`);
  }
  const added = s.share_added_since_training;
  if (added) parts.push(`${Math.round(100 * added)}% added since training`);
  return parts.join(" · ");
}
fetch(api("/api/stats")).then((r) => (r.ok ? r.json() : null)).then((stats) => {
  for (const [kind, s] of Object.entries(stats?.indexes || {})) {
    if (!s.vectors) continue;
    const line = document.createElement("p");
    line.dataset.kind = kind;
    line.textContent = indexStatsLine(kind, s);
    if ((s.recall_history || []).length) {  // an approximate index: its recall over updates, as a picture
      const plot = document.createElement("a");
      plot.href = api("/plot/ann.png");
      plot.textContent = "recall plot";
      line.append(" · ", plot);
    }
    $("index-stats").append(line);
  }
}).catch(() => {});  // the footer is informational: a failed request leaves it empty

function request(query) {
  const k = PAGE_SIZE, offset = query.offset;
  if (query.kind === "compound") {
    const index = indexName ? {index: indexName} : {};
    return fetch("/api/search", {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify({terms: query.terms, k, offset, ...query.options, ...index})});
  }
  if (query.kind === "similar") {
    return fetch(api("/api/search/similar", {id: query.id, k, offset}));
  }
  const form = new FormData();
  form.append("image", query.file);
  form.append("target", query.target);
  form.append("k", k);
  form.append("offset", offset);
  return fetch(api("/api/search/image"), {method: "POST", body: form});
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
  body.results.forEach((hit) => results.append(query.target === "captions" ? captionCard(hit)
                                                                            : imageCard(hit, query.words)));
  const shown = results.children.length;
  const notes = body.notes || [];
  if (shown === 0 && body.message) {
    // the cutoff left nothing: say so, and show the closest hits marked as not relevant
    (body.closest || []).forEach((hit) => results.append(imageCard(hit, query.words, true)));
    setStatus([`${query.label}: ${body.message}`, ...notes].join(" · "));
  } else if (shown === 0) {
    setStatus([`No results for ${query.label}.`, ...notes].join(" · "));
  } else {
    // the level applied, so that "5 % relevant" on a kept hit reads right: relevance is strict (see README)
    const level = body.cutoff && body.cutoff.level != null ? ` (relevance ≥ ${Math.round(body.cutoff.level * 100)} %)` : "";
    const what = body.cutoff ? `relevant results${level}` : "results";
    setStatus([`${shown} ${what} for ${query.label}`, `${body.took_ms.toFixed(1)} ms`, ...notes].join(" · "));
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

function span(className, text) {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text;
  return element;
}

// The words keyword search looks for in a text (search/keywords.py: common words only when there is nothing else).
function keywordWords(text) {
  const words = [...new Set((text.match(WORD) || []).map(fold))];
  const kept = words.filter((w) => !STOPWORDS.has(w));
  return kept.length ? kept : words;
}

// Compared like the catalog's tokenizer: case and diacritics ignored.
const fold = (word) => word.normalize("NFD").replace(/\p{M}/gu, "").toLowerCase();

// `text` as text nodes, with each of `words` inside it wrapped in a <mark>.
function highlighted(text, words) {
  const fragment = document.createDocumentFragment();
  if (!words.length) { fragment.append(text); return fragment; }
  let last = 0;
  for (const found of text.matchAll(WORD)) {
    if (!words.includes(fold(found[0]))) continue;
    fragment.append(text.slice(last, found.index));
    const mark = document.createElement("mark");
    mark.textContent = found[0];
    fragment.append(mark);
    last = found.index + found[0].length;
  }
  fragment.append(text.slice(last));
  return fragment;
}

const matches = (text, words) => (text.match(WORD) || []).filter((w) => words.includes(fold(w))).length;

// One result card: thumbnail, score (and relevance), which rankings matched, a line of text with the query's words
// marked; a click opens the image's viewer. `notRelevant` marks the closest hits of an answer the cutoff emptied.
function card(hit, text, className, words = [], notRelevant = false) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = className + (notRelevant ? " not-relevant" : "");
  button.dataset.id = hit.id;
  const label = document.createElement("div");
  label.className = "text";
  if (notRelevant) label.append(span("flag", "not relevant"), " ");
  if (hit.score !== null && hit.score !== undefined) label.append(span("score", hit.score.toFixed(3)), " ");
  if (typeof hit.relevance === "number") {
    const relevance = span("relevance", `${Math.round(hit.relevance * 100)} % relevant`);
    relevance.title = "calibrated probability that this is the image the query describes";
    label.append(relevance, " ");
  }
  if (words.length) {
    (hit.matched || []).forEach((how) => label.append(span(`badge matched-${how.replace(/\W+/g, "-")}`, how), " "));
  }
  if (words.length && (hit.matched || []).includes("file name")) {
    const file = span("file", "");
    file.append(highlighted(hit.image, words));
    label.append(file, " ");
  }
  const line = span("line", "");
  line.append(highlighted(text, words));
  label.append(line);
  button.append(thumb(hit, text), label);
  button.addEventListener("click", () => openViewer(hit.id));
  item.append(button);
  return item;
}

// In keyword and hybrid modes the caption holding most of the query's words is shown, so the match can be seen.
function imageCard(hit, words = [], notRelevant = false) {
  const captions = hit.captions || [];
  const best = words.length ? captions.reduce((a, b) => (matches(b, words) > matches(a, words) ? b : a), captions[0])
                            : captions[0];
  return card(hit, best || hit.image, "card", words, notRelevant);
}
const captionCard = (hit) => card(hit, hit.caption, "card caption-hit");

async function openViewer(id) {
  const response = await fetch(api(`/api/images/${id}`));
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

// The options of a compound query as Query.from_json spells them (search/query.py).
function readOptions() {
  const filters = {};
  const path = $("f-path").value.trim();
  if (path) filters.path_prefix = path;
  if ($("f-after").value) filters.taken_after = $("f-after").value;
  if ($("f-before").value) filters.taken_before = $("f-before").value;  // the server includes that whole day
  if ($("f-min-width").value !== "") filters.min_width = Number($("f-min-width").value);
  if ($("f-min-height").value !== "") filters.min_height = Number($("f-min-height").value);
  return {cutoff: $("only-relevant").checked ? "auto" : "none", mode: $("mode").value, sort: $("sort").value,
          dedupe: $("dedupe").checked, filters};
}

// The text in the box plus the added images and "without" words, with the options on screen now.
function compoundQuery(q) {
  const terms = q ? [{text: q, weight: 1}] : [];
  const parts = q ? [`“${q}”`] : [];
  added.forEach((term) => {
    if (term.kind === "image") {
      terms.push({image: term.data, weight: 1});
      parts.push(`+ ${term.name}`);
    } else {
      terms.push({text: term.text, weight: WITHOUT_WEIGHT});
      parts.push(`without “${term.text}”`);
    }
  });
  return withOptions({kind: "compound", terms, text: q, offset: 0, target: "images", label: parts.join(" ")});
}

function withOptions(query) {
  const options = readOptions();
  const words = options.mode === "vector" ? [] : keywordWords(query.text);
  return {...query, options, words, offset: 0};
}

function renderChips() {
  $("terms").replaceChildren(...added.map((term) => {
    const item = document.createElement("li");
    item.className = `chip ${term.kind}`;
    item.dataset.kind = term.kind;
    const name = term.kind === "image" ? term.name : `without “${term.text}”`;
    if (term.kind === "image") {
      const img = document.createElement("img");
      img.src = term.url;
      img.alt = "";
      item.append(img);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `remove ${name}`);
    remove.addEventListener("click", () => {
      added.splice(added.indexOf(term), 1);
      if (term.url) URL.revokeObjectURL(term.url);
      renderChips();
      $("q").focus();
    });
    item.append(span("name", name), remove);
    return item;
  }));
}

function canAdd() {
  if (added.length < MAX_ADDED) return true;
  setStatus(`Error: a query takes at most ${MAX_ADDED} added images and words.`, true);
  return false;
}

function addWithout() {
  const text = $("without").value.trim();
  if (!text || !canAdd()) return;
  added.push({kind: "without", text});
  $("without").value = "";
  renderChips();
}

const base64Of = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));  // after "data:…;base64,"
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(file);
});

async function addImage(file) {
  if (!file || !canAdd()) return;
  if (!file.type.startsWith("image/")) { setStatus("Error: that file is not an image.", true); return; }
  if (file.size * 4 / 3 > maxUploadBytes) {  // it travels as base64 inside the JSON body
    setStatus(`Error: the image is larger than ${document.body.dataset.maxUploadMb} MB as sent.`, true);
    return;
  }
  const name = file.name || "the pasted image";
  added.push({kind: "image", name, data: await base64Of(file), url: URL.createObjectURL(file)});
  renderChips();
  setStatus(`Added ${name} to the query: press Search.`);
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  addWithout();  // a "without" word typed but not yet added counts too
  const q = $("q").value.trim();
  if (!q && !added.some((term) => term.kind === "image")) {
    setStatus("Type something to search for.", true);
    return;
  }
  run(compoundQuery(q));
});
$("without").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && $("without").value.trim()) { event.preventDefault(); addWithout(); }
});
$("add-image").addEventListener("click", () => $("term-file").click());
$("term-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  await addImage(file);
  event.target.value = "";  // choosing the same file again adds it again
});
// Filters and the other options re-run the compound query on screen with its terms.
["only-relevant", "mode", "sort", "dedupe", "f-path", "f-after", "f-before", "f-min-width", "f-min-height"]
  .forEach((id) => $(id).addEventListener("change", () => {
    if (current && current.kind === "compound") run(withOptions(current));
  }));
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
// The index picker (several indexes): the page of the chosen index, running the text query on screen there.
const picker = $("index-picker");
if (picker) {
  picker.addEventListener("change", () => {
    const params = new URLSearchParams({index: picker.value});
    const q = $("q").value.trim();
    if (q) params.set("q", q);
    if (!$("only-relevant").checked) params.set("cutoff", "none");
    window.location.assign(`/?${params}`);
  });
}
// /?q=TEXT runs that text query on load (the evaluation page's rows link here); cutoff=none starts with "only
// relevant" off, so that the whole ranking shows
if (opened.get("cutoff") === "none") $("only-relevant").checked = false;
if ((opened.get("q") || "").trim()) {
  $("q").value = opened.get("q").trim();
  run(compoundQuery($("q").value));
}
