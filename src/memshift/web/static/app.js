// The dashboard's only script besides the chart: re-read the page every few seconds
// and swap in the regions marked data-live, unless the reader is typing in a form,
// the tab is hidden, or refreshing is paused. Nothing is loaded from elsewhere.
(function () {
  "use strict";
  const main = document.getElementById("content");
  const seconds = Number((main && main.dataset.refresh) || 0);
  const toggle = document.getElementById("refresh-toggle");
  const KEY = "memshift.refresh.paused";
  let paused = window.localStorage.getItem(KEY) === "1";

  function showToggle() {
    if (toggle) toggle.textContent = paused ? "resume" : "pause";
  }

  function typing() {
    const el = document.activeElement;
    return el && el.matches("input, textarea, select") && el.closest("main") !== null;
  }

  async function refresh() {
    if (paused || document.hidden || typing()) return;
    let response;
    try {
      response = await fetch(window.location.href, {
        headers: { Accept: "text/html" }, credentials: "same-origin", cache: "no-store",
      });
    } catch (err) {
      document.body.classList.add("offline");
      return;
    }
    if (response.status === 401) { window.location.reload(); return; }
    document.body.classList.toggle("offline", !response.ok);
    if (!response.ok) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const region of document.querySelectorAll("[data-live]")) {
      const next = fresh.getElementById(region.id);
      if (next) region.replaceWith(document.importNode(next, true));
    }
    document.dispatchEvent(new CustomEvent("memshift:refreshed"));
  }

  if (toggle) {
    showToggle();
    toggle.addEventListener("click", function () {
      paused = !paused;
      window.localStorage.setItem(KEY, paused ? "1" : "0");
      showToggle();
      if (!paused) refresh();
    });
  }
  if (seconds > 0) window.setInterval(refresh, seconds * 1000);
})();
