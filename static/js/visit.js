// The visit page: follow a citation to the transcript and the recording.
//
// A citation link ([data-cite]) highlights the segments its statement cites (aria-current),
// scrolls to the one clicked and plays the recording from its start; a transcript segment
// ([data-segment-id]) plays from its own start when clicked or activated with Enter/Space.
// Listeners sit on the document, so they keep working after htmx swaps the page body.
(function () {
  "use strict";

  function player() {
    return document.getElementById("recording-player");
  }

  function segment(id) {
    return document.querySelector('[data-segment-id="' + CSS.escape(String(id)) + '"]');
  }

  function highlight(ids) {
    document.querySelectorAll('[data-segment-id][aria-current="true"]').forEach(function (el) {
      el.removeAttribute("aria-current");
    });
    ids.forEach(function (id) {
      var el = segment(id);
      if (el) el.setAttribute("aria-current", "true");
    });
  }

  function playFrom(seconds) {
    var audio = player();
    if (!audio || !isFinite(seconds)) return;
    var seek = function () {
      audio.currentTime = seconds;
      var playing = audio.play();
      if (playing && playing.catch) playing.catch(function () {}); // a blocked play still seeks
    };
    // Seeking needs the duration: wait for the metadata when the player has none yet.
    if (audio.readyState >= 1) seek();
    else audio.addEventListener("loadedmetadata", seek, { once: true });
  }

  function startOf(el) {
    return el ? parseFloat(el.getAttribute("data-start")) : NaN;
  }

  document.addEventListener("click", function (event) {
    if (event.target.closest("[data-action=print]")) {
      window.print();
      return;
    }
    var cite = event.target.closest("[data-cite]");
    if (cite) {
      event.preventDefault();
      var group = cite.closest(".cites") || cite;
      var ids = Array.prototype.map.call(group.querySelectorAll("[data-cite]"), function (a) {
        return a.getAttribute("data-cite");
      });
      highlight(ids);
      var target = segment(cite.getAttribute("data-cite"));
      if (target) {
        target.scrollIntoView({ block: "center", behavior: "smooth" });
        playFrom(startOf(target));
      }
      return;
    }
    var seg = event.target.closest("[data-segment-id]");
    if (seg) {
      highlight([seg.getAttribute("data-segment-id")]);
      playFrom(startOf(seg));
    }
  });

  document.addEventListener("keydown", function (event) {
    if (event.key !== "Enter" && event.key !== " ") return;
    var seg = event.target.closest && event.target.closest("[data-segment-id]");
    if (!seg) return;
    event.preventDefault();
    highlight([seg.getAttribute("data-segment-id")]);
    playFrom(startOf(seg));
  });
})();
