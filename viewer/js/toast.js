// Anomaly toasts (US-SYS-003): a short notice in the corner that leads to the machine on click.

export function toast(text, severity = "critical", onClick = null, ms = 8000) {
  const el = document.createElement("div");
  el.className = `toast ${severity === "critical" ? "" : "warning"}`;
  el.setAttribute("role", "alert");
  el.textContent = text;
  if (onClick) {
    el.style.cursor = "pointer";
    el.addEventListener("click", () => { onClick(); el.remove(); });
  }
  document.getElementById("toasts").append(el);
  setTimeout(() => el.remove(), ms);
  return el;
}
