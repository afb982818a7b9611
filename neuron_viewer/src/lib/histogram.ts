// Binning for the activation histogram: equal-width bins over [min, max] of the values (widened to
// include any `include` values, such as the quantile boundaries to mark), non-finite values skipped.

export type Histogram = {
  /** bins + 1 edges, ascending; bin i is [edges[i], edges[i+1]), the last bin closed. */
  edges: number[];
  counts: number[];
  /** finite values binned */
  total: number;
  min: number;
  max: number;
};

export function binValues(
  values: Iterable<number>,
  bins = 40,
  include: Iterable<number> = [],
): Histogram {
  const finite: number[] = [];
  for (const v of values) if (Number.isFinite(v)) finite.push(v);
  let min = Infinity;
  let max = -Infinity;
  for (const v of finite) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  for (const v of include) {
    if (!Number.isFinite(v)) continue;
    if (v < min) min = v;
    if (v > max) max = v;
  }
  const n = Math.max(1, Math.floor(bins));
  if (min === Infinity) return { edges: [], counts: [], total: 0, min: 0, max: 0 };
  if (min === max) {
    // One distinct value: a single bin of width 1 centred on it.
    return {
      edges: [min - 0.5, min + 0.5],
      counts: [finite.length],
      total: finite.length,
      min,
      max,
    };
  }
  const width = (max - min) / n;
  const edges = Array.from({ length: n + 1 }, (_, i) => (i === n ? max : min + i * width));
  const counts = new Array<number>(n).fill(0);
  for (const v of finite) {
    const i = Math.min(n - 1, Math.floor((v - min) / width));
    counts[i] += 1;
  }
  return { edges, counts, total: finite.length, min, max };
}

/** Where `x` falls on the histogram's axis, as a fraction in [0, 1] (for markers). */
export function axisFraction(h: Histogram, x: number): number {
  const lo = h.edges[0];
  const hi = h.edges[h.edges.length - 1];
  if (lo == null || hi == null || hi === lo) return 0.5;
  return Math.min(1, Math.max(0, (x - lo) / (hi - lo)));
}

/** A compact number: fixed digits, exponential when tiny or huge; "–" when missing. */
export function formatNumber(x: number | null | undefined, digits = 3): string {
  if (x == null || !Number.isFinite(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a < 10 ** -digits || a >= 1e5)) return x.toExponential(2);
  return x.toFixed(digits);
}

/** Labels of the by-quantile sample bins: bin i holds excerpts whose max lies between the
 * boundaries i-1 and i ("excerpt max < b0", "b0 ≤ excerpt max < b1", ..., "excerpt max ≥ bn"). */
export function quantileBinLabels(boundaries: number[], groups: number): string[] {
  return Array.from({ length: groups }, (_, i) => {
    if (boundaries.length + 1 !== groups) return `bin ${i + 1}`;
    if (i === 0) return `excerpt max < ${formatNumber(boundaries[0])}`;
    if (i === groups - 1) return `excerpt max ≥ ${formatNumber(boundaries[i - 1])}`;
    return `${formatNumber(boundaries[i - 1])} ≤ excerpt max < ${formatNumber(boundaries[i])}`;
  });
}
