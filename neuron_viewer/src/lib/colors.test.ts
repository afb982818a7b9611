import { describe, expect, it } from "vitest";
import { cellColor, intensity, maxAbs } from "./colors";

describe("colour scales", () => {
  it("scales by the largest magnitude in the column", () => {
    expect(maxAbs([1, -3, null, 2, undefined, NaN])).toBe(3);
    expect(intensity(-3, 3)).toBe(1);
    expect(intensity(1.5, 3)).toBe(0.5);
    expect(intensity(6, 3)).toBe(1); // clamped
  });

  it("uses red for positive and blue for negative values, transparent for zero or missing", () => {
    expect(cellColor(2, 2)).toMatch(/^rgba\(220, 38, 38/);
    expect(cellColor(-2, 2)).toMatch(/^rgba\(37, 99, 235/);
    expect(cellColor(0, 2)).toBe("transparent");
    expect(cellColor(null, 2)).toBe("transparent");
    expect(cellColor(1, 0)).toBe("transparent");
  });

  it("gives stronger colours to larger magnitudes", () => {
    const alpha = (c: string) => Number(c.split(",")[3].replace(")", ""));
    expect(alpha(cellColor(2, 4))).toBeLessThan(alpha(cellColor(4, 4)));
    expect(alpha(cellColor(-1, 4))).toBeLessThan(alpha(cellColor(-3, 4)));
  });

  it("never uses the negative colour on an unsigned scale", () => {
    expect(cellColor(-2, 2, false)).toMatch(/^rgba\(220, 38, 38/);
  });
});
