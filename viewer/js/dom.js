// One small helper to build elements: el("td", {textContent: "x", dataset: {thing: id}}, ...children).

export function el(tag, props = {}, ...children) {
  const { dataset, ...rest } = props;
  const e = Object.assign(document.createElement(tag), rest);
  for (const [k, v] of Object.entries(dataset || {})) e.dataset[k] = v;
  e.append(...children);
  return e;
}
