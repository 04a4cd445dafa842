/* The live status page of one peerlearn daemon (docs/status-page.md).
 *
 * Every second it fetches this daemon's /metrics (Prometheus text, parsed here) and /status,
 * keeps a rolling window of points and redraws small SVG line charts. No libraries, nothing
 * fetched from anywhere but the daemon.
 *
 * What is plotted is kept in `window.peerlearn` (for tests and the curious):
 *   polls, failures            completed and failed polls
 *   since                      t of the first successful poll
 *   last = {t, samples}        the latest scrape, parsed: [{name, labels, value}]
 *   status                     the latest /status document
 *   charts[id] = {title, unit, series: {key: {label, labels, points: [[t, value], ...]}}}
 * with t in seconds (the browser's clock) and ids loss, consensus, staleness, steps, messages,
 * bytes. Each drawn line is a <path data-key="key"> inside <svg data-chart="id">.
 */
"use strict";

(() => {
  const POLL_MS = 1000;
  const WINDOW_S = 120;
  const HEIGHT = 210;
  const COLORS = [
    "#2f6fde", "#e4572e", "#17a398", "#9c4fd6", "#d99a1e", "#5b7083", "#d6336c", "#3a9e3a",
  ];

  const state = {polls: 0, failures: 0, since: null, last: null, status: null, charts: {}};
  window.peerlearn = state;

  // --- Prometheus text exposition format ------------------------------------------------------

  function parseValue(s) {
    if (s === "+Inf" || s === "Inf") return Infinity;
    if (s === "-Inf") return -Infinity;
    if (s === "NaN") return NaN;
    return Number(s);
  }

  function parseLabels(line, i, labels) {
    i += 1; // past "{"
    for (;;) {
      while (line[i] === " " || line[i] === ",") i += 1;
      if (line[i] === "}") return i + 1;
      const eq = line.indexOf("=", i);
      if (eq < 0 || line[eq + 1] !== '"') throw new Error("malformed label");
      const name = line.slice(i, eq).trim();
      let value = "";
      for (i = eq + 2; i < line.length && line[i] !== '"'; i += 1) {
        if (line[i] === "\\") {
          i += 1;
          value += line[i] === "n" ? "\n" : line[i];
        } else {
          value += line[i];
        }
      }
      if (i >= line.length) throw new Error("unterminated label value");
      labels[name] = value;
      i += 1; // past the closing quote
    }
  }

  /** [{name, labels, value}] of a scrape; comments and malformed lines are skipped. */
  function parseMetrics(text) {
    const samples = [];
    for (const raw of text.split("\n")) {
      const line = raw.trim();
      if (!line || line[0] === "#") continue;
      const name = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
      if (!name) continue;
      try {
        const labels = {};
        let i = name[0].length;
        if (line[i] === "{") i = parseLabels(line, i, labels);
        const value = parseValue(line.slice(i).trim().split(/\s+/)[0]);
        samples.push({name: name[0], labels, value});
      } catch (err) {
        // a line this parser does not understand: not plotted
      }
    }
    return samples;
  }

  const named = (samples, name) => samples.filter((s) => s.name === name);

  function histogram(samples, base) {
    const count = samples.find((s) => s.name === `${base}_count`);
    if (!count) return null;
    const sum = samples.find((s) => s.name === `${base}_sum`);
    const buckets = new Map(named(samples, `${base}_bucket`).map((s) => [s.labels.le, s.value]));
    return {count: count.value, sum: sum ? sum.value : null, buckets};
  }

  /** Mean of the observations made between two scrapes of a histogram; null if none. */
  function intervalMean(cur, prev) {
    if (!cur || !prev) return null;
    const n = cur.count - prev.count;
    if (!(n > 0)) return null;
    if (cur.sum !== null && prev.sum !== null) return (cur.sum - prev.sum) / n;
    // No _sum (prometheus_client leaves it out of histograms with negative buckets, such as
    // peerlearn_staleness_steps). Staleness is a whole number of steps, so a bucket (lo, hi]
    // holds lo+1 … hi: its mean is exact for unit-wide buckets and their midpoint otherwise;
    // the open-ended first and last buckets count at their finite bound.
    const bounds = [...cur.buckets.keys()].map((le) => [le, parseValue(le)]);
    bounds.sort((a, b) => a[1] - b[1]);
    let total = 0;
    let below = 0;
    let lo = -Infinity;
    for (const [le, hi] of bounds) {
      const cumulative = cur.buckets.get(le) - (prev.buckets.get(le) ?? 0);
      const k = cumulative - below;
      below = cumulative;
      if (k > 0) {
        let v;
        if (lo === -Infinity) v = hi;
        else if (hi === Infinity) v = lo;
        else v = (Math.floor(lo) + 1 + hi) / 2;
        total += k * v;
      }
      lo = hi;
    }
    return total / n;
  }

  // --- formatting --------------------------------------------------------------------------

  const SI = [[1e9, "G"], [1e6, "M"], [1e3, "k"], [1, ""]];
  const RATES = new Set(["B/s", "msg/s", "steps/s"]);

  function fmt(v, unit = "") {
    if (v === null || v === undefined || Number.isNaN(v)) return "—";
    const a = Math.abs(v);
    if (RATES.has(unit)) {
      const [scale, prefix] = SI.find(([sc]) => a >= sc) || SI[SI.length - 1];
      const n = +(v / scale).toPrecision(3);
      return unit === "B/s" ? `${n} ${prefix}B/s` : `${n}${prefix} ${unit}`;
    }
    let s;
    if (v === 0) s = "0";
    else if (a >= 1e6 || a < 1e-3) s = v.toExponential(2).replace(/\.?0+e/, "e");
    else s = String(+v.toPrecision(4));
    return unit ? `${s} ${unit}` : s;
  }

  function expo(v, digits) {
    return v.toExponential(digits).replace(/\.0+e/, "e").replace(/(\.\d*?)0+e/, "$1e");
  }

  /** A label formatter for linear ticks `step` apart (nice steps: 1, 2 or 5 × 10^k). */
  function tickFormat(ticks, step, si) {
    const top = Math.max(...ticks.map(Math.abs));
    if (si) {
      const [scale, prefix] = SI.find(([sc]) => top >= sc) || SI[SI.length - 1];
      const decimals = Math.max(0, -Math.floor(Math.log10(step / scale) + 1e-9));
      return (v) => (v === 0 ? "0" : `${(v / scale).toFixed(decimals)}${prefix}`);
    }
    const k = Math.floor(Math.log10(step) + 1e-9);
    if (top >= 1e6 || k < -3) {
      const digits = Math.max(0, Math.floor(Math.log10(top) + 1e-9) - k);
      return (v) => (v === 0 ? "0" : expo(v, digits));
    }
    return (v) => v.toFixed(Math.max(0, -k));
  }

  function niceStep(range, n) {
    const raw = range / n;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const f = raw / mag;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
  }

  const escapeXml = (s) =>
    String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

  // --- charts ------------------------------------------------------------------------------

  /** A rolling line chart; `opts`: unit, log (log scale when values span ≥ 2 decades), zero
   * (include 0 in a linear scale), si (k/M/G tick labels), note, empty (text while empty). */
  class Chart {
    constructor(id, title, opts) {
      this.id = id;
      this.opts = opts;
      this.styles = new Map();
      this.data = {title, unit: opts.unit || "", series: {}};
      state.charts[id] = this.data;
      const panel = document.createElement("div");
      panel.className = "panel chart";
      const note = escapeXml(opts.note || "");
      panel.innerHTML =
        `<h2><span>${escapeXml(title)}</span><span class="note">${note}</span></h2>` +
        `<svg data-chart="${id}" role="img" aria-label="${escapeXml(title)}"></svg>` +
        `<div class="legend"></div>`;
      document.getElementById("charts").appendChild(panel);
      this.svg = panel.querySelector("svg");
      this.legend = panel.querySelector(".legend");
    }

    add(key, t, value, meta) {
      if (!Number.isFinite(value)) return;
      let series = this.data.series[key];
      if (!series) {
        series = {label: meta.label, labels: meta.labels || {}, points: []};
        this.data.series[key] = series;
        const group = meta.colorKey ?? key;
        if (!this.styles.has(`color:${group}`)) {
          const used = [...this.styles.keys()].filter((k) => k.startsWith("color:")).length;
          this.styles.set(`color:${group}`, COLORS[used % COLORS.length]);
        }
        this.styles.set(key, {color: this.styles.get(`color:${group}`), dash: meta.dash || ""});
      }
      series.points.push([t, value]);
    }

    trim(now) {
      for (const series of Object.values(this.data.series)) {
        const keep = series.points.findIndex((p) => p[0] >= now - WINDOW_S);
        series.points.splice(0, keep < 0 ? series.points.length : keep);
      }
    }

    render(now) {
      const width = Math.max(200, Math.round(this.svg.getBoundingClientRect().width) || 460);
      this.svg.setAttribute("viewBox", `0 0 ${width} ${HEIGHT}`);
      const entries = Object.entries(this.data.series).filter(([, s]) => s.points.length > 0);
      const points = entries.flatMap(([, s]) => s.points);
      if (points.length === 0) {
        this.svg.innerHTML =
          `<text class="empty" x="${width / 2}" y="${HEIGHT / 2}" text-anchor="middle">` +
          `${escapeXml(this.opts.empty || "waiting for data…")}</text>`;
        this.legend.innerHTML = "";
        return;
      }
      const m = {l: 56, r: 14, t: 10, b: 24};
      const pw = width - m.l - m.r;
      const ph = HEIGHT - m.t - m.b;

      // x: seconds before now, since the first poll (the same on every chart): 10 s to the window
      const span = Math.min(WINDOW_S, Math.max(10, now - (state.since ?? now)));
      const x = (t) => m.l + pw * (1 - (now - t) / span);
      const xStep = [2, 5, 10, 15, 30, 60].find((s) => span / s <= 6) || 60;

      // y: log when asked for and the values span two decades, else linear
      const values = points.map((p) => p[1]);
      let lo = Math.min(...values);
      let hi = Math.max(...values);
      const logScale = Boolean(this.opts.log) && lo > 0 && hi / lo >= 100;
      let y;
      const yTicks = [];
      if (logScale) {
        const a = Math.floor(Math.log10(lo));
        const b = Math.max(a + 1, Math.ceil(Math.log10(hi)));
        y = (v) => m.t + ph * (1 - (Math.log10(v) - a) / (b - a));
        const every = Math.ceil((b - a) / 5);
        for (let e = a; e <= b; e += every) {
          yTicks.push([10 ** e, e >= -2 && e <= 4 ? String(+(10 ** e).toPrecision(1)) : `1e${e}`]);
        }
      } else {
        if (this.opts.zero || lo === hi) {
          lo = Math.min(lo, 0);
          hi = Math.max(hi, 0);
        }
        if (lo === hi) hi = lo + 1;
        const step = niceStep(hi - lo, 4);
        const a = Math.floor(lo / step + 1e-9) * step;
        const b = Math.ceil(hi / step - 1e-9) * step;
        const ticks = [];
        for (let v = a; v <= b + step / 2; v += step) ticks.push(Math.abs(v) < step / 1e6 ? 0 : v);
        const label = tickFormat(ticks, step, this.opts.si);
        for (const v of ticks) yTicks.push([v, label(v)]);
        y = (v) => m.t + ph * (1 - (v - a) / (b - a));
      }

      const parts = [];
      const right = width - m.r;
      const bottom = HEIGHT - m.b;
      for (const [v, text] of yTicks) {
        const py = y(v).toFixed(1);
        parts.push(`<line class="grid" x1="${m.l}" x2="${right}" y1="${py}" y2="${py}"/>`);
        parts.push(
          `<text x="${m.l - 6}" y="${py}" dy="0.32em" text-anchor="end">${escapeXml(text)}</text>`,
        );
      }
      for (let s = 0; s <= span + 1e-9; s += xStep) {
        const px = x(now - s).toFixed(1);
        const anchor = s === 0 ? "end" : "middle";
        parts.push(`<line class="axis" x1="${px}" x2="${px}" y1="${bottom}" y2="${bottom + 4}"/>`);
        const label = s ? `−${s} s` : "now";
        parts.push(`<text x="${px}" y="${HEIGHT - 6}" text-anchor="${anchor}">${label}</text>`);
      }
      parts.push(`<line class="axis" x1="${m.l}" x2="${right}" y1="${bottom}" y2="${bottom}"/>`);
      // Earlier series are drawn wider, so that lines which coincide (workers that have just
      // averaged, symmetric peers) still show every colour.
      for (const [i, [key, series]] of entries.entries()) {
        const style = this.styles.get(key);
        const widthPx = Math.min(4, 1.6 + 0.9 * (entries.length - 1 - i)).toFixed(1);
        let d = "";
        let pen = "M";
        for (const [t, v] of series.points) {
          if (logScale && !(v > 0)) {
            pen = "M";
            continue;
          }
          d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
          pen = "L";
        }
        const dash = style.dash ? ` stroke-dasharray="${style.dash}"` : "";
        const stroke = `stroke="${style.color}" stroke-width="${widthPx}"${dash}`;
        parts.push(`<path class="series" data-key="${escapeXml(key)}" d="${d}" ${stroke}/>`);
        const [lt, lv] = series.points[series.points.length - 1];
        if (!logScale || lv > 0) {
          const [cx, cy] = [x(lt).toFixed(1), y(lv).toFixed(1)];
          parts.push(`<circle cx="${cx}" cy="${cy}" r="2.5" fill="${style.color}"/>`);
        }
      }
      this.svg.innerHTML = parts.join("");

      this.legend.innerHTML = entries
        .map(([key, series]) => {
          const style = this.styles.get(key);
          const dash = style.dash ? ` stroke-dasharray="${style.dash}"` : "";
          const last = series.points[series.points.length - 1][1];
          const swatch = `<line x1="0" y1="4" x2="18" y2="4" stroke="${style.color}"${dash}/>`;
          return (
            `<span><svg viewBox="0 0 18 8">${swatch}</svg>` +
            `${escapeXml(series.label)} <b>${escapeXml(fmt(last, this.data.unit))}</b></span>`
          );
        })
        .join("");
    }
  }

  // --- the header: /status ---------------------------------------------------------------

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  const TONE = {
    running: "ok", connected: "ok", finished: "", starting: "", created: "",
    stopping: "warn", stopped: "warn", connecting: "warn", reconnecting: "warn", draining: "warn",
    closed: "bad",
    blocked: "bad", crashed: "bad", diverged: "bad", away: "bad",
  };

  function badge(text) {
    return el("span", text, `badge ${TONE[text] ?? "warn"}`);
  }

  function duration(seconds) {
    const s = Math.floor(seconds);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  }

  function renderStatus(st) {
    document.getElementById("title-cluster").textContent =
      `· cluster ${st.cluster} of ${st.clusters}`;
    const stateBadge = document.getElementById("state");
    stateBadge.textContent = st.state;
    stateBadge.className = `badge ${TONE[st.state] ?? "warn"}`;
    const steps = st.steps === null ? "no step limit" : `${st.steps} steps`;
    document.getElementById("run").textContent =
      `${st.algorithm} · ${st.problem ?? "no problem"} · ${st.processes} processes, quorum ` +
      `${st.quorum} · ${steps} · up ${duration(st.uptime_seconds)}`;

    const workers = document.querySelector("#workers tbody");
    workers.replaceChildren(
      ...st.workers.map((w) => {
        const row = el("tr");
        row.append(el("td", w.id), el("td"), el("td", w.step.toLocaleString("en-US"), "num"));
        row.children[1].append(badge(w.state));
        row.append(el("td", fmt(w.loss), "num"));
        let waiting = "";
        if (w.error) waiting = w.error;
        else if (w.waiting) {
          const q = w.waiting;
          waiting = `${q.tag.join(" ")}: ${q.have}/${q.need} ${q.unit}, ${q.seconds.toFixed(1)} s`;
          if (q.peers && q.peers.length) waiting += ` · away: daemon ${q.peers.join(", ")}`;
        } else if (w.sending) {
          const s = w.sending;
          waiting = `room on the link to ${s.peer}, ${s.seconds.toFixed(1)} s`;
        }
        row.append(el("td", waiting, w.error ? "err" : "muted"));
        return row;
      }),
    );

    const peers = document.querySelector("#peers tbody");
    peers.replaceChildren(
      ...st.peers.map((p) => {
        const row = el("tr");
        row.append(el("td", p.cluster), el("td", p.address), el("td"));
        row.children[2].append(badge(p.away ? "away" : p.state));
        row.append(el("td", p.outstanding, "num"));
        row.append(el("td", p.refused ? `refused: ${p.refused}` : "", "muted"));
        return row;
      }),
    );
  }

  // --- polling -----------------------------------------------------------------------------

  const charts = {};

  function setup() {
    document.getElementById("window-s").textContent = String(WINDOW_S);
    charts.loss = new Chart("loss", "Loss per worker", {log: true});
    charts.consensus = new Chart("consensus", "Consensus distance", {
      log: true, zero: true, note: "(1/n) Σ‖x_i − x̄‖²",
    });
    charts.staleness = new Chart("staleness", "Staleness", {
      unit: "steps", zero: true, note: "mean per poll interval", empty: "no messages delivered yet",
    });
    charts.steps = new Chart("steps", "Steps per second", {unit: "steps/s", zero: true, si: true});
    charts.messages = new Chart("messages", "Messages per second, by peer", {
      unit: "msg/s", zero: true, si: true, note: "solid: sent · dashed: received",
    });
    charts.bytes = new Chart("bytes", "Bytes per second, by peer", {
      unit: "B/s", zero: true, si: true, note: "solid: sent · dashed: received",
    });
    window.addEventListener("resize", () => state.last && renderAll(state.last.t));
  }

  function renderAll(now) {
    for (const chart of Object.values(charts)) chart.render(now);
  }

  /** Counter totals per (peer, direction), summed over message kinds. */
  function byPeer(samples, name) {
    const out = new Map();
    for (const s of named(samples, name)) {
      const key = `${s.labels.peer} ${s.labels.direction}`;
      out.set(key, (out.get(key) ?? 0) + s.value);
    }
    return out;
  }

  function ingest(t, samples, status) {
    const prev = state.last;
    state.since ??= t;
    for (const s of named(samples, "peerlearn_loss")) {
      const w = s.labels.worker;
      charts.loss.add(w, t, s.value, {label: `worker ${w}`, labels: {worker: w}});
    }
    for (const s of named(samples, "peerlearn_consensus_distance")) {
      const scope = s.labels.scope;
      charts.consensus.add(scope, t, s.value, {label: scope, labels: {scope}});
    }
    if (prev && t > prev.t) {
      const dt = t - prev.t;
      const stale = intervalMean(
        histogram(samples, "peerlearn_staleness_steps"),
        histogram(prev.samples, "peerlearn_staleness_steps"),
      );
      if (stale !== null) {
        charts.staleness.add("steps", t, stale, {label: "messages: receiver's step − sender's"});
      }
      const grad = intervalMean(
        histogram(samples, "peerlearn_gradient_staleness"),
        histogram(prev.samples, "peerlearn_gradient_staleness"),
      );
      if (grad !== null) {
        charts.staleness.add("gradient", t, grad, {label: "gradients: |S| (DASGD)"});
      }
      const before = new Map(
        named(prev.samples, "peerlearn_step").map((s) => [s.labels.worker, s.value]),
      );
      for (const s of named(samples, "peerlearn_step")) {
        const w = s.labels.worker;
        const old = before.get(w);
        if (old !== undefined && s.value >= old) {
          charts.steps.add(w, t, (s.value - old) / dt, {label: `worker ${w}`, labels: {worker: w}});
        }
      }
      for (const [chart, name] of [
        [charts.messages, "peerlearn_messages_total"],
        [charts.bytes, "peerlearn_bytes_total"],
      ]) {
        const old = byPeer(prev.samples, name);
        for (const [key, value] of byPeer(samples, name)) {
          const was = old.get(key);
          if (was === undefined || value < was) continue; // new, or the daemon restarted
          const [peer, direction] = key.split(" ");
          chart.add(key, t, (value - was) / dt, {
            label: `${peer} ${direction === "out" ? "sent" : "received"}`,
            labels: {peer, direction},
            colorKey: peer,
            dash: direction === "out" ? "" : "5 3",
          });
        }
      }
    }
    state.last = {t, samples};
    state.status = status;
    for (const chart of Object.values(charts)) chart.trim(t);
  }

  function setConnection(ok, text) {
    const conn = document.getElementById("conn");
    conn.className = `conn ${ok ? "ok" : "err"}`;
    conn.textContent = text;
  }

  async function poll() {
    const started = Date.now();
    try {
      const [metrics, status] = await Promise.all([
        fetch("metrics", {cache: "no-store"}),
        fetch("status", {cache: "no-store"}),
      ]);
      if (!metrics.ok || !status.ok) throw new Error(`HTTP ${metrics.status}/${status.status}`);
      const [text, st] = await Promise.all([metrics.text(), status.json()]);
      const t = Date.now() / 1000;
      ingest(t, parseMetrics(text), st);
      renderStatus(st);
      renderAll(t);
      state.polls += 1;
      setConnection(true, `live · updated ${new Date(t * 1000).toLocaleTimeString("en-GB")}`);
    } catch (err) {
      state.failures += 1;
      setConnection(false, `daemon unreachable (${err.message}); retrying`);
    } finally {
      setTimeout(poll, Math.max(200, POLL_MS - (Date.now() - started)));
    }
  }

  setup();
  poll();
})();
