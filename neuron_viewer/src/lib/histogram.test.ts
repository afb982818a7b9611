import { describe, expect, it } from "vitest";
import { axisFraction, binValues, formatNumber, quantileBinLabels } from "./histogram";

describe("binValues", () => {
  it("counts values into equal-width bins, the last bin closed", () => {
    const h = binValues([0, 0.1, 0.5, 0.99, 1], 2);
    expect(h.edges).toEqual([0, 0.5, 1]);
    expect(h.counts).toEqual([2, 3]);
    expect(h.total).toBe(5);
    expect(h.min).toBe(0);
    expect(h.max).toBe(1);
  });

  it("skips non-finite values and keeps every finite one", () => {
    const values = [NaN, Infinity, -1, 2, 3, -Infinity];
    const h = binValues(values, 4);
    expect(h.total).toBe(3);
    expect(h.counts.reduce((a, b) => a + b, 0)).toBe(3);
    expect(h.edges).toEqual([-1, 0, 1, 2, 3]);
    expect(h.counts).toEqual([1, 0, 0, 2]); // 2 opens the last bin, 3 closes it
  });

  it("widens the range to include the marked values", () => {
    const h = binValues([0, 1], 4, [3, NaN]);
    expect(h.edges[0]).toBe(0);
    expect(h.edges[4]).toBe(3);
    expect(h.counts).toEqual([1, 1, 0, 0]); // width 0.75
    expect(axisFraction(h, 3)).toBe(1);
    expect(axisFraction(h, 1.5)).toBe(0.5);
    expect(axisFraction(h, 10)).toBe(1); // clamped
  });

  it("handles no values and a single distinct value", () => {
    expect(binValues([], 10)).toEqual({ edges: [], counts: [], total: 0, min: 0, max: 0 });
    const h = binValues([2, 2, 2], 10);
    expect(h.counts).toEqual([3]);
    expect(h.edges).toEqual([1.5, 2.5]);
  });

  it("bins a large sample with every value counted once", () => {
    const values = Array.from({ length: 10_000 }, (_, i) => Math.sin(i) * 5);
    const h = binValues(values, 37);
    expect(h.counts).toHaveLength(37);
    expect(h.counts.reduce((a, b) => a + b, 0)).toBe(10_000);
    for (let i = 0; i < 37; i++) expect(h.edges[i + 1]).toBeGreaterThan(h.edges[i]);
  });
});

describe("quantile bins and numbers", () => {
  it("labels the bins between the boundaries", () => {
    expect(quantileBinLabels([0.5, 1, 2], 4)).toEqual([
      "excerpt max < 0.500",
      "0.500 ≤ excerpt max < 1.000",
      "1.000 ≤ excerpt max < 2.000",
      "excerpt max ≥ 2.000",
    ]);
    expect(quantileBinLabels([], 2)).toEqual(["bin 1", "bin 2"]);
  });

  it("formats numbers compactly", () => {
    expect(formatNumber(null)).toBe("–");
    expect(formatNumber(NaN)).toBe("–");
    expect(formatNumber(0)).toBe("0.000");
    expect(formatNumber(-0.0067, 3)).toBe("-0.007");
    expect(formatNumber(0.00001)).toBe("1.00e-5");
    expect(formatNumber(123456)).toBe("1.23e+5");
  });
});
