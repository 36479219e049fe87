// chartbrief review screen: citation pop-outs and the streamed summary.
// No framework and no inline script (the page's CSP forbids it). Every HTML fragment inserted here
// was rendered and escaped by the server; model text is only ever set as textContent.
"use strict";

(function () {
  const review = document.getElementById("review");
  if (!review) {
    return;
  }
  const statusLine = document.getElementById("status");
  const sourceView = document.getElementById("source-view");
  const sources = document.getElementById("sources");

  function setStatus(text) {
    if (statusLine) {
      statusLine.textContent = text;
    }
  }

  function showSource(key) {
    const source = document.getElementById("source-" + key);
    sourceView.replaceChildren();
    if (!source) {
      const missing = document.createElement("p");
      missing.textContent = "Source " + key + " is not in the record that was read.";
      sourceView.appendChild(missing);
      return;
    }
    const copy = source.cloneNode(true);
    copy.removeAttribute("id");
    copy.hidden = false;
    sourceView.appendChild(copy);
    document.querySelectorAll(".cite.active").forEach(function (b) { b.classList.remove("active"); });
    document.querySelectorAll('.cite[data-key="' + key + '"]').forEach(function (b) { b.classList.add("active"); });
  }

  document.addEventListener("click", function (event) {
    const button = event.target.closest("button.cite");
    if (button) {
      event.preventDefault();
      showSource(button.dataset.key);
    }
  });

  const streamUrl = review.dataset.streamUrl;
  if (!streamUrl) {
    return;
  }

  const structured = document.getElementById("structured");
  const narrative = document.getElementById("narrative");
  const live = document.getElementById("live");
  const liveText = document.getElementById("live-text");
  const draft = document.getElementById("draft");
  const actions = document.getElementById("actions");
  const stream = new EventSource(streamUrl);
  let finished = false;
  let pieces = 0;

  function fragment(event) {
    return JSON.parse(event.data);
  }

  stream.addEventListener("status", function (event) {
    setStatus(fragment(event).text);
  });
  stream.addEventListener("structured", function (event) {
    const data = fragment(event);
    structured.innerHTML = data.html;
    sources.insertAdjacentHTML("beforeend", data.sources);
  });
  stream.addEventListener("token", function (event) {
    live.hidden = false;
    liveText.textContent += fragment(event).text;
    pieces += 1;
    review.dataset.streamedPieces = String(pieces);
  });
  stream.addEventListener("narrative", function (event) {
    const data = fragment(event);
    narrative.innerHTML = data.html;
    sources.insertAdjacentHTML("beforeend", data.sources);
  });
  stream.addEventListener("draft", function (event) {
    const data = fragment(event);
    draft.innerHTML = data.html;
    actions.innerHTML = data.actions;
    review.dataset.documentReference = data.id;
  });
  stream.addEventListener("failed", function (event) {
    finished = true;
    stream.close();
    const message = document.createElement("p");
    message.className = "error-message";
    message.setAttribute("role", "alert");
    message.textContent = fragment(event).text;
    narrative.appendChild(message);
    setStatus("The summary could not be made.");
  });
  stream.addEventListener("done", function (event) {
    finished = true;
    stream.close();
    setStatus(fragment(event).text);
    review.dataset.ready = "true";
  });
  stream.onerror = function () {
    if (!finished) {
      // Without this the browser would reconnect and start a second summary.
      stream.close();
      setStatus("The connection to chartbrief was lost. Reload the page to try again.");
    }
  };
})();
