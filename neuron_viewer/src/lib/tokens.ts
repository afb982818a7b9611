// How tokens are shown: whitespace made visible so " Paris" and "Paris" differ at a glance.

export function displayToken(text: string): string {
  return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
}

/** A token as typed, with the glyphs displayToken shows for whitespace (and "␣", which the
 * placeholder uses) read back as the whitespace they stand for: "␣Paris" and "·Paris" are " Paris". */
export function typedToken(text: string): string {
  return text.replace(/[·␣]/g, " ").replace(/↵/g, "\n").replace(/⇥/g, "\t").replace(/␍/g, "\r");
}

/** Warnings for a target/distractor token typed by the user, before the server is asked. */
export function tokenWarnings(token: string, ids: number[] | null): string[] {
  const out: string[] = [];
  if (token.length === 0) out.push("empty");
  if (ids && ids.length !== 1) out.push(`is ${ids.length} tokens, not one`);
  if (token.length > 0 && !/^\s/.test(token)) out.push("has no leading space");
  return out;
}

/** Indices where two token sequences differ (by position; extra tokens on either side count). */
export function differingPositions(left: string[], right: string[]): Set<number> {
  const out = new Set<number>();
  for (let i = 0; i < Math.max(left.length, right.length); i++) {
    if (left[i] !== right[i]) out.add(i);
  }
  return out;
}
