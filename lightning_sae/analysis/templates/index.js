// The feature index: sort by clicking a column header, filter by text and density.
// Every value from the data goes in through textContent, never as HTML.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("index-data").textContent);
  const rows = data.features.map(([id, density, max, mean, snippet]) =>
    ({ id, density, max, mean, snippet }));
  const LIMIT = 2000; // rows drawn at once; the filter narrows the rest
  const body = document.querySelector("#features tbody");
  const headers = document.querySelectorAll("#features th");
  let sortKey = "max", ascending = false;

  function fmt(x, digits) { return x === 0 ? "0" : Number(x).toPrecision(digits); }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function draw() {
    const text = document.getElementById("filter").value.trim().toLowerCase();
    const lo = parseFloat(document.getElementById("min-density").value);
    const hi = parseFloat(document.getElementById("max-density").value);
    const hideDead = document.getElementById("hide-dead").checked;
    const shown = rows.filter((r) =>
      (!hideDead || r.density > 0) &&
      (isNaN(lo) || r.density >= lo) && (isNaN(hi) || r.density <= hi) &&
      (!text || String(r.id) === text || r.snippet.toLowerCase().includes(text)));
    shown.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      const order = typeof x === "string" ? x.localeCompare(y) : x - y;
      return ascending ? order : -order;
    });
    body.replaceChildren();
    for (const r of shown.slice(0, LIMIT)) {
      const tr = document.createElement("tr");
      tr.dataset.feature = r.id;
      const link = document.createElement("a");
      link.href = data.page.replace("ID", String(r.id).padStart(data.pad, "0"));
      link.textContent = r.id;
      cell(tr, "").appendChild(link);
      cell(tr, fmt(r.density, 3), "num");
      cell(tr, fmt(r.max, 4), "num");
      cell(tr, fmt(r.mean, 4), "num");
      cell(tr, r.snippet, "snippet");
      body.appendChild(tr);
    }
    const more = shown.length > LIMIT ? ` (first ${LIMIT} drawn: narrow the filter)` : "";
    document.getElementById("count").textContent =
      `${shown.length} of ${rows.length} features${more}`;
    headers.forEach((th) => {
      th.classList.toggle("sorted-asc", th.dataset.key === sortKey && ascending);
      th.classList.toggle("sorted-desc", th.dataset.key === sortKey && !ascending);
    });
  }

  headers.forEach((th) => th.addEventListener("click", () => {
    ascending = th.dataset.key === sortKey ? !ascending : th.dataset.key === "id";
    sortKey = th.dataset.key;
    draw();
  }));
  for (const id of ["filter", "min-density", "max-density", "hide-dead"]) {
    document.getElementById(id).addEventListener("input", draw);
  }
  draw();
})();
