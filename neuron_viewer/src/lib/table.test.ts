import { describe, expect, it } from "vitest";
import type { NodeRow } from "../api/types";
import { alignRows, filterRows, metricValue, sortRows, toCsv, topKPerColumn } from "./table";

const neuron = (layer: number, i: number): NodeRow["node"] => ({
  nodeType: "mlp_neuron",
  layerIndex: layer,
  tokenIndex: 1,
  componentIndex: i,
  attendedTokenIndex: null,
});
const head = (layer: number, h: number): NodeRow["node"] => ({
  nodeType: "attention_head",
  layerIndex: layer,
  tokenIndex: 2,
  componentIndex: h,
  attendedTokenIndex: 0,
});
const row = (node: NodeRow["node"], de: number | null, act = 1): NodeRow => ({
  node,
  activation: act,
  writeMagnitude: Math.abs(act),
  directEffect: de,
  estimatedTotalEffect: de,
});

describe("node table diffing", () => {
  const left = [row(neuron(1, 5), 2.0), row(head(3, 1), -1.0), row(neuron(2, 9), 0.5)];
  const right = [row(head(3, 1), 0.5), row(neuron(1, 5), 1.5), row(neuron(4, 0), 3.0)];

  it("lines up the two sides by node, not by position", () => {
    const rows = alignRows(left, right);
    expect(rows.map((r) => r.key)).toEqual(["mlp:1:1:5", "attn:3:2:1:0", "mlp:2:1:9", "mlp:4:1:0"]);
    expect(metricValue(rows[0], "directEffect", "diff")).toBeCloseTo(0.5);
    expect(metricValue(rows[1], "directEffect", "diff")).toBeCloseTo(-1.5);
    expect(metricValue(rows[2], "directEffect", "diff")).toBeNull(); // only on the left
    expect(metricValue(rows[3], "directEffect", "right")).toBe(3.0);
  });

  it("sorts by a column and side, missing values last", () => {
    const rows = alignRows(left, right);
    const desc = sortRows(rows, { metric: "directEffect", side: "left", descending: true });
    expect(desc.map((r) => r.key)).toEqual(["mlp:1:1:5", "mlp:2:1:9", "attn:3:2:1:0", "mlp:4:1:0"]);
    const asc = sortRows(rows, { metric: "directEffect", side: "diff", descending: false });
    expect(asc.map((r) => r.key).slice(0, 2)).toEqual(["attn:3:2:1:0", "mlp:1:1:5"]);
    expect(asc.at(-1)?.right?.directEffect ?? asc.at(-1)?.left?.directEffect).toBeDefined();
  });

  it("filters latents by the side of their autoencoder", () => {
    const latent = (side: "mlp" | "attention", layer: number, j: number): NodeRow["node"] => ({
      nodeType: "autoencoder_latent",
      autoencoderSide: side,
      layerIndex: layer,
      tokenIndex: 1,
      componentIndex: j,
    });
    const rows = alignRows(
      [row(latent("mlp", 1, 5), 1), row(latent("attention", 1, 5), 2), row(neuron(2, 5), 3)],
      null,
    );
    expect(rows.map((r) => r.key)).toEqual(["mlp-latent:1:1:5", "attn-latent:1:1:5", "mlp:2:1:5"]);
    const only = (kind: string) =>
      filterRows(rows, { nodeTypes: new Set([kind]), layer: null }).map((r) => r.key);
    expect(only("attention_autoencoder_latent")).toEqual(["attn-latent:1:1:5"]);
    expect(only("mlp_autoencoder_latent")).toEqual(["mlp-latent:1:1:5"]);
    expect(toCsv(rows, ["a", "b"], false).split("\n")[1]).toMatch(
      /^mlp latent L1 #5,mlp_autoencoder_latent,1,1,b,5,/,
    );
  });

  it("filters by node type and layer", () => {
    const rows = alignRows(left, null);
    expect(filterRows(rows, { nodeTypes: new Set(["attention_head"]), layer: null })).toHaveLength(
      1,
    );
    expect(filterRows(rows, { nodeTypes: new Set(), layer: 2 }).map((r) => r.key)).toEqual([
      "mlp:2:1:9",
    ]);
  });

  it("keeps the top and bottom k of every column", () => {
    const many = Array.from({ length: 20 }, (_, i) => row(neuron(0, i), i - 10, 1));
    const kept = topKPerColumn(alignRows(many, null), 2, ["left"]);
    const des = kept.map((r) => r.left?.directEffect);
    expect(des).toContain(9);
    expect(des).toContain(8);
    expect(des).toContain(-10);
    expect(des).toContain(-9);
    expect(des).not.toContain(0);
  });

  it("keeps a row that is top on the right side only (an ablated node is 0 on the left)", () => {
    const l = Array.from({ length: 5 }, (_, i) => row(neuron(0, i), i, i === 0 ? 0 : 1));
    const r = Array.from({ length: 5 }, (_, i) => row(neuron(0, i), i, i === 0 ? 10 : 1));
    const keys = (sides: ("left" | "right" | "diff")[]) =>
      topKPerColumn(alignRows(l, r), 1, sides).map((x) => x.key);
    expect(keys(["left", "diff", "right"])).toContain("mlp:0:1:0");
  });

  it("exports CSV with quoted tokens and one column per metric and side", () => {
    const csv = toCsv(alignRows(left, right), ["a", 'say "hi", ok', "c"], true);
    const [header, first] = csv.trim().split("\n");
    expect(header.split(",")).toContain("directEffect_diff");
    expect(first).toContain('"say ""hi"", ok"');
    expect(csv.trim().split("\n")).toHaveLength(5);
  });
});
