// Colour scales for table cells and token heat maps. Signed values use a diverging scale (blue for
// negative, red for positive) around 0; unsigned ones a sequential scale. Scaled per column by the
// largest magnitude, so the strongest cell of a column is always fully saturated.

export function maxAbs(values: Iterable<number | null | undefined>): number {
  let m = 0;
  for (const v of values) if (v != null && Number.isFinite(v)) m = Math.max(m, Math.abs(v));
  return m;
}

/** Intensity in [0, 1]: |value| / scale, clamped; 0 when the scale is 0 or the value missing. */
export function intensity(value: number | null | undefined, scale: number): number {
  if (value == null || !Number.isFinite(value) || scale <= 0) return 0;
  return Math.min(1, Math.abs(value) / scale);
}

/** A CSS colour for a value on a diverging (signed) or sequential scale. */
export function cellColor(value: number | null | undefined, scale: number, signed = true): string {
  const a = intensity(value, scale);
  if (a === 0) return "transparent";
  const alpha = Math.round(a * 0.85 * 100) / 100;
  if (!signed || (value ?? 0) >= 0) return `rgba(220, 38, 38, ${alpha})`;
  return `rgba(37, 99, 235, ${alpha})`;
}

/** Readable text colour on top of cellColor. */
export function textColor(value: number | null | undefined, scale: number): string {
  return intensity(value, scale) > 0.6 ? "#fff" : "inherit";
}
