import { describe, expect, it } from "vitest";
import { DEFAULT_STATE, paramsToState, stateToParams, type DebuggerState } from "./url";

const full: DebuggerState = {
  prompt: "When Mary & John went to the store, John gave a drink to #1 ?x=y",
  targets: [" Mary"],
  distractors: [" John", " store"],
  secondPrompt: "When John and Mary went to the store, Mary gave a drink to",
  ablations: [
    {
      node: {
        nodeType: "attention_head",
        layerIndex: 23,
        tokenIndex: 13,
        componentIndex: 4,
        attendedTokenIndex: 1,
      },
      value: 0,
    },
    {
      node: {
        nodeType: "mlp_neuron",
        layerIndex: 5,
        tokenIndex: 2,
        componentIndex: 123,
        attendedTokenIndex: null,
      },
      value: -1.5,
    },
    {
      node: {
        nodeType: "autoencoder_latent",
        autoencoderSide: "attention",
        layerIndex: 7,
        tokenIndex: 3,
        componentIndex: 1999,
        attendedTokenIndex: null,
      },
      value: 0,
    },
  ],
  trace: {
    node: {
      nodeType: "attention_head",
      layerIndex: 20,
      tokenIndex: 13,
      componentIndex: 1,
      attendedTokenIndex: 3,
    },
    attentionTraceType: "value",
    downstream: {
      nodeType: "mlp_neuron",
      layerIndex: 25,
      tokenIndex: 13,
      componentIndex: 7,
      attendedTokenIndex: null,
    },
  },
  topK: 25,
  latents: ["mlp", "attention"],
};

describe("URL state", () => {
  it("round-trips every field through a real URL string", () => {
    const url = new URL(`http://x/debugger?${stateToParams(full).toString()}`);
    expect(paramsToState(url.searchParams)).toEqual(full);
  });

  it("round-trips the default state to an empty query", () => {
    expect(stateToParams(DEFAULT_STATE).toString()).toBe("");
    expect(paramsToState(new URLSearchParams(""))).toEqual(DEFAULT_STATE);
  });

  it("keeps an empty second prompt distinct from none", () => {
    const s = { ...DEFAULT_STATE, secondPrompt: "" };
    expect(paramsToState(stateToParams(s)).secondPrompt).toBe("");
  });

  it("drops malformed parts instead of throwing", () => {
    const p = new URLSearchParams("prompt=hi&ablate=bogus&ablate=mlp:1:2:3=abc&trace=attn:x&k=-4");
    const s = paramsToState(p);
    expect(s.prompt).toBe("hi");
    expect(s.ablations).toEqual([]);
    expect(s.trace).toBeNull();
    expect(s.topK).toBe(10);
  });

  it("keeps the latent switches per side, in a fixed order, ignoring unknown sides", () => {
    const s = paramsToState(new URLSearchParams("prompt=hi&latents=attention&latents=resid"));
    expect(s.latents).toEqual(["attention"]);
    const both = stateToParams({ ...s, latents: ["attention", "mlp"] }).getAll("latents");
    expect(both).toEqual(["mlp", "attention"]);
  });

  it("encodes prompts so that & # ? and newlines survive", () => {
    const s = { ...DEFAULT_STATE, prompt: "a & b # c ? d\nnext line" };
    const query = stateToParams(s).toString();
    expect(query).not.toContain("#");
    expect(paramsToState(new URLSearchParams(query)).prompt).toBe(s.prompt);
  });
});
