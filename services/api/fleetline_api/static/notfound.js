// Any route the dashboard does not know.

import { template } from "./dom.js";

export function mount(root) {
  root.append(template("not-found"));
  return () => {};
}
