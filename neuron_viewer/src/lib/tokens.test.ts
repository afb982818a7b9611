import { describe, expect, it } from "vitest";
import { differingPositions, displayToken, tokenWarnings, typedToken } from "./tokens";

describe("token display", () => {
  it("makes whitespace visible", () => {
    expect(displayToken(" Paris")).toBe("·Paris");
    expect(displayToken("\n\n")).toBe("↵↵");
    expect(displayToken("a\tb")).toBe("a⇥b");
    expect(displayToken("🙂")).toBe("🙂");
  });

  it("reads typed whitespace glyphs as whitespace", () => {
    expect(typedToken("␣Paris")).toBe(" Paris");
    expect(typedToken("·Paris")).toBe(" Paris");
    expect(typedToken("↵")).toBe("\n");
    expect(typedToken(displayToken(" a\tb\n"))).toBe(" a\tb\n");
    expect(typedToken("Paris")).toBe("Paris");
  });

  it("warns about multi-token targets and missing leading spaces", () => {
    expect(tokenWarnings(" Mary", [5099])).toEqual([]);
    expect(tokenWarnings("Mary", [5099])).toEqual(["has no leading space"]);
    expect(tokenWarnings(" Mary John", [1, 2])).toEqual(["is 2 tokens, not one"]);
    expect(tokenWarnings("", null)).toEqual(["empty"]);
  });

  it("finds the positions where two prompts differ", () => {
    expect([...differingPositions(["a", "b", "c"], ["a", "x", "c", "d"])]).toEqual([1, 3]);
  });
});
