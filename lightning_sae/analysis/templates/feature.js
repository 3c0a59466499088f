// One feature's page: statistics, histogram (SVG), logit effects, neighbours and contexts
// with each token shaded by the feature's activation and the max token outlined.
// Every value from the data goes in through textContent, never as HTML.
"use strict";
(function () {
  const d = JSON.parse(document.getElementById("feature-data").textContent);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const fmt = (x, digits) => (x === 0 ? "0" : Number(x).toPrecision(digits));
  const link = (id, text) => {
    const a = el("a", "", text);
    a.href = d.page.replace("ID", String(id).padStart(d.pad, "0"));
    return a;
  };

  document.getElementById("title").textContent = d.clt
    ? `Feature ${d.id}: layer ${d.clt.layer}, feature ${d.clt.feature}`
    : `Feature ${d.id}`;
  const nav = document.getElementById("nav");
  const index = el("a", "", "\u2190 all features");
  index.href = "../index.html";
  nav.appendChild(index);
  if (d.prev !== null) nav.appendChild(link(d.prev, `\u2039 feature ${d.prev}`));
  if (d.next !== null) nav.appendChild(link(d.next, `feature ${d.next} \u203a`));

  const stats = document.getElementById("stats");
  for (const [name, value] of [
    ["density", `${fmt(d.frequency, 3)} (${d.n_fired} of ${d.n_tokens} tokens)`],
    ["max activation", fmt(d.max_act, 4)],
    ["mean activation (when firing)", fmt(d.mean_act, 4)],
    ...(d.clt
      ? [["reads", d.clt.reads],
         ...d.clt.writes.map(([hook, norm]) => [`writes to ${hook}`, `norm ${fmt(norm, 3)}`])]
      : []),
  ]) {
    const tr = el("tr");
    tr.appendChild(el("td", "meta", name));
    tr.appendChild(el("td", "", value));
    stats.appendChild(tr);
  }

  // Histogram: bars over the occupied log10 bins, each coloured by the activation interval
  // (of the samples further down) its values fall in; labelled axes with ticks.
  const hist = document.getElementById("histogram");
  if (d.hist.counts.length === 0) {
    hist.appendChild(el("div", "meta", "never fired on the inspected tokens"));
  } else {
    const W = 380, H = 130, left = 48, bottom = 40, n = d.hist.counts.length;
    const top = Math.max(...d.hist.counts);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", left + W + 12); svg.setAttribute("height", H + bottom + 8);
    svg.setAttribute("class", "hist");
    const add = (tag, attrs, text) => {
      const e = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      svg.appendChild(e);
      return e;
    };
    const y0 = H + 4;
    d.hist.counts.forEach((c, i) => {
      const h = (c / top) * H;
      const r = add("rect", {
        x: left + (i * W) / n + 0.5, width: Math.max(W / n - 1, 1), y: y0 - h, height: h,
        fill: d.hist.colours[i], "data-interval": d.hist.interval[i],
      });
      const t = document.createElementNS(ns, "title");
      t.textContent = `${fmt(d.hist.edges[i], 3)} – ${fmt(d.hist.edges[i + 1], 3)}: ${c} tokens`;
      r.appendChild(t);
    });
    // Axes: y from 0 to the largest count, x at up to 5 bin edges (log-spaced values).
    add("line", { x1: left, y1: y0, x2: left + W, y2: y0, class: "axis" });
    add("line", { x1: left, y1: y0, x2: left, y2: y0 - H, class: "axis" });
    for (const [value, y] of [[0, y0], [top, y0 - H]]) {
      add("line", { x1: left - 4, y1: y, x2: left, y2: y, class: "axis" });
      add("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, String(value));
    }
    const ticks = Math.min(5, n + 1);
    for (let k = 0; k < ticks; k++) {
      const i = Math.round((k * n) / (ticks - 1 || 1));
      const x = left + (i * W) / n;
      add("line", { x1: x, y1: y0, x2: x, y2: y0 + 4, class: "axis" });
      add("text", { x, y: y0 + 16, "text-anchor": "middle", class: "tick" },
        fmt(d.hist.edges[i], 2));
    }
    add("text", { x: left + W / 2, y: y0 + 34, "text-anchor": "middle", class: "label" },
      "activation (log scale)");
    add("text", { x: 12, y: y0 - H / 2, "text-anchor": "middle", class: "label",
      transform: `rotate(-90 12 ${y0 - H / 2})` }, "tokens");
    hist.appendChild(svg);
    hist.appendChild(el("div", "meta",
      "colour: the activation interval of the samples below (darker = higher)"));
  }

  const logits = document.getElementById("logits");
  if (d.logit_note) logits.appendChild(el("div", "note", d.logit_note));
  if (d.logits.up.length) {
    const box = el("div", "logits");
    for (const [name, list] of [["up", d.logits.up], ["down", d.logits.down]]) {
      const col = el("div");
      col.appendChild(el("div", "meta", name === "up" ? "raises" : "lowers"));
      for (const [token, value] of list) {
        const row = el("div", "tokrow");
        row.appendChild(el("span", "", JSON.stringify(token)));
        row.appendChild(el("span", name, fmt(value, 3)));
        col.appendChild(row);
      }
      box.appendChild(col);
    }
    logits.appendChild(box);
  }

  const neighbours = document.getElementById("neighbours");
  for (const [id, cos, linked] of d.neighbours) {
    const row = el("div");
    row.appendChild(linked ? link(id, `feature ${id}`) : el("span", "", `feature ${id}`));
    row.appendChild(document.createTextNode(`  cos ${fmt(cos, 3)}`));
    neighbours.appendChild(row);
  }
  if (d.match) {
    neighbours.appendChild(el("div", "meta",
      `best match in ${d.match.sae}: feature ${d.match.id} (cos ${fmt(d.match.cos, 3)})`));
  }

  function context(c) {
    const row = el("div", "context");
    row.appendChild(el("span", "value", fmt(c.value, 3)));
    if (c.repeats > 1) row.appendChild(el("span", "meta repeats", `\u00d7${c.repeats}`));
    const text = el("span", "text");
    c.strs.forEach((s, i) => {
      const a = c.acts[i];
      const tok = el("span", "tok", s.replace(/\n/g, "\u21b5"));
      if (c.tokens[i] < 0) tok.classList.add("pad");
      if (i === c.max_index) tok.classList.add("max");
      if (a > 0) {
        tok.style.background = `rgba(234, 88, 12, ${Math.min(1, a / d.max_act) * 0.85 + 0.05})`;
      }
      tok.title = `activation ${fmt(a, 4)}`;
      text.appendChild(tok);
    });
    row.appendChild(text);
    return row;
  }

  const top = document.getElementById("top");
  if (!d.top.length) top.appendChild(el("div", "meta", "no context: the feature never fired"));
  d.top.forEach((c) => top.appendChild(context(c)));

  const intervals = document.getElementById("intervals");
  for (const group of d.intervals) {
    const head = el("div", "meta interval");
    const swatch = el("span", "swatch");
    swatch.style.background = group.colour;
    head.appendChild(swatch);
    head.appendChild(document.createTextNode(
      `activation in (${fmt(group.lo, 3)}, ${fmt(group.hi, 3)}]`));
    intervals.appendChild(head);
    if (!group.contexts.length) {
      intervals.appendChild(el("div", "meta", "  (no sampled window outside the top list)"));
    }
    group.contexts.forEach((c) => intervals.appendChild(context(c)));
  }
})();
