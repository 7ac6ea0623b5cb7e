// Keyboard shortcuts for the hf-tuner label page. The page works without this file: every judgment is a
// plain form post. Here keys press the buttons, build a ranking, and a judgment is sent only once.
(function () {
  "use strict";
  const form = document.getElementById("judge");
  if (!form) return;

  // One post per page: a second key press or click before the next item loads is dropped here
  // (and the server would answer it as a duplicate anyway).
  form.addEventListener("submit", function (event) {
    if (form.dataset.sent) { event.preventDefault(); return; }
    form.dataset.sent = "1";
    document.body.classList.add("sending");
  });
  function send(submitter) {
    if (!form.dataset.sent) form.requestSubmit(submitter || null);
  }

  if (form.dataset.kind === "pair") {
    const keys = {"1": "1", "ArrowLeft": "1", "2": "2", "ArrowRight": "2", "t": "t", "T": "t", "ArrowDown": "t", "0": "t"};
    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey) return;
      const key = keys[event.key];
      if (!key) return;
      event.preventDefault();
      send(form.querySelector('button[data-key="' + key + '"]'));
    });
    return;
  }

  // Ranking 3 or 4 responses: numbers best first, "=" ties the next number with the one before.
  const k = Number(form.dataset.k);
  const input = document.getElementById("order");
  const cards = Array.from(document.querySelectorAll(".response"));
  let groups = [];
  let tieNext = false;
  input.readOnly = true;

  function placed() { return groups.flat(); }
  function show() {
    input.value = groups.map(function (g) { return g.join("="); }).join(">") + (tieNext ? "=" : "");
    cards.forEach(function (card) {
      const pos = Number(card.dataset.pos);
      const level = groups.findIndex(function (g) { return g.indexOf(pos) >= 0; });
      card.querySelector(".rank").textContent = level < 0 ? "" : "rank " + (level + 1);
      card.classList.toggle("ranked", level >= 0);
    });
  }
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const pos = Number(event.key);
    if (pos >= 1 && pos <= k) {
      event.preventDefault();
      if (placed().indexOf(pos) >= 0) return;
      if (tieNext && groups.length) groups[groups.length - 1].push(pos); else groups.push([pos]);
      tieNext = false;
    } else if (event.key === "=") {
      event.preventDefault();
      tieNext = groups.length > 0;
    } else if (event.key === "Backspace") {
      event.preventDefault();
      if (tieNext) tieNext = false;
      else if (groups.length) { groups[groups.length - 1].pop(); if (!groups[groups.length - 1].length) groups.pop(); }
    } else if (event.key === "t" || event.key === "T") {
      event.preventDefault();
      groups = [Array.from({length: k}, function (_, i) { return i + 1; })];
      tieNext = false;
      show();
      send(null);
      return;
    } else if (event.key === "Enter") {
      event.preventDefault();
      if (placed().length === k) { send(null); return; }
      input.setCustomValidity("rank all " + k + " responses first");
      input.reportValidity();
      return;
    } else {
      return;
    }
    input.setCustomValidity("");
    show();
  });
})();
