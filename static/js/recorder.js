// Record a visit in the browser.
//
// MediaRecorder hands over a piece of Opus audio every few seconds. Each piece is first kept in
// IndexedDB, then sent to the server; it is deleted from the browser only when the recording
// has become a visit. If the connection drops, pieces wait and are sent again; if the page is
// reloaded mid-recording, the pieces kept so far are offered for sending on the next visit to
// this page. The server stores pieces by index, so sending one twice is harmless.
(function () {
  "use strict";

  // A reload or a closed tab loses at most the piece being recorded: keep pieces short.
  var PIECE_MS = 3000;
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
  function send(session, index, blob) {
    unsent += 1;
    queue = queue.then(function attempt(_, delay) {
      delay = delay || 1000;
      return fetch(pieceUrl(session, index), {
        method: "POST", body: blob, credentials: "same-origin",
        headers: { "X-CSRFToken": csrf, "Content-Type": "application/octet-stream" },
      }).then(function (response) {
        if (response.ok) { unsent -= 1; return; }
        return response.json().then(function (body) { throw new Error(body.error || response.statusText); });
      }).catch(function (error) {
        if (error instanceof TypeError) { // offline: wait and try again; the piece is kept
          say("Connection lost; the recording is kept in this browser and will be sent when it is back.", true);
          return new Promise(function (r) { setTimeout(r, delay); }).then(function () {
            return attempt(null, Math.min(delay * 2, 30000));
          });
        }
        unsent -= 1;
        say(error.message, true);
        throw error;
      });
    });
    return queue;
  }

  function finish(session, pieces, mime) {
    var form = new FormData();
    form.append("pieces", String(pieces));
    form.append("mime", mime);
    return fetch(finishUrl(session), {
      method: "POST", body: form, credentials: "same-origin", headers: { "X-CSRFToken": csrf },
    }).then(function (response) {
      return response.json().then(function (body) {
        if (!response.ok) throw new Error(body.error || response.statusText);
        return forget(session).then(function () { window.location.assign(body.url); });
      });
    });
  }

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
      var info = { id: session, mime: recorder.mimeType || mime, started: startedAt, pieces: 0, stopped: false };
      putSession(info);
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
          .then(function () { return finish(info.id, info.pieces, info.mime); })
          .catch(function (error) { say(error.message + " The recording is kept in this browser.", true); });
      };
      recorder.start(PIECE_MS);
      meter(stream);
      timer = setInterval(showElapsed, 250);
      button("record-start").disabled = true;
      button("record-pause").disabled = false;
      button("record-stop").disabled = false;
      say("Recording. Pieces are sent as you go.");
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
      pending = sessions && sessions.length ? sessions[0] : null;
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
    piecesOf(p.id).then(function (pieces) {
      pieces.forEach(function (piece) { send(p.id, piece.index, piece.blob); });
      var count = pieces.reduce(function (n, piece) { return Math.max(n, piece.index + 1); }, 0);
      return queue.then(function () { return finish(p.id, count, p.mime); });
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
})();
