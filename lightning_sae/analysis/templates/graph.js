// The attribution graph: nodes placed by (layer, position), edges coloured by sign
// (blue: raises the target, red: lowers it), width by |weight|. Every value from the data goes
// in through textContent or SVG attributes, never as HTML.
"use strict";
(function () {
  const { graph, links } = JSON.parse(document.getElementById("graph-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";
  const svg = document.getElementById("graph");
  const byId = new Map(graph.nodes.map((n) => [n.id, n]));
  const inputs = new Map(), outputs = new Map();
  for (const e of graph.edges) {
    if (!inputs.has(e.target)) inputs.set(e.target, []);
    if (!outputs.has(e.source)) outputs.set(e.source, []);
    inputs.get(e.target).push(e);
    outputs.get(e.source).push(e);
  }
  const nLayers = graph.clt.n_layers;
  const nPositions = graph.tokens.length;

  function fmt(x) { return x === null || x === undefined ? "" : Number(x).toPrecision(4); }
  function el(tag, attrs, parent) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  // Layout: a row per layer (embeddings at the bottom, logits at the top), a column per
  // position, the nodes of one cell side by side, most influential first.
  const cells = new Map();
  for (const n of graph.nodes) {
    const key = n.layer + ":" + n.position;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const widest = Math.max(1, ...[...cells.values()].map((c) => c.length));
  const R = 5, GAP = 13, ROW = 70, LEFT = 60;
  const COL = Math.max(90, widest * GAP + 20);
  const rows = nLayers + 2;
  const width = LEFT + nPositions * COL + 10, height = rows * ROW + 40;
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const place = new Map();
  for (const cell of cells.values()) {
    cell.sort((a, b) => (a.kind === "error") - (b.kind === "error") || b.influence - a.influence);
    cell.forEach((n, i) => {
      const x = LEFT + n.position * COL + COL / 2 + (i - (cell.length - 1) / 2) * GAP;
      const y = (rows - 1 - (n.layer + 1)) * ROW + ROW / 2;
      place.set(n.id, [x, y]);
    });
  }
  for (let row = 0; row < rows; row++) {
    const layer = rows - 2 - row;
    const label = layer === -1 ? "emb" : layer === nLayers ? "logit" : "L" + layer;
    const t = el("text", { x: 4, y: row * ROW + ROW / 2 + 4, class: "layer-label" }, svg);
    t.textContent = label;
  }
  graph.tokens.forEach((tok, p) => {
    const t = el("text", { x: LEFT + p * COL + COL / 2, y: height - 12, class: "token-label",
                           "text-anchor": "middle" }, svg);
    t.textContent = JSON.stringify(tok.str).slice(1, -1);
  });
  const maxWeight = Math.max(1e-12, ...graph.edges.map((e) => Math.abs(e.weight)));
  const edgeGroup = el("g", {}, svg);
  const edgeEls = graph.edges.map((e) => {
    const [x1, y1] = place.get(e.source), [x2, y2] = place.get(e.target);
    const w = Math.abs(e.weight) / maxWeight;
    return [e, el("line", { x1, y1, x2, y2, class: "edge",
      stroke: e.weight >= 0 ? "#2563eb" : "#dc2626",
      "stroke-width": 0.4 + 3.6 * w, "stroke-opacity": 0.15 + 0.5 * w }, edgeGroup)];
  });
  const nodeEls = new Map();
  for (const n of graph.nodes) {
    const [x, y] = place.get(n.id);
    const shape = n.kind === "error"
      ? el("rect", { x: x - R, y: y - R, width: 2 * R, height: 2 * R }, svg)
      : el("circle", { cx: x, cy: y, r: n.kind === "feature" ? R : R + 1 }, svg);
    shape.setAttribute("class", "node " + n.kind);
    const tip = el("title", {}, shape);
    tip.textContent = label(n);
    shape.addEventListener("click", () => select(n.id));
    nodeEls.set(n.id, shape);
  }

  function label(n) {
    if (n.kind === "feature") return `L${n.layer} #${n.feature} @ ${n.position} (${n.token})`;
    if (n.kind === "error") return `error L${n.layer} @ ${n.position} (${n.token})`;
    if (n.kind === "embedding") return `embedding @ ${n.position}: ${n.token}`;
    return `logit ${n.logit_token} (p=${fmt(n.probability)})`;
  }

  function edgeList(container, edges, other) {
    container.replaceChildren();
    const sorted = [...edges].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    for (const e of sorted.slice(0, 40)) {
      const row = document.createElement("div");
      row.className = "edge-row";
      const name = document.createElement("span");
      name.textContent = label(byId.get(e[other]));
      const value = document.createElement("span");
      value.className = e.weight >= 0 ? "pos" : "neg";
      value.textContent = fmt(e.weight);
      row.append(name, value);
      row.addEventListener("click", () => select(e[other]));
      container.appendChild(row);
    }
    if (!sorted.length) container.textContent = "none kept";
  }

  function select(id) {
    const n = byId.get(id);
    const canvas = svg.parentElement;  // bring the node into view in a wide graph
    const [x, y] = place.get(id);
    if (x < canvas.scrollLeft || x > canvas.scrollLeft + canvas.clientWidth) {
      canvas.scrollLeft = x - canvas.clientWidth / 2;
    }
    if (y < canvas.scrollTop || y > canvas.scrollTop + canvas.clientHeight) {
      canvas.scrollTop = y - canvas.clientHeight / 2;
    }
    for (const shape of nodeEls.values()) shape.classList.remove("selected");
    nodeEls.get(id).classList.add("selected");
    for (const [e, line] of edgeEls) {
      const near = e.source === id || e.target === id;
      line.style.strokeOpacity = near ? 0.9 : 0.06;
    }
    const details = document.getElementById("details");
    details.replaceChildren();
    const table = document.createElement("table");
    table.className = "stats";
    const rowsShown = [["node", label(n)], ["influence on logits", fmt(n.influence)]];
    if (n.kind === "feature") {
      rowsShown.push(["activation", fmt(n.activation)], ["pre-activation", fmt(n.pre_activation)]);
    } else if (n.kind === "logit") {
      rowsShown.push(["probability", fmt(n.probability)], ["logit - mean", fmt(n.value)]);
      for (const [k, v] of Object.entries(n.decomposition)) {
        if (k !== "value") rowsShown.push(["  from " + k.replace("_", " "), fmt(v)]);
      }
    } else {
      rowsShown.push(["norm", fmt(n.activation)]);
    }
    for (const [k, v] of rowsShown) {
      const tr = table.insertRow();
      tr.insertCell().textContent = k;
      tr.insertCell().textContent = v;
    }
    details.appendChild(table);
    if (links[id]) {
      const a = document.createElement("a");
      a.href = links[id];
      a.textContent = "feature page";
      details.appendChild(a);
    }
    edgeList(document.getElementById("inputs"), inputs.get(id) || [], "source");
    edgeList(document.getElementById("outputs"), outputs.get(id) || [], "target");
  }

  const c = graph.counts, s = graph.scores;
  document.getElementById("summary").textContent =
    `${c.kept_features} of ${c.traced_features} traced features (${c.active_features} active), ` +
    `${c.kept_edges} edges kept · completeness ${fmt(s.graph.completeness)} ` +
    `(pruned ${fmt(s.pruned.completeness)}) · replacement ${fmt(s.graph.replacement)} ` +
    `(pruned ${fmt(s.pruned.replacement)})`;
  const top = graph.nodes.filter((n) => n.kind === "logit")
    .sort((a, b) => b.probability - a.probability)[0];
  if (top) select(top.id);
})();
