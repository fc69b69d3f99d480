// Sorting the rows shown in a table by column, the same way on every page. A sortable
// column's header is `<th data-sort="KEY"><button type="button" class="sort">`; a click
// sorts by that column, a second click reverses it, and aria-sort says which column and
// which way (style.css draws the arrows). What the first click gives is the comparator's
// own order: times newest first, states in their usual order, names and numbers rising.
// Rows the comparator holds equal keep the order `tie` gives them, else the API's (the
// sort is stable). The page shown is sorted; the API still pages in its own order.

/**
 * Where a missing value goes: last, whichever way the column is sorted. A comparator
 * answers ±Infinity when one side is missing, which sortableTable does not reverse.
 */
function missingLast(xMissing, yMissing) {
  if (xMissing === yMissing) return 0;
  return xMissing ? Number.POSITIVE_INFINITY : Number.NEGATIVE_INFINITY;
}

/** Text order for sorting: "" (nothing) last, by the user's locale. */
export function compareText(a, b) {
  const x = a === null || a === undefined ? "" : String(a);
  const y = b === null || b === undefined ? "" : String(b);
  if (!x || !y) return missingLast(!x, !y);
  return x.localeCompare(y);
}

/** Number order: null (nothing) last. */
export function compareNumbers(a, b) {
  const x = typeof a === "number" ? a : null;
  const y = typeof b === "number" ? b : null;
  if (x === null || y === null) return missingLast(x === null, y === null);
  return x < y ? -1 : x > y ? 1 : 0; // not x - y: that may overflow to ±Infinity
}

/** Time order, newest first (ISO times or dates); none last. */
export function compareNewest(a, b) {
  const x = a ? Date.parse(a) : Number.NaN;
  const y = b ? Date.parse(b) : Number.NaN;
  if (Number.isNaN(x) || Number.isNaN(y)) return missingLast(Number.isNaN(x), Number.isNaN(y));
  return Math.sign(y - x);
}

/** Order by place in `list` (values not in it last). */
export function compareRank(list) {
  return (a, b) => {
    const x = list.indexOf(a);
    const y = list.indexOf(b);
    return x < 0 || y < 0 ? missingLast(x < 0, y < 0) : x - y;
  };
}

/** A comparator of `field(item)` by `compare`. */
export function by(field, compare = compareText) {
  return (a, b) => compare(field(a), field(b));
}

/**
 * Make the `th[data-sort]` headers of `table` sort it.
 *
 * @param compare  sort key (the header's data-sort) → comparator of two items
 * @param initial  {key, dir} sorted by at first, or null: the order the items come in
 * @param tie      comparator for items equal under the column's (not reversed with it)
 * @param onSort   called after a click changed the order: render the rows again
 * @returns {order(items) → a sorted copy, state() → {key, dir} or null}
 */
export function sortableTable(table, { compare, initial = null, tie = () => 0, onSort }) {
  let sort = initial ? { ...initial } : null;
  const headers = [...table.querySelectorAll("th[data-sort]")];

  function mark() {
    for (const th of headers) {
      if (sort && th.dataset.sort === sort.key) {
        th.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
      } else {
        th.removeAttribute("aria-sort");
      }
    }
  }

  for (const th of headers) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.sort;
      sort = { key, dir: sort && sort.key === key ? -sort.dir : 1 };
      mark();
      onSort();
    });
  }
  mark();

  return {
    order(items) {
      if (!sort) return [...items];
      const primary = compare[sort.key];
      const directed = (a, b) => {
        const order = primary(a, b);
        return Number.isFinite(order) ? order * sort.dir : order; // missing: last both ways
      };
      return [...items].sort((a, b) => directed(a, b) || tie(a, b));
    },
    state() {
      return sort ? { ...sort } : null;
    },
  };
}
