import { describe, expect, it } from "vitest";
import { NODE_TYPES } from "../api/nodeTypes.fixture";
import type { NodeRow } from "../api/types";
import {
  correlation,
  excerptLine,
  explanationNode,
  explanationTitle,
  formatScore,
  methodLabel,
  rowExplanation,
} from "./explanations";
import { NodeTypes } from "./nodes";
import { alignRows, toCsv } from "./table";

const types = new NodeTypes(NODE_TYPES);

const neuronRow = (explanation: string | null, score: number | null = null, i = 7): NodeRow => ({
  node: {
    nodeType: "mlp_neuron",
    layerIndex: 1,
    tokenIndex: 1,
    componentIndex: i,
    attendedTokenIndex: null,
  },
  activation: 1,
  writeMagnitude: 1,
  directEffect: 0.5,
  estimatedTotalEffect: 0.5,
  explanation,
  explanationScore: score,
});

describe("explanations", () => {
  it("formats scores, undefined ones in words", () => {
    expect(formatScore(0.6234)).toBe("0.62");
    expect(formatScore(-0.05)).toBe("-0.05");
    expect(formatScore(null)).toBe("no score");
    expect(formatScore(undefined)).toBe("no score");
    expect(formatScore(NaN)).toBe("no score");
  });

  it("takes a row's explanation from either side, null when none", () => {
    const [both] = alignRows(types, [neuronRow('tokens " wife" (10)', 0.41)], null);
    expect(rowExplanation(both)).toEqual({ text: 'tokens " wife" (10)', score: 0.41 });
    const [rightOnly] = alignRows(types, [], [neuronRow("after x", null)]);
    expect(rowExplanation(rightOnly)).toEqual({ text: "after x", score: null });
    const [none] = alignRows(types, [neuronRow(null)], null);
    expect(rowExplanation(none)).toBeNull();
  });

  it("hovers with the whole text and the score", () => {
    const title = explanationTitle('tokens " married" (10), " wife" (7)', 0.62);
    expect(title).toContain('tokens " married" (10), " wife" (7)');
    expect(title).toContain("score 0.62");
    expect(explanationTitle("x", null)).toContain("score no score");
  });

  it("exports the explanation and its score as the CSV's last columns", () => {
    const csv = toCsv(
      alignRows(types, [neuronRow('tokens " a, b" (10)', 0.5), neuronRow(null, null, 8)], null),
      ["x", "y"],
      false,
    );
    const [header, first, second] = csv.trim().split("\n");
    expect(header.split(",").slice(-2)).toEqual(["explanation", "explanation_score"]);
    expect(first.endsWith(',"tokens "" a, b"" (10)",0.5')).toBe(true);
    expect(second.endsWith(",,")).toBe(true);
  });

  it("names methods in words, the model only when there is one", () => {
    const base = { explainer: "baseline", simulator: "baseline", model: "", promptVersion: "b-1" };
    expect(methodLabel(base)).toBe("explainer baseline · simulator baseline · prompt b-1");
    expect(methodLabel({ ...base, explainer: "llm", model: "smollm2-135m" })).toContain(
      "model smollm2-135m",
    );
  });

  it("names a component as the explanation routes do", () => {
    const mlp = types.named("mlp_neuron")!;
    expect(explanationNode(mlp, 3, 9)).toEqual({
      nodeType: "mlp_neuron",
      autoencoderSide: null,
      layerIndex: 3,
      componentIndex: 9,
    });
    const latent = NODE_TYPES.find((t) => t.autoencoderSide === "attention")!;
    expect(explanationNode(latent, 0, 2, "latents")).toEqual({
      nodeType: "autoencoder_latent",
      autoencoderSide: "attention",
      layerIndex: 0,
      componentIndex: 2,
      datasetName: "latents",
    });
  });

  it("correlates like the server's score, null when undefined", () => {
    expect(correlation([1, 2, 3], [2, 4, 6])).toBeCloseTo(1);
    expect(correlation([1, 2, 3], [3, 2, 1])).toBeCloseTo(-1);
    expect(correlation([0, 1, 0, 1], [1, 1, 0, 0])).toBeCloseTo(0);
    expect(correlation([1, 2, 3], [5, 5, 5])).toBeNull();
    expect(correlation([1], [1])).toBeNull();
  });

  it("shows a neuron excerpt's values per token as they are", () => {
    const line = excerptLine(
      {
        tokens: ["a", "b", "c"],
        activations: [0, 2, 1],
        simulatedActivations: [0, 10, 0],
        group: "top",
      },
      false,
    );
    expect(line.truth).toEqual([0, 2, 1]);
    expect(line.simulated).toEqual([0, 10, 0]);
    expect(line.group).toBe("top");
    expect(line.correlation).toBeCloseTo(correlation([0, 2, 1], [0, 10, 0])!);
  });

  it("summarizes a head excerpt's pairs per token by the strongest pair it is attended in", () => {
    // Pairs (q, k <= q) row by row: (0,0) (1,0) (1,1) (2,0) (2,1) (2,2).
    const line = excerptLine(
      {
        tokens: ["a", "b", "c"],
        activations: [0.1, 0.9, 0.2, 0.3, 0.4, 0.5],
        simulatedActivations: [0, 10, 0, 0, 5, 0],
        group: "random",
      },
      true,
    );
    expect(line.truth).toEqual([0.9, 0.4, 0.5]);
    expect(line.simulated).toEqual([10, 5, 0]);
    expect(line.correlation).toBeCloseTo(
      correlation([0.1, 0.9, 0.2, 0.3, 0.4, 0.5], [0, 10, 0, 0, 5, 0])!,
    );
  });
});
