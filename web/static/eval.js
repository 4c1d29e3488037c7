// Evaluation page: the recall table, slices and (with a compared index) the comparison from /api/eval/summary; the
// failure list from /api/eval, filtered and paged. Server data goes into the page with textContent or as attributes.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE_ROWS = parseInt(document.body.dataset.pageRows, 10);
const DIRECTIONS = {text_to_image: "text→image", image_to_text: "image→text"};
const percent = (value) => (value === null || value === undefined ? "–" : value.toFixed(2));
let offset = 0;
let shown = null;  // the request whose rows are on screen (a newer one replaces it)
const indexName = new URLSearchParams(window.location.search).get("index");  // a server with several indexes

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function cell(text, value) {
  const td = element("td", "", text);
  if (value !== undefined && value !== null) td.dataset.value = value;  // the exact number, for scripts and tests
  return td;
}

function setStatus(node, message, isError = false) {
  node.textContent = message;
  node.classList.toggle("error", isError);
}

async function getJson(url) {
  const response = await fetch(url);
  const body = await response.json().catch(() => ({error: `server answered ${response.status}`}));
  if (!response.ok) throw new Error(body.error || `server answered ${response.status}`);
  return body;
}

function showRecall(summary) {
  $("recall-table").tBodies[0].replaceChildren(...Object.keys(DIRECTIONS).map((kind) => {
    const recall = summary.recall[kind];
    const row = element("tr");
    row.dataset.kind = kind;
    row.append(element("th", "", DIRECTIONS[kind]));
    ["R@1", "R@5", "R@10"].forEach((k) => {
      const td = cell(percent(recall[k]), recall[k]);
      td.dataset.k = k;
      row.append(td);
    });
    row.append(cell(String(summary.n_queries[kind])));
    return row;
  }));
  const slices = summary.slices;
  $("slices").tBodies[0].replaceChildren(...slices.groups.map((group) => {
    const row = element("tr");
    row.dataset.group = group.group;
    const gap = group.recall === null ? "" : `${group.recall - slices.all >= 0 ? "+" : "−"}` +
                                             `${Math.abs(group.recall - slices.all).toFixed(1)} vs all ` +
                                             `${slices.all.toFixed(1)} %`;
    row.classList.toggle("worse", group.recall !== null && group.recall < slices.all);
    row.append(element("th", "", group.label), cell(percent(group.recall), group.recall),
               cell(String(group.n), group.n), cell(gap));
    return row;
  }));
}

function searchLink(text, href) {
  const link = element("a", "open", text);
  link.href = href;
  link.title = "open this query on the search page";
  return link;
}

function showChanges(comparison) {
  const blocks = [];
  Object.keys(DIRECTIONS).forEach((kind) => {
    [["improved", "improved most under B"], ["worsened", "worsened most under B"]].forEach(([way, title]) => {
      const changes = comparison[kind][way];
      if (!changes.length) return;
      const block = element("div", `change-list ${way}`);
      block.dataset.kind = kind;
      block.append(element("h3", "", `${DIRECTIONS[kind]}, ${title} (rank A → B)`));
      const list = element("ol");
      changes.forEach((change) => {
        const item = element("li");
        item.append(element("span", "ranks", `${change.rank_a} → ${change.rank_b}`), " ");
        const href = (comparison.search[kind] || {})[change.query_id];
        item.append(href ? searchLink(change.query, href) : element("span", "", change.query));
        list.append(item);
      });
      block.append(list);
      blocks.push(block);
    });
  });
  $("changes").replaceChildren(...blocks);
}

function showComparison(comparison) {
  if (!$("compare")) return;
  if (comparison.error) {
    setStatus($("compare-what"), `No comparison: ${comparison.error}`, true);
    return;
  }
  const name = (label, letter) => (label.startsWith(`${letter}: `) ? label : `${letter}: ${label}`);
  $("compare-what").textContent = `${name(comparison.a, "A")} · ${name(comparison.b, "B")} · B − A with a ` +
    `${Math.round(comparison.confidence * 100)} % paired-bootstrap interval (${comparison.n_boot} resamples of the ` +
    "queries); * marks an interval that excludes 0";
  const rows = [];
  Object.keys(DIRECTIONS).forEach((kind) => comparison[kind].recall.forEach((d) => {
    const row = element("tr");
    row.dataset.kind = kind;
    row.dataset.k = d.k;
    const excludes = d.ci_low > 0 || d.ci_high < 0;
    const sign = (v) => (v > 0 ? "+" : "") + v.toFixed(2);
    row.append(element("th", "", DIRECTIONS[kind]), cell(`R@${d.k}`), cell(percent(d.a), d.a),
               cell(percent(d.b), d.b), cell(sign(d.difference) + (excludes ? " *" : ""), d.difference),
               cell(`[${sign(d.ci_low)}, ${sign(d.ci_high)}]`));
    row.classList.toggle("significant", excludes);
    rows.push(row);
  }));
  $("compare-table").tBodies[0].replaceChildren(...rows);
  $("compare-plots").replaceChildren(...Object.keys(DIRECTIONS).flatMap((kind) =>
    ["recall", "ranks"].map((which) => {
      const image = element("img");
      image.src = comparison.plots[kind][which];
      image.alt = `${DIRECTIONS[kind]} ${which === "recall" ? "recall@k of A and B" : "rank under A against B"}`;
      image.width = 640;
      image.height = 420;
      return image;
    })));
  showChanges(comparison);
}

