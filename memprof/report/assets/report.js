// memprof's HTML report: unpack the inlined plotly.js, draw the figures, make the tables sortable and filterable.
"use strict";

async function loadPlotly() {
  const packed = document.getElementById("plotly-gzip").textContent.trim();
  const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const script = document.createElement("script");
  script.textContent = await new Response(stream).text();
  document.head.appendChild(script);
}

function drawFigures(figures) {
  for (const [id, figure] of Object.entries(figures)) {
    Plotly.newPlot(id, figure.data, figure.layout, {responsive: true, displaylogo: false});
  }
}

function sortable(table) {
  const body = table.tBodies[0];
  table.querySelectorAll("th[data-sort]").forEach((th, column) => {
    th.addEventListener("click", () => {
      const ascending = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach((other) => other.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      const index = Array.prototype.indexOf.call(th.parentNode.children, th);
      const numeric = th.dataset.sort === "number";
      const key = (row) => {
        const cell = row.cells[index];
        return numeric ? Number(cell.dataset.v) : cell.textContent.toLowerCase();
      };
      const rows = Array.from(body.rows);
      rows.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * (ascending ? 1 : -1));
      rows.forEach((row) => body.appendChild(row));
    });
  });
}

function filterable(table) {
  const text = document.getElementById(table.dataset.filter);
  const choice = document.getElementById(table.dataset.choice);
  const count = document.getElementById(table.dataset.count);
  const apply = () => {
    const words = text.value.toLowerCase().split(/\s+/).filter(Boolean);
    let shown = 0;
    for (const row of table.tBodies[0].rows) {
      const content = row.textContent.toLowerCase();
      const visible = (!choice.value || row.dataset.record === choice.value) && words.every((w) => content.includes(w));
      row.hidden = !visible;
      shown += visible ? 1 : 0;
    }
    count.textContent = `${shown} of ${table.tBodies[0].rows.length} rows`;
  };
  text.addEventListener("input", apply);
  choice.addEventListener("change", apply);
  apply();
}

document.querySelectorAll("table.sortable").forEach(sortable);
document.querySelectorAll("table[data-filter]").forEach(filterable);
loadPlotly()
  .then(() => drawFigures(JSON.parse(document.getElementById("memprof-figures").textContent)))
  .catch((error) => {
    const banner = document.getElementById("load-error");
    banner.textContent = `The figures could not be drawn: ${error}. The tables below are complete.`;
    banner.style.display = "block";
    throw error;
  });
