// mailplatform: copy buttons, live message lists (polling), countdowns. No inline script (CSP).
"use strict";
(function () {
  function copy(text, button) {
    function done() {
      var label = button.textContent;
      button.textContent = "Copied";
      button.setAttribute("data-copied", "1");
      setTimeout(function () { button.textContent = label; }, 1500);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
    } else { fallback(text); done(); }
  }
  function fallback(text) {
    var area = document.createElement("textarea");
    area.value = text; area.setAttribute("readonly", ""); area.style.position = "fixed"; area.style.opacity = "0";
    document.body.appendChild(area); area.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing more to try */ }
    document.body.removeChild(area);
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (button) { event.preventDefault(); copy(button.getAttribute("data-copy"), button); }
  });

  // Live updates: ask a cheap "anything new since cursor?" every few seconds, then reload the list.
  function live(container) {
    var url = container.getAttribute("data-poll-url");
    var busy = false;
    function list() { return container.querySelector(".messages"); }
    function refresh() {
      var page = new URL(window.location.href);
      page.searchParams.set("partial", "1");
      return fetch(page.toString(), { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) { container.innerHTML = html; });
    }
    function tick() {
      if (busy || document.hidden || new URL(window.location.href).searchParams.get("before")) { return; }
      busy = true;
      var current = list();
      var cursor = current ? current.getAttribute("data-cursor") : "";
      var pending = current && current.hasAttribute("data-pending");
      fetch(url + "?since=" + encodeURIComponent(cursor || ""), { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (body) { return (body.changed || pending) ? refresh() : null; })
        .catch(function () { /* try again next tick */ })
        .then(function () { busy = false; });
    }
    setInterval(tick, 2500);
  }
  function countdown(element) {
    var end = Date.parse(element.getAttribute("data-expires"));
    function render() {
      var left = Math.max(0, Math.floor((end - Date.now()) / 1000));
      var h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = left % 60;
      element.textContent = h + " h " + String(m).padStart(2, "0") + " min " + String(s).padStart(2, "0") + " s";
    }
    render(); setInterval(render, 1000);
  }
  // Live figures (the console's pools): reload the fragment every few seconds while visible.
  function refreshing(container) {
    var seconds = parseInt(container.getAttribute("data-refresh-every"), 10) || 5;
    setInterval(function () {
      if (document.hidden) { return; }
      var page = new URL(window.location.href);
      page.searchParams.set("partial", "1");
      fetch(page.toString(), { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) { container.innerHTML = html; })
        .catch(function () { /* try again next time */ });
    }, seconds * 1000);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-poll-url]").forEach(live);
    document.querySelectorAll("[data-refresh-every]").forEach(refreshing);
    document.querySelectorAll("[data-expires]").forEach(countdown);
  });
})();
