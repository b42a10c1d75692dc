// The edgeq dashboard: every device's state, live detections with their uncertainty and review flags, stats and
// the latest snapshot, straight from the broker over MQTT-over-WebSockets (the vendored MQTT.js).
// config.js sets window.EDGEQ = {url, prefix, username, password}; `edgeq dashboard` writes it.
"use strict";

(function () {
  const cfg = window.EDGEQ || {};
  const prefix = cfg.prefix || "edgeq";
  const devices = new Map();
  const brokerEl = document.getElementById("broker");
  const main = document.getElementById("devices");

  function setBroker(state, text) {
    brokerEl.dataset.state = state;
    brokerEl.textContent = text;
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function device(id) {
    if (devices.has(id)) return devices.get(id);
    const empty = document.getElementById("empty");
    if (empty) empty.remove();
    const card = el("section", { class: "device", "data-device": id });
    const head = el("h2");
    head.append(el("span", {}, id), el("span", { class: "state", "data-state": "unknown" }, "unknown"));
    const stats = el("div", { class: "stats" }, "no stats yet");
    const table = el("table", { class: "detections" });
    // what the bar says: the device publishes each result's unfamiliarity percentile among the known results of
    // the bundle's --val; a result past the bundle's review threshold is flagged (red) with its reason
    const legend = el("p", { class: "legend" });
    legend.append(el("span", { class: "bar" }, ""), el("span", {}, " how unfamiliar: the percentile among the known " +
                  "results the bundle was calibrated on (100: less familiar than all of them; without that measure, " +
                  "the entropy, scaled). Red rows are flagged " +
                  "for review, past the bundle's threshold; \"unknown\" is an object of none of its classes."));
    legend.firstChild.append(el("span", { style: "width: 50%" }));
    card.append(head, stats, table, legend);  // the snapshot goes above the table when the device sends one
    main.append(card);
    const d = { card, state: head.lastChild, stats, img: null, table, url: null };
    devices.set(id, d);
    return d;
  }

  function onStatus(id, msg) {
    // "online"; "stopped" (a clean shutdown) and "offline" (the last will: it vanished) both mean not running
    const d = device(id);
    const state = msg.state === "online" ? "online" : "offline";
    d.state.dataset.state = state;
    d.state.textContent = msg.state === "stopped" ? "offline (stopped)" : state;
    d.card.dataset.state = state;
  }

  function onStats(id, msg) {
    const d = device(id);
    const parts = [`${msg.fps} fps`, `inference p50 ${msg.inference_ms ? msg.inference_ms.p50 : "?"} ms`,
                   `spool ${msg.spool_depth ?? "?"}`];
    if (msg.mqtt_error) parts.push(`broker: ${msg.mqtt_error}`);
    d.stats.textContent = parts.join(" · ");
  }

  function onDetections(id, msg) {
    const d = device(id);
    d.card.dataset.seq = msg.seq;
    d.table.replaceChildren();
    for (const det of msg.detections || []) {
      const u = det.uncertainty || {};
      const pct = u.unfamiliarity_percentile;
      const row = el("tr", { class: det.needs_review ? "flagged" : "trusted",
                             "data-needs-review": String(Boolean(det.needs_review)) });
      const bar = el("div", { class: "bar", title: pct !== undefined ? `unfamiliarity percentile ${pct}`
                                                                      : `entropy ${u.predictive_entropy}` });
      const fill = el("span");
      // the bar: how unusual the result is, 0..100 (the unfamiliarity percentile; else entropy, scaled)
      const level = pct !== undefined ? pct : Math.min(100, 100 * (u.predictive_entropy || 0) / 2.3);
      fill.style.width = `${level.toFixed(0)}%`;
      bar.append(fill);
      const barCell = el("td");
      barCell.append(bar);
      // an object of no known class (schema 4): "unknown", with the known class it is nearest to
      const unknown = det.label === "unknown";
      if (unknown) row.classList.add("unknown");
      const name = el("td", {}, det.label);
      if (unknown && det.nearest_label) name.append(el("small", { class: "nearest" }, ` nearest: ${det.nearest_label}`));
      row.append(name, el("td", {}, det.score.toFixed(2)), barCell,
                 el("td", { class: det.needs_review ? "reason" : "" },
                    det.needs_review ? `review: ${det.review_reason || "uncertain"}` : "trusted"));
      d.table.append(row);
    }
  }

  function onSnapshot(id, payload) {
    const d = device(id);
    if (!d.img) {  // no box at all until a snapshot arrives (a device with snapshots off never shows one)
      d.img = el("img", { class: "snapshot", alt: "latest snapshot of " + id });
      d.card.insertBefore(d.img, d.table);
    }
    if (d.url) URL.revokeObjectURL(d.url);
    d.url = URL.createObjectURL(new Blob([payload], { type: "image/jpeg" }));
    d.img.src = d.url;
  }

  if (!window.mqtt) {
    setBroker("error", "MQTT.js did not load (vendor/mqtt.min.js)");
    return;
  }
  const options = { reconnectPeriod: 2000, connectTimeout: 5000, clientId: "edgeq-dashboard-" + Math.random().toString(16).slice(2, 10) };
  if (cfg.username) { options.username = cfg.username; options.password = cfg.password || ""; }
  const client = window.mqtt.connect(cfg.url, options);
  window.edgeqClient = client;
  client.on("connect", () => {
    setBroker("connected", `connected to ${cfg.url}`);
    client.subscribe([`${prefix}/+/status`, `${prefix}/+/stats`, `${prefix}/+/detections`, `${prefix}/+/snapshot`]);
  });
  // a broker that is down: shown, and retried every reconnectPeriod by MQTT.js (no busy loop). Never connected
  // at all: the usual cause is a broker without a WebSockets listener, so the page says what to add
  let everConnected = false;
  client.on("connect", () => { everConnected = true; });
  function down() {
    const hint = everConnected ? "" : " (never reached: the broker needs a WebSockets listener, e.g. mosquitto's " +
      "\"listener 9001\" + \"protocol websockets\"; see docs/dashboard.md)";
    setBroker("disconnected", `disconnected from ${cfg.url}; retrying${hint}`);
  }
  client.on("reconnect", down);
  client.on("close", down);
  client.on("error", (e) => setBroker("error", `broker error: ${e.message}`));
  client.on("message", (topic, payload) => {
    const parts = topic.split("/");
    const id = parts[parts.length - 2];
    const kind = parts[parts.length - 1];
    if (kind === "snapshot") return onSnapshot(id, payload);
    let msg;
    try { msg = JSON.parse(new TextDecoder().decode(payload)); } catch (e) { return; }
    if (kind === "status") onStatus(id, msg);
    else if (kind === "stats") onStats(id, msg);
    else if (kind === "detections") onDetections(id, msg);
  });
})();
