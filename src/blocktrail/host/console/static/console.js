// blocktrail console: refresh the parts marked data-poll every second, and send the forms
// marked data-async without leaving the page. Every page also works without this script.
"use strict";

function refresh(element) {
  return fetch(element.dataset.poll, { headers: { "X-Console": "fetch" }, credentials: "same-origin" })
    .then(function (response) { return response.ok ? response.text() : null; })
    .then(function (html) { if (html !== null) { element.innerHTML = html; } })
    .catch(function () { /* the host may be restarting: the next poll tries again */ });
}

function refreshAll() {
  return Promise.all(Array.from(document.querySelectorAll("[data-poll]")).map(refresh));
}

function flash(text, ok) {
  var box = document.getElementById("flash");
  if (box) {
    box.textContent = text;
    box.className = "flash " + (ok ? "ok" : "error");
  }
}

function submitAsync(event) {
  var form = event.target;
  if (!form.matches("form[data-async]")) { return; }
  event.preventDefault();
  var body = new URLSearchParams(new FormData(form));
  fetch(form.action, { method: "POST", body: body, credentials: "same-origin",
                       headers: { "X-Console": "fetch" } })
    .then(function (response) { return response.json(); })
    .then(function (answer) {
      flash(answer.message, answer.ok);
      if (answer.ok && form.querySelector("[name=take-snapshot]")) {
        window.location.reload();
        return;
      }
      refreshAll();
    })
    .catch(function (error) { flash("the host did not answer: " + error, false); });
}

document.addEventListener("submit", submitAsync);
document.addEventListener("DOMContentLoaded", function () {
  if (document.querySelector("[data-poll]")) { window.setInterval(refreshAll, 1000); }
});
