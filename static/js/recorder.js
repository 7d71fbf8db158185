// Record a visit in the browser.
//
// Record first tells the server (with the patient's consent, asked on the page): the visit and
// its run exist from then on, and the transcript grows on the page while the visit goes on.
// MediaRecorder hands over a piece of Opus audio every few seconds. Each piece is first kept in
// IndexedDB, then sent to the server; it is deleted from the browser only once the recording is
// stopped on the server. If the connection drops, pieces wait and are sent again; if the page is
// reloaded mid-recording, the pieces kept so far are offered for sending on the next visit to
// this page, to the clinician who recorded them only. The server stores pieces by index, so
// sending one twice is harmless.
(function () {
  "use strict";

  // A reload or a closed tab loses at most the piece being recorded: keep pieces short.
  var PIECE_MS = 3000;
  // How often the transcript so far is fetched: well within one chunk (25 s) of real time.
  var TRANSCRIPT_POLL_MS = 3000;
  var DB_NAME = "visit-recordings";
  var root = document.getElementById("recorder");
  if (!root) return;

  function $(selector) { return root.querySelector(selector); }
  function button(action) { return root.querySelector('[data-action="' + action + '"]'); }
  var csrf = root.querySelector("input[name=csrfmiddlewaretoken]").value;
  var ZERO = "00000000-0000-0000-0000-000000000000";

  function pieceUrl(session, index) {
    return root.dataset.pieceUrl.replace(ZERO, session).replace(/\/0\/$/, "/" + index + "/");
  }
  function finishUrl(session) { return root.dataset.finishUrl.replace(ZERO, session); }
  function startUrl(session) { return root.dataset.startUrl.replace(ZERO, session); }
  var user = root.dataset.user;

  // --- consent: asked before anything is recorded (absent where it is collected elsewhere)
  var consentBox = $("[data-recorder-consent]");
  function consentGiven() {
    return !consentBox || !!consentBox.querySelector("input[name=consent_method]:checked");
  }
  function consentFields(form) {
    if (!consentBox) return;
    consentBox.querySelectorAll("input").forEach(function (input) {
      if ((input.type !== "radio" && input.type !== "checkbox") || input.checked) form.append(input.name, input.value);
    });
  }
  function consentShow() {
    if (recorder) return;
    button("record-start").disabled = !consentGiven();
    if (!consentGiven()) say("Record the patient's consent to recording first: nothing is recorded without it.");
    else say("");
  }
  if (consentBox) consentBox.addEventListener("change", consentShow);

  function say(text, isError) {
    var el = $("[data-recorder-message]");
    el.textContent = text;
    el.className = isError ? "error" : "muted";
  }

  // --- IndexedDB: sessions {id, mime, started, pieces, stopped} and pieces {session, index, blob}
  function openDb() {
    return new Promise(function (resolve, reject) {
      var request = indexedDB.open(DB_NAME, 1);
      request.onupgradeneeded = function () {
        var db = request.result;
        db.createObjectStore("sessions", { keyPath: "id" });
        db.createObjectStore("pieces", { keyPath: ["session", "index"] });
      };
      request.onsuccess = function () { resolve(request.result); };
      request.onerror = function () { reject(request.error); };
    });
  }
  function tx(store, mode, work) {
    return openDb().then(function (db) {
      return new Promise(function (resolve, reject) {
        var t = db.transaction(store, mode);
        var result = work(t.objectStore(store));
        t.oncomplete = function () { resolve(result && result.result !== undefined ? result.result : result); };
        t.onerror = function () { reject(t.error); };
      });
    });
  }
  function putSession(session) { return tx("sessions", "readwrite", function (s) { s.put(session); }); }
  function allSessions() { return tx("sessions", "readonly", function (s) { return s.getAll(); }); }
  function putPiece(session, index, blob) {
    return tx("pieces", "readwrite", function (s) { s.put({ session: session, index: index, blob: blob }); });
  }
  function piecesOf(session) {
    return tx("pieces", "readonly", function (s) {
      return s.getAll(IDBKeyRange.bound([session, 0], [session, Infinity]));
    });
  }
  function forget(session) {
    return Promise.all([
      tx("pieces", "readwrite", function (s) { s.delete(IDBKeyRange.bound([session, 0], [session, Infinity])); }),
      tx("sessions", "readwrite", function (s) { s.delete(session); }),
    ]);
  }

  // --- sending: one piece at a time, in order, retried with backoff until the server has it
  var queue = Promise.resolve();
  var unsent = 0;
  function showUnsent() {
    var el = $("[data-recorder-unsent]");
    el.hidden = unsent === 0;
    el.textContent = unsent === 1 ? "1 piece (the last few seconds) is not yet on the server; it is kept in this browser."
      : unsent + " pieces (" + Math.round(unsent * PIECE_MS / 1000) + " s of audio) are not yet on the server; they are kept in this browser.";
  }
  function send(session, index, blob) {
    unsent += 1;
    showUnsent();
    queue = queue.then(function attempt(_, delay) {
      delay = delay || 1000;
      return fetch(pieceUrl(session, index), {
        method: "POST", body: blob, credentials: "same-origin",
        headers: { "X-CSRFToken": csrf, "Content-Type": "application/octet-stream" },
      }).then(function (response) {
        if (response.ok) { unsent -= 1; showUnsent(); return; }
        return response.json().then(function (body) { throw new Error(body.error || response.statusText); });
      }).catch(function (error) {
        if (error instanceof TypeError) { // offline: wait and try again; the piece is kept
          say("Connection lost; the recording is kept in this browser and will be sent when it is back.", true);
          return new Promise(function (r) { setTimeout(r, delay); }).then(function () {
            return attempt(null, Math.min(delay * 2, 30000));
          });
        }
        unsent -= 1;
        showUnsent();
        say(error.message, true);
        throw error;
      });
    });
    return queue;
  }

  function post(url, form) {
    return fetch(url, {
      method: "POST", body: form, credentials: "same-origin", headers: { "X-CSRFToken": csrf },
    }).then(function (response) {
      return response.json().then(function (body) {
        if (!response.ok) throw new Error(body.error || response.statusText);
        return body;
      });
    });
  }

  // Create the visit of a session (the same visit if it exists: a resent start is harmless).
  function begin(session, mime) {
    var form = new FormData();
    form.append("mime", mime);
    consentFields(form);
    return post(startUrl(session), form);
  }

  function finish(session, pieces) {
    var form = new FormData();
    form.append("pieces", String(pieces));
    return fetch(finishUrl(session), {
      method: "POST", body: form, credentials: "same-origin", headers: { "X-CSRFToken": csrf },
    }).then(function (response) {
      return response.json().then(function (body) {
        if (!response.ok) throw new Error(body.error || response.statusText);
        stopTranscript();
        return forget(session).then(function () { window.location.assign(body.url); });
      });
    });
  }

  // --- the transcript so far, fetched while recording and shown as text (never as markup)
  var transcriptTimer = null;
  function showTranscript(url) {
    var box = $("[data-recorder-transcript]"), lines = $("[data-recorder-lines]");
    function poll() {
      if (document.hidden) return;
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (body) {
          if (!body) return;
          box.hidden = false;
          if (!body.segments.length) {
            lines.textContent = "Listening: the first lines come once the first chunk of the visit is heard.";
            return;
          }
          if (!lines.querySelector("[data-segment]")) lines.textContent = "";
          while (lines.children.length > body.segments.length) lines.removeChild(lines.lastChild);
          body.segments.forEach(function (segment, i) {
            var line = lines.children[i];
            if (!line) { line = document.createElement("p"); line.dataset.segment = String(i); lines.appendChild(line); }
            var s = Math.floor(segment.start);
            var text = Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0") + "  " + segment.text;
            if (line.textContent !== text) line.textContent = text;
          });
        })
        .catch(function () {});
    }
    stopTranscript();
    poll();
    transcriptTimer = setInterval(poll, TRANSCRIPT_POLL_MS);
  }
  function stopTranscript() { if (transcriptTimer) clearInterval(transcriptTimer); transcriptTimer = null; }

  // --- recording
  var recorder = null, stream = null, session = null, index = 0, startedAt = 0, pausedMs = 0, pausedAt = 0, timer = null;
  // Pieces are stored in order, each before it is queued for sending (sending may wait for the
  // network; storing must not).
  var stored = Promise.resolve();

  function chooseMime() {
    var choices = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm", "audio/mp4"];
    for (var i = 0; i < choices.length; i++) {
      if (window.MediaRecorder && MediaRecorder.isTypeSupported(choices[i])) return choices[i];
    }
    return "";
  }

  function showElapsed() {
    var ms = Date.now() - startedAt - pausedMs - (pausedAt ? Date.now() - pausedAt : 0);
    var s = Math.floor(ms / 1000);
    $("[data-recorder-elapsed]").textContent = Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  }

  function meter(mediaStream) {
    var AudioContext = window.AudioContext || window.webkitAudioContext;
    if (!AudioContext) return;
    var context = new AudioContext();
    var analyser = context.createAnalyser();
    analyser.fftSize = 1024;
    context.createMediaStreamSource(mediaStream).connect(analyser);
    var data = new Float32Array(analyser.fftSize);
    (function draw() {
      if (!recorder) { context.close(); return; }
      analyser.getFloatTimeDomainData(data);
      var sum = 0;
      for (var i = 0; i < data.length; i++) sum += data[i] * data[i];
      $("[data-recorder-level]").value = Math.min(1, Math.sqrt(sum / data.length) * 4);
      requestAnimationFrame(draw);
    })();
  }

  function start() {
    if (!consentGiven()) { consentShow(); return; }
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      say("This browser cannot record audio. Use a current Chrome, Edge or Firefox, or upload a file below.", true);
      return;
    }
    var mime = chooseMime();
    // The speech as spoken, for a transcription model: the browser's call processing (echo
    // cancellation, noise suppression, gain control) is tuned for calls and garbles words; with
    // it, tiny.en heard the sample's "I have a headache" as "I am a panic". Browsers that cannot
    // turn it off ignore these (they are not `exact`), so recording still starts.
    var audio = { echoCancellation: false, noiseSuppression: false, autoGainControl: false };
    navigator.mediaDevices.getUserMedia({ audio: audio }).then(function (s) {
      stream = s;
      session = crypto.randomUUID();
      index = 0; pausedMs = 0; pausedAt = 0; startedAt = Date.now();
      recorder = new MediaRecorder(stream, mime ? { mimeType: mime } : undefined);
      var info = { id: session, user: user, mime: recorder.mimeType || mime, started: startedAt, pieces: 0, stopped: false };
      recorder.ondataavailable = function (event) {
        if (!event.data || !event.data.size) return;
        var mine = index++, blob = event.data, id = session;
        info.pieces = index;
        stored = stored
          .then(function () { return putSession(info); })
          .then(function () { return putPiece(id, mine, blob); })
          .then(function () { send(id, mine, blob); });
      };
      recorder.onstop = function () {
        info.stopped = true;
        say("Sending the last pieces…");
        // The last piece's dataavailable came before this stop: once it is stored it is queued.
        stored
          .then(function () { return putSession(info); })
          .then(function () { return queue; })
          .then(function () { return finish(info.id, info.pieces); })
          .catch(function (error) { say(error.message + " The recording is kept in this browser.", true); });
      };
      button("record-start").disabled = true;
      say("Starting the visit…");
      return begin(session, info.mime).then(function (visit) {
        info.visit = visit.url;
        return putSession(info).then(function () {
          recorder.start(PIECE_MS);
          meter(stream);
          timer = setInterval(showElapsed, 250);
          button("record-pause").disabled = false;
          button("record-stop").disabled = false;
          if (consentBox) consentBox.disabled = true;
          say("Recording visit #" + visit.visit + ". It is transcribed as you go.");
          showTranscript(visit.transcript_url);
        });
      }, function (error) {
        stream.getTracks().forEach(function (t) { t.stop(); });
        recorder = null;
        button("record-start").disabled = !consentGiven();
        say(error.message, true);
      });
    }).catch(function (error) {
      if (error && (error.name === "NotAllowedError" || error.name === "SecurityError")) {
        say("The microphone was refused. Allow it for this site (the icon in the address bar) and press Record again, or upload a file below.", true);
      } else if (error && error.name === "NotFoundError") {
        say("No microphone was found. Connect one and press Record again, or upload a file below.", true);
      } else {
        say("The microphone could not be opened (" + (error && error.message) + ").", true);
      }
    });
  }

  function pause() {
    if (!recorder) return;
    if (recorder.state === "recording") {
      recorder.pause(); pausedAt = Date.now();
      button("record-pause").textContent = "Resume";
      say("Paused.");
    } else if (recorder.state === "paused") {
      recorder.resume(); pausedMs += Date.now() - pausedAt; pausedAt = 0;
      button("record-pause").textContent = "Pause";
      say("Recording.");
    }
  }

  function stop() {
    if (!recorder) return;
    recorder.stop();
    stream.getTracks().forEach(function (t) { t.stop(); });
    clearInterval(timer);
    recorder = null;
    button("record-pause").disabled = true;
    button("record-stop").disabled = true;
  }

  // --- a recording left behind by a reload or a closed tab
  var pending = null;
  function offerPending() {
    allSessions().then(function (sessions) {
      // A shared workstation: another clinician's kept recording is never offered (nor sent).
      var mine = (sessions || []).filter(function (s) { return String(s.user) === user; });
      pending = mine.length ? mine[0] : null;
      if (!pending) return;
      var when = new Date(pending.started).toLocaleTimeString();
      $("[data-recorder-pending-text]").textContent =
        "A recording started at " + when + " was not fully sent (" + pending.pieces + " piece(s) kept in this browser).";
      $("[data-recorder-pending]").hidden = false;
    }).catch(function () {});
  }
  function resend() {
    if (!pending) return;
    var p = pending;
    say("Sending the kept recording…");
    // Started already (the same visit), or, for a recording kept from before, started now.
    begin(p.id, p.mime).then(function () { return piecesOf(p.id); }).then(function (pieces) {
      pieces.forEach(function (piece) { send(p.id, piece.index, piece.blob); });
      var count = pieces.reduce(function (n, piece) { return Math.max(n, piece.index + 1); }, 0);
      return queue.then(function () { return finish(p.id, count); });
    }).catch(function (error) { say(error.message, true); });
  }
  function discard() {
    if (!pending || !window.confirm("Discard the kept recording? This cannot be undone.")) return;
    forget(pending.id).then(function () { $("[data-recorder-pending]").hidden = true; pending = null; offerPending(); });
  }

  button("record-start").addEventListener("click", start);
  button("record-pause").addEventListener("click", pause);
  button("record-stop").addEventListener("click", stop);
  button("record-resend").addEventListener("click", resend);
  button("record-discard").addEventListener("click", discard);
  window.addEventListener("beforeunload", function (event) {
    if (recorder || unsent > 0) { event.preventDefault(); event.returnValue = ""; }
  });
  offerPending();
  consentShow();
})();
