// The dashboard's browser-side helpers (app.py puts this file in a <script> in the page's head). Page logic stays in Python:
// these only present what the server rendered, where a round trip would be too slow or the server never sees it.
(() => {
  // A plotly chart updated while its tab was hidden keeps the width it was laid out at; a resize on every tab
  // switch redraws it to its container (the charts are `responsive`).
  document.addEventListener("click", (ev) => {
    if (ev.target.closest('[role="tab"]')) setTimeout(() => window.dispatchEvent(new Event("resize")), 60);
  });

  // Gradio clamps a typed slider value to its range without a word; say so beside the slider.
  document.addEventListener("change", (ev) => {
    const box = ev.target;
    if (!(box instanceof HTMLInputElement) || box.type !== "number" || box.min === "" || box.max === "") return;
    const block = box.closest(".block");
    const old = block && block.querySelector(".hlm-clamp");
    if (old) old.remove();
    const v = parseFloat(box.value), lo = parseFloat(box.min), hi = parseFloat(box.max);
    if (!block || Number.isNaN(v) || (v >= lo && v <= hi)) return;
    const note = document.createElement("div");
    note.className = "hlm-clamp";
    note.setAttribute("role", "status");
    note.textContent = `${v} is outside ${lo}–${hi}, so ${v < lo ? lo : hi} is used`;
    block.appendChild(note);
    setTimeout(() => note.remove(), 8000);
  }, true);

  // Token details on click, tap, Enter or Space: the token's record (its title, rendered by the server) in a
  // panel, so touch screens and keyboards get what a mouse gets on hover.
  let panel = null, from = null;
  const close = () => {
    if (!panel) return;
    panel.remove();
    panel = null;
    if (from && document.contains(from)) from.focus();
  };
  const open = (tok) => {
    const [head, ...lines] = (tok.getAttribute("title") || "").split("\n");
    if (!panel) {
      panel = document.createElement("aside");
      panel.className = "hlm-token-panel";
      panel.setAttribute("role", "region");
      panel.setAttribute("aria-label", "Token details");
      panel.setAttribute("aria-live", "polite");
      document.body.appendChild(panel);
    }
    from = tok;
    panel.replaceChildren();
    const title = document.createElement("div");
    title.className = "head";
    title.textContent = head;
    const shut = document.createElement("button");
    shut.type = "button";
    shut.textContent = "×";
    shut.setAttribute("aria-label", "Close token details");
    shut.addEventListener("click", close);
    title.appendChild(shut);
    const list = document.createElement("ul");
    for (const line of lines) {
      const li = document.createElement("li");
      li.textContent = line;
      list.appendChild(li);
    }
    panel.append(title, list);
  };
  document.addEventListener("click", (ev) => {
    const tok = ev.target.closest(".tok[data-i]");
    if (tok) open(tok);
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") return close();
    const tok = ev.target.closest && ev.target.closest(".tok[data-i]");
    if (tok && (ev.key === "Enter" || ev.key === " ")) {
      ev.preventDefault();
      open(tok);
    }
  });
})();
