// Pages that poll ([data-poll] with hx-trigger="every Ns") ask only while the tab is visible,
// so a tab left in the background costs the server nothing. This stands in for htmx's trigger
// filter ("every 2s [document.visibilityState === 'visible']"), which htmx evaluates with
// eval: the Content-Security-Policy, rightly, does not allow that.
(function () {
  "use strict";
  document.addEventListener("htmx:beforeRequest", function (event) {
    var from = event.detail && event.detail.elt;
    if (from && from.hasAttribute("data-poll") && document.visibilityState !== "visible") {
      event.preventDefault();
    }
  });
})();