function thumbnail(item, label) {
  const figure = element("figure", "item");
  const image = element("img");
  image.src = item.thumbnail;
  image.alt = item.image || item.query || "";
  image.loading = "lazy";
  figure.append(image, element("figcaption", "", label));
  return figure;
}

function captionItem(item, label) {
  const block = element("div", "item caption-item");
  block.append(element("span", "score", label), " ", element("span", "", item.caption || `caption ${item.id}`));
  return block;
}

function failureRow(row) {
  const item = element("li", "failure");
  item.dataset.rank = row.rank;
  item.dataset.queryId = row.query_id;
  const head = element("div", "head");
  head.append(element("span", "rank", `rank ${row.rank}`), " ", element("span", "score", row.score.toFixed(3)), " ");
  if (row.kind === "text_to_image") {
    head.append(searchLink(row.query, row.search));
  } else {
    const link = element("a", "open", row.query);
    link.href = row.url;
    head.append(link);
  }
  item.append(head);
  const strip = element("div", "strip");
  const images = row.kind === "text_to_image";  // else the candidates are captions
  const show = (candidate, label, className) => {
    const node = images ? thumbnail(candidate, label) : captionItem(candidate, label);
    if (className) node.classList.add(className);
    strip.append(node);
  };
  if (!images) {
    const query = thumbnail(row, "the query");
    query.classList.add("query");
    strip.append(query);
  }
  // an image's gold captions: the best of them scored row.score, shown in the head
  row.gold.forEach((gold) => show(gold, images ? `correct · ${row.score.toFixed(3)}` : "correct", "gold"));
  row.beaten_by.forEach((other) => show(other, other.score.toFixed(3), "beat"));
  item.append(strip);
  return item;
}

function filters() {
  const kind = $("kind").value;
  const params = {kind, fell: $("fell").value, offset, limit: PAGE_ROWS};
  if (kind === "text_to_image") {
    if ($("length").value) params.length = $("length").value;
    if ($("feature").value) params.feature = $("feature").value;
    if ($("language").value) params.language = $("language").value;
  }
  if (indexName) params.index = indexName;
  return new URLSearchParams(params);
}

async function loadFailures() {
  const query = filters().toString();
  shown = query;
  $("failures").setAttribute("aria-busy", "true");
  setStatus($("failures-status"), "Loading…");
  let body;
  try {
    body = await getJson(`/api/eval?${query}`);
  } catch (error) {
    if (shown === query) setStatus($("failures-status"), `Error: ${error.message}`, true);
    return;
  }
  if (shown !== query) return;  // the filters changed meanwhile
  $("failures").replaceChildren(...body.rows.map(failureRow));
  $("failures").start = body.offset + 1;
  $("failures").removeAttribute("aria-busy");
  const last = body.offset + body.rows.length;
  setStatus($("failures-status"), body.total ? `${body.offset + 1}–${last} of ${body.total} queries`
                                              : "No query matches these filters.");
  $("previous").hidden = body.offset === 0;
  $("next").hidden = last >= body.total;
}

async function loadSummary() {
  try {
    const summary = await getJson(indexName ? `/api/eval/summary?${new URLSearchParams({index: indexName})}`
                                            : "/api/eval/summary");
    showRecall(summary);
    // captions in several languages: the summary has a slice per language, and the failures can be filtered by it
    $("language-choice").hidden = !summary.slices.groups.some((group) => group.group.startsWith("language_"));
    if (summary.compare) showComparison(summary.compare);
    setStatus($("status"), `${summary.index} · ${summary.n_queries.text_to_image} captions and ` +
                           `${summary.n_queries.image_to_text} images as queries · ${summary.ties} ties`);
  } catch (error) {
    setStatus($("status"), `Error: ${error.message}`, true);
  }
}

$("filters").addEventListener("change", () => {
  const captions = $("kind").value === "text_to_image";
  ["length", "feature", "language"].forEach((id) => { $(id).disabled = !captions; });
  offset = 0;
  loadFailures();
});
$("filters").addEventListener("submit", (event) => event.preventDefault());
$("previous").addEventListener("click", () => { offset = Math.max(0, offset - PAGE_ROWS); loadFailures(); });
$("next").addEventListener("click", () => { offset += PAGE_ROWS; loadFailures(); });
loadSummary();
loadFailures();
