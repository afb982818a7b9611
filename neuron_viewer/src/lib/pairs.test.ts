import { describe, expect, it } from "vitest";
import { attendedFrom, attendsTo, pairIndex, tokensForPairs } from "./pairs";

describe("lower-triangle pairs", () => {
  // 3 tokens: (0,0) (1,0) (1,1) (2,0) (2,1) (2,2)
  const pairs = [0, 10, 11, 20, 21, 22];

  it("indexes pairs row by row", () => {
    expect(pairIndex(0, 0)).toBe(0);
    expect(pairIndex(1, 0)).toBe(1);
    expect(pairIndex(2, 2)).toBe(5);
    expect(pairIndex(63, 63)).toBe(2079);
    expect(tokensForPairs(6)).toBe(3);
    expect(tokensForPairs(2080)).toBe(64);
    expect(tokensForPairs(5)).toBe(-1);
  });

  it("reads a query's row (what it attends to) and a key's column (who reads it)", () => {
    expect(attendsTo(pairs, 3, 1)).toEqual([10, 11, null]);
    expect(attendsTo(pairs, 3, 2)).toEqual([20, 21, 22]);
    expect(attendedFrom(pairs, 3, 0)).toEqual([0, 10, 20]);
    expect(attendedFrom(pairs, 3, 2)).toEqual([null, null, 22]);
  });
});
