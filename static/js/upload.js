// Upload a recording with a progress bar, by file picker or by dropping it on the form.
//
// Without this script the form posts as usual; with it the same POST goes through
// XMLHttpRequest so that its progress can be shown. The server answers as it would the plain
// form, except that it names the new visit's page (HX-Redirect) instead of redirecting to it;
// or it sends the page again with the reason the file was refused.
(function () {
  "use strict";

  var card = document.getElementById("upload-card");
  if (!card || !window.FormData) return;

  function wire(card) {
    var form = card.querySelector("form");
    var input = form.querySelector("input[type=file]");
    var bar = card.querySelector("[data-upload-progress]");
    var note = card.querySelector("[data-upload-note]");

    ["dragenter", "dragover"].forEach(function (name) {
      form.addEventListener(name, function (event) {
        event.preventDefault();
        form.classList.add("dropping");
      });
    });
    ["dragleave", "drop"].forEach(function (name) {
      form.addEventListener(name, function () { form.classList.remove("dropping"); });
    });
    form.addEventListener("drop", function (event) {
      event.preventDefault();
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        note.textContent = "Ready to upload " + input.files[0].name + ".";
      }
    });

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action || window.location.href);
      xhr.setRequestHeader("HX-Request", "true"); // the server answers with where to go next
      xhr.upload.addEventListener("progress", function (progress) {
        if (!progress.lengthComputable) return;
        bar.hidden = false;
        bar.max = progress.total;
        bar.value = progress.loaded;
        note.textContent = "Uploading… " + Math.round((100 * progress.loaded) / progress.total) + "%";
      });
      xhr.addEventListener("load", function () {
        var next = xhr.getResponseHeader("HX-Redirect");
        if (xhr.status < 300 && next) {
          window.location.assign(next); // the new visit's page
          return;
        }
        // Refused: show the page's answer (the form with its reason) in place.
        var answer = new DOMParser().parseFromString(xhr.responseText, "text/html");
        var fresh = answer.getElementById("upload-card");
        if (fresh) {
          card.replaceWith(fresh);
          card = fresh;
          wire(fresh);
        } else {
          note.textContent = "The upload failed (HTTP " + xhr.status + "). Try again.";
        }
      });
      xhr.addEventListener("error", function () {
        bar.hidden = true;
        note.textContent = "The connection dropped during the upload; nothing was stored. Try again.";
      });
      note.textContent = "Uploading…";
      xhr.send(new FormData(form));
    });
  }

  wire(card);
})();
