// qcluster dashboard: keep the open page fresh without a build step or a library.
// Every data-refresh seconds (on <body>), fetch this same URL and swap in its <main>,
// unless the user is busy on the page: a field has focus, a box is ticked, or text is
// selected (so a half-made bulk selection or a search being typed is never wiped).
// A page that no longer comes back (logged out, the server gone) is loaded whole.
(function () {
  "use strict";
  var seconds = parseFloat(document.body.getAttribute("data-refresh") || "0");
  if (!(seconds > 0) || !window.fetch || !window.DOMParser) { return; }

  function busy() {
    var active = document.activeElement;
    if (active && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) { return true; }
    var sel = window.getSelection && window.getSelection();
    if (sel && String(sel).length > 0) { return true; }
    var boxes = document.querySelectorAll("main input[type=checkbox][name=job]");
    for (var i = 0; i < boxes.length; i++) { if (boxes[i].checked) { return true; } }
    return false;
  }

  function refresh() {
    if (document.hidden || busy()) { return schedule(); }
    fetch(window.location.href, { credentials: "same-origin", redirect: "manual",
                                  headers: { "X-Refresh": "1" } })
      .then(function (response) {
        if (response.type === "opaqueredirect" || !response.ok) {
          if (response.status !== 503) { window.location.reload(); }
          return null;
        }
        return response.text();
      })
      .then(function (html) {
        if (html === null || busy()) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        var main = document.getElementById("main");
        if (fresh && main) { main.replaceChildren.apply(main, Array.from(fresh.childNodes)); }
      })
      .catch(function () { /* the server is away: try again at the next tick */ })
      .then(schedule);
  }

  function schedule() { window.setTimeout(refresh, seconds * 1000); }
  schedule();
})();
