import { describe, expect, it } from "vitest";
import { formatLayers, parseJump } from "./jump";

describe("parseJump", () => {
  it("parses layer:index with spaces", () => {
    expect(parseJump("5:123")).toEqual([5, 123]);
    expect(parseJump(" 0 : 7 ")).toEqual([0, 7]);
  });

  it("returns a message for malformed input", () => {
    for (const bad of ["", "5", "5:", ":3", "a:b", "-1:2", "1.5:2", "1:2:3"])
      expect(parseJump(bad)).toMatch(/layer:index/);
  });

  it("checks the model's range and the dataset's layers", () => {
    expect(parseJump("30:0", { nLayers: 30 })).toMatch(/layer 30 is out of range \(0–29\)/);
    expect(parseJump("1:1536", { nLayers: 30, width: 1536 })).toMatch(/index 1536/);
    expect(parseJump("5:1", { layers: [0, 1] })).toMatch(/not in this dataset \(layers 0–1\)/);
    expect(parseJump("1:1", { layers: [0, 1], width: 9 })).toEqual([1, 1]);
  });

  it("checks latents against the autoencoder of their layer", () => {
    const width = (layer: number) => (layer === 2 ? 512 : null);
    const limits = { layers: [2], layersHolder: "the loaded autoencoders", width };
    expect(parseJump("2:511", limits)).toEqual([2, 511]);
    expect(parseJump("2:512", limits)).toMatch(/index 512 is out of range \(0–511\)/);
    expect(parseJump("1:0", limits)).toMatch(/layer 1 is not in the loaded autoencoders/);
  });

  it("formats layer lists as ranges", () => {
    expect(formatLayers([8, 0, 1, 2, 5, 7])).toBe("0–2, 5, 7–8");
    expect(formatLayers([3])).toBe("3");
    expect(formatLayers([])).toBe("none");
  });
});
