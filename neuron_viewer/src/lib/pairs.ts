// Attention-head records carry one value per token pair (q, k <= q), flattened row by row over the
// lower triangle: (0,0), (1,0), (1,1), (2,0), ... These helpers index into that layout.

/** The flat index of pair (q, k), k <= q. */
export function pairIndex(q: number, k: number): number {
  return (q * (q + 1)) / 2 + k;
}

/** How many tokens a flattened lower triangle of `length` pairs covers (-1 if it is not one). */
export function tokensForPairs(length: number): number {
  const n = Math.round((Math.sqrt(8 * length + 1) - 1) / 2);
  return (n * (n + 1)) / 2 === length ? n : -1;
}

/** Per token k: the value of pair (q, k), i.e. what query q attends to (null after q). */
export function attendsTo(pairs: number[], n: number, q: number): (number | null)[] {
  return Array.from({ length: n }, (_, k) => (k <= q ? (pairs[pairIndex(q, k)] ?? null) : null));
}

/** Per token q: the value of pair (q, k), i.e. how much each later query reads key k. */
export function attendedFrom(pairs: number[], n: number, k: number): (number | null)[] {
  return Array.from({ length: n }, (_, q) => (q >= k ? (pairs[pairIndex(q, k)] ?? null) : null));
}
