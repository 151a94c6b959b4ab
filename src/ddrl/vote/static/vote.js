// The blind comparison page: asks the server for a question, shows its two samples, and sends
// one choice per criterion (or a skip) with the time taken. It knows nothing of the models.
"use strict";

const $ = (id) => document.getElementById(id);
const KEYS = { ArrowLeft: "left", 1: "left", ArrowRight: "right", 2: "right",
               ArrowDown: "tie", 3: "tie" };
const LABELS = { left: "\u2190 Left", tie: "\u2193 Tie", right: "Right \u2192" };
let rater = "";
let current = null;  // the question shown
let picks = {};      // criterion -> "left" | "right" | "tie"
let shownAt = 0;     // when both samples had loaded: the time taken counts from there
let busy = false;
let loading = 0;     // samples of the current question still loading

function say(text, error) {
  $("message").textContent = text;
  $("message").className = error ? "error" : "";
}

function start() {
  const name = $("rater").value.trim();
  if (!name) { say("Type your name first.", true); $("rater").focus(); return; }
  rater = name;
  localStorage.setItem("rater", name);
  $("rater").blur();
  next();
}

async function next() {
  busy = true;
  try {
    const r = await fetch("/api/next?rater=" + encodeURIComponent(rater));
    const q = await r.json();
    if (!r.ok) { say(q.error, true); return; }
    show(q);
  } catch (e) {
    say("The server did not answer: " + e, true);
  } finally {
    busy = false;
  }
}

function media(url, kind) {
  const el = document.createElement(kind === "video" ? "video" : "img");
  if (kind === "video") {
    Object.assign(el, { autoplay: true, loop: true, muted: true, playsInline: true });
  } else {
    el.alt = "sample";
  }
  el.addEventListener(kind === "video" ? "loadeddata" : "load", loaded, { once: true });
  el.addEventListener("error", () => say("A sample did not load; press s to skip.", true));
  el.src = url;
  return el;
}

// The choices open once both samples are on screen (a click cannot land on a shifting page).
function loaded() {
  if (--loading > 0) return;
  for (const b of $("criteria").querySelectorAll("button")) b.disabled = false;
  shownAt = performance.now();
}

function show(q) {
  const p = q.progress;
  $("progress").textContent = (q.done ? p.done : p.done + 1) + " of " + p.total;
  if (q.done) {
    current = null;
    $("question").hidden = true;
    say("Nothing left to rate for " + rater + ". Thank you!");
    return;
  }
  current = q;
  picks = {};
  loading = 2;
  $("prompt").textContent = q.prompt;
  const rows = q.criteria.map((c) => {
    const row = document.createElement("div");
    row.className = "criterion";
    row.dataset.criterion = c;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = q.criteria.length > 1 ? c : "Which is better?";
    row.append(name);
    for (const choice of ["left", "tie", "right"]) {
      const b = document.createElement("button");
      b.type = "button";
      b.id = q.criteria.length > 1 ? choice + "-" + c : choice;
      b.dataset.choice = choice;
      b.textContent = LABELS[choice];
      b.disabled = true;
      b.addEventListener("click", () => pick(c, choice));
      row.append(b);
    }
    return row;
  });
  $("criteria").replaceChildren(...rows);
  $("left-media").replaceChildren(media(q.left, q.kind));
  $("right-media").replaceChildren(media(q.right, q.kind));
  $("question").hidden = false;
  say("");
  mark();
}

function mark() {
  const first = current.criteria.find((c) => !(c in picks));
  for (const row of $("criteria").children) {
    const c = row.dataset.criterion;
    row.classList.toggle("current", c === first && current.criteria.length > 1);
    for (const b of row.querySelectorAll("button")) {
      b.classList.toggle("picked", picks[c] === b.dataset.choice);
    }
  }
}

function pick(criterion, choice) {
  if (!current || busy || loading > 0) return;
  picks[criterion] = choice;
  mark();
  if (current.criteria.every((c) => c in picks)) submit({ choices: picks });
}

async function submit(answer) {
  busy = true;
  const body = { question: current.question, rater: rater,
                 ms: Math.round(performance.now() - shownAt), ...answer };
  try {
    const r = await fetch("/api/vote", { method: "POST", body: JSON.stringify(body),
                                         headers: { "content-type": "application/json" } });
    const a = await r.json();
    if (!r.ok && r.status !== 409) { say(a.error, true); busy = false; return; }
  } catch (e) {
    say("The vote was not sent: " + e, true);
    busy = false;
    return;
  }
  next();
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey || !current) return;
  if (e.key in KEYS) {
    e.preventDefault();
    const first = current.criteria.find((c) => !(c in picks));
    if (first !== undefined) pick(first, KEYS[e.key]);
  } else if (e.key === "s" || e.key === "S") {
    e.preventDefault();
    if (!busy) submit({ skip: true });
  }
});

$("start").addEventListener("click", start);
$("rater").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
$("skip").addEventListener("click", () => { if (current && !busy) submit({ skip: true }); });
rater = new URLSearchParams(location.search).get("rater") || localStorage.getItem("rater") || "";
$("rater").value = rater;
if (rater) start();
