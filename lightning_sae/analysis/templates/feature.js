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

  document.getElementById("title").textContent = `Feature ${d.id}`;
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
  ]) {
    const tr = el("tr");
    tr.appendChild(el("td", "meta", name));
    tr.appendChild(el("td", "", value));
    stats.appendChild(tr);
  }

  // Histogram: bars over the occupied log10 bins.
  const hist = document.getElementById("histogram");
  if (d.hist.counts.length === 0) {
    hist.appendChild(el("div", "meta", "never fired on the inspected tokens"));
  } else {
    const W = 420, H = 130, pad = 22, n = d.hist.counts.length;
    const top = Math.max(...d.hist.counts);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H + pad);
    d.hist.counts.forEach((c, i) => {
      const r = document.createElementNS(ns, "rect");
      const h = (c / top) * H;
      r.setAttribute("x", (i * W) / n + 0.5); r.setAttribute("width", W / n - 1);
      r.setAttribute("y", H - h); r.setAttribute("height", h);
      r.setAttribute("fill", "#ea7a3c");
      const t = document.createElementNS(ns, "title");
      t.textContent = `${fmt(d.hist.edges[i], 3)} – ${fmt(d.hist.edges[i + 1], 3)}: ${c}`;
      r.appendChild(t);
      svg.appendChild(r);
    });
    for (const [i, anchor] of [[0, "start"], [n, "end"]]) {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", (i * W) / n); t.setAttribute("y", H + 14);
      t.setAttribute("text-anchor", anchor);
      t.textContent = fmt(d.hist.edges[i], 3);
      svg.appendChild(t);
    }
    hist.appendChild(svg);
    hist.appendChild(el("div", "meta", "activation (log scale) vs tokens"));
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
    intervals.appendChild(el("div", "meta",
      `activation in (${fmt(group.lo, 3)}, ${fmt(group.hi, 3)}]`));
    if (!group.contexts.length) {
      intervals.appendChild(el("div", "meta", "  (no sampled window outside the top list)"));
    }
    group.contexts.forEach((c) => intervals.appendChild(context(c)));
  }
})();
