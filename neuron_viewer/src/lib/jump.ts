// The `layer:index` jump boxes (home page): parse and check, returning a message instead of throwing.

export type JumpLimits = {
  /** layers 0..nLayers-1 exist (null: unknown) */
  nLayers?: number | null;
  /** only these layers hold records (a dataset collated for some layers) */
  layers?: number[] | null;
  /** what holds `layers`, for the message (default "this dataset") */
  layersHolder?: string;
  /** components per layer, or per given layer (latents: the width of its autoencoder); null:
   * unknown, the server checks */
  width?: number | ((layer: number) => number | null) | null;
};

export function parseJump(text: string, limits: JumpLimits = {}): [number, number] | string {
  const m = /^\s*(\d+)\s*:\s*(\d+)\s*$/.exec(text);
  if (!m) return "use the form layer:index, e.g. 5:123";
  const [layer, index] = [Number(m[1]), Number(m[2])];
  const { nLayers, layers, layersHolder = "this dataset" } = limits;
  if (nLayers != null && layer >= nLayers)
    return `layer ${layer} is out of range (0–${nLayers - 1})`;
  if (layers != null && !layers.includes(layer))
    return `layer ${layer} is not in ${layersHolder} (layers ${formatLayers(layers)})`;
  const width = typeof limits.width === "function" ? limits.width(layer) : limits.width;
  if (width != null && index >= width) return `index ${index} is out of range (0–${width - 1})`;
  return [layer, index];
}

/** [0, 1, 2, 5, 7, 8] → "0–2, 5, 7–8" */
export function formatLayers(layers: number[]): string {
  const sorted = [...new Set(layers)].sort((a, b) => a - b);
  const parts: string[] = [];
  for (let i = 0; i < sorted.length;) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++;
    parts.push(j > i ? `${sorted[i]}–${sorted[j]}` : `${sorted[i]}`);
    i = j + 1;
  }
  return parts.join(", ") || "none";
}
