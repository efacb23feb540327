// tasklane dashboard: no inline script anywhere (the Content-Security-Policy forbids it).
"use strict";

const COLORS = {
  completed: "#16a34a", failed: "#dc2626", retry: "#f59e0b", waiting: "#7c3aed",
  released: "#0ea5e9", lost: "#ea580c", cancelled: "#6b7280", unknown: "#9ca3af",
};

function formatCount(n, approximate) {
  return (approximate ? "≈" : "") + n.toLocaleString("en-US");
}

function runsDatasets(doc) {
  // The last 60 minutes, one stacked bar per minute, one dataset per outcome.
  const now = new Date(doc.now);
  const minutes = [];
  for (let i = 59; i >= 0; i--) {
    const m = new Date(now.getTime() - i * 60000);
    m.setUTCSeconds(0, 0);
    minutes.push(m.toISOString().slice(0, 16));
  }
  const byOutcome = {};
  for (const r of doc.runs_per_minute) {
    const key = new Date(r.minute).toISOString().slice(0, 16);
    (byOutcome[r.outcome] = byOutcome[r.outcome] || {})[key] = r.runs;
  }
  const datasets = Object.keys(byOutcome).sort().map((outcome) => ({
    label: outcome,
    data: minutes.map((m) => byOutcome[outcome][m] || 0),
    backgroundColor: COLORS[outcome] || COLORS.unknown,
  }));
  return { labels: minutes.map((m) => m.slice(11)), datasets };
}

function lagData(doc) {
  const queues = Object.keys(doc.queue_lag_seconds);
  return {
    labels: queues,
    datasets: [{ label: "seconds", data: queues.map((q) => doc.queue_lag_seconds[q]), backgroundColor: "#2563eb" }],
  };
}

function setupOverview(section) {
  if (typeof Chart === "undefined") return;
  const stacked = { responsive: true, animation: false, scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } };
  const runs = new Chart(document.getElementById("runs-chart"), { type: "bar", data: { labels: [], datasets: [] }, options: stacked });
  const lag = new Chart(document.getElementById("lag-chart"), {
    type: "bar", data: { labels: [], datasets: [] },
    options: { responsive: true, animation: false, plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true } } },
  });
  async function refresh() {
    try {
      const response = await fetch(section.dataset.refresh, { headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const doc = await response.json();
      for (const [status, n] of Object.entries(doc.by_status)) {
        const el = section.querySelector(`[data-count="${status}"]`);
        if (el) el.textContent = formatCount(n, doc.approximate.includes(status));
      }
      for (const el of section.querySelectorAll("[data-field]")) el.textContent = doc[el.dataset.field];
      runs.data = runsDatasets(doc);
      runs.update();
      lag.data = lagData(doc);
      lag.update();
      section.dataset.loaded = "true";
    } catch (err) {
      // The next refresh tries again.
    }
  }
  refresh();
  setInterval(refresh, 5000);
}

function setupSubtasks(root) {
  for (const details of root.querySelectorAll("details.subtasks")) {
    details.addEventListener("toggle", async () => {
      if (!details.open || details.dataset.loaded) return;
      details.dataset.loaded = "true";
      const response = await fetch(details.dataset.url);
      const holder = details.querySelector(".children");
      holder.innerHTML = response.ok ? await response.text() : "could not load the subtasks";
      setupSubtasks(holder);
    });
  }
}

function setupSelectAll() {
  const all = document.getElementById("select-all");
  if (!all) return;
  all.addEventListener("change", () => {
    for (const box of document.querySelectorAll('input[name="ids"]')) box.checked = all.checked;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const overview = document.getElementById("overview");
  if (overview) setupOverview(overview);
  setupSubtasks(document);
  setupSelectAll();
});
