// Paging through a list the API serves by cursor (`next_cursor`), the same way on every
// page: the cursors of the pages seen so far are kept (the first page has none), so
// "previous" goes back without the API knowing how; the label says "Page N".

/**
 * A pager over `prev` and `next` buttons and a `label` element. `onPage()` is called
 * when the user moves to another page: read `cursor()` and load it, then call
 * `loaded(nextCursor)`.
 */
export function cursorPager({ prev, next, label, onPage }) {
  const cursors = [null];
  let index = 0;
  let nextCursor = null;

  // Until the page asked for is loaded, neither button moves: a second click would
  // count a page that was never shown.
  next.addEventListener("click", () => {
    if (!nextCursor) return;
    cursors[index + 1] = nextCursor;
    index += 1;
    nextCursor = null;
    next.disabled = prev.disabled = true;
    onPage();
  });
  prev.addEventListener("click", () => {
    if (index === 0 || prev.disabled) return;
    index -= 1;
    next.disabled = prev.disabled = true;
    onPage();
  });

  return {
    /** The cursor of the page to load (null: the first). */
    cursor() {
      return cursors[index];
    },
    /** The page's number, from 0. */
    index() {
      return index;
    },
    /** A page was loaded: where the next one starts (null: it was the last). */
    loaded(cursor) {
      nextCursor = cursor || null;
      prev.disabled = index === 0;
      next.disabled = !nextCursor;
      label.textContent = `Page ${index + 1}`;
    },
  };
}
