import { describe, expect, it } from "vitest";
import type { ModelInfo, NodeIndex } from "../api/types";
import {
  autoencoderLayers,
  componentName,
  componentWidth,
  describeNode,
  kindLayers,
  makeNode,
  nodeKey,
  nodeKind,
  parseNodeKey,
  tokenComponent,
} from "./nodes";

const info = {
  name: "m",
  nLayers: 4,
  dMlp: 96,
  nHeads: 3,
  autoencoders: [
    { layerIndex: 2, autoencoderSide: "mlp", nLatents: 512 },
    { layerIndex: 0, autoencoderSide: "mlp", nLatents: 256 },
    { layerIndex: 2, autoencoderSide: "attention", nLatents: 128 },
  ],
} as unknown as ModelInfo;

describe("node identity", () => {
  it("tells latents apart by their autoencoder's side", () => {
    const mlp = makeNode("mlp_autoencoder_latent", 5, 3, 7);
    const attn = makeNode("attention_autoencoder_latent", 5, 3, 7);
    expect(mlp).toEqual({
      nodeType: "autoencoder_latent",
      autoencoderSide: "mlp",
      layerIndex: 5,
      tokenIndex: 3,
      componentIndex: 7,
      attendedTokenIndex: null,
    });
    expect([nodeKey(mlp), nodeKey(attn)]).toEqual(["mlp-latent:5:3:7", "attn-latent:5:3:7"]);
    expect([nodeKind(mlp), nodeKind(attn)]).toEqual([
      "mlp_autoencoder_latent",
      "attention_autoencoder_latent",
    ]);
    expect(componentName(attn)).toBe("attn latent L5 #7");
    expect(describeNode(mlp, ["a", "b", "c", " Paris"])).toBe("mlp latent L5 #7 at ' Paris' (3)");
  });

  it("round-trips every kind through its key; malformed keys are null", () => {
    const nodes: NodeIndex[] = [
      makeNode("embedding", 0, 2, 0),
      makeNode("mlp_neuron", 5, 2, 123),
      makeNode("attention_head", 23, 13, 4, 1),
      makeNode("mlp_autoencoder_latent", 1, 0, 2047),
      makeNode("attention_autoencoder_latent", 29, 9, 0),
    ];
    for (const n of nodes) expect(parseNodeKey(nodeKey(n))).toEqual(n);
    expect(parseNodeKey("mlp-latent:1:2:3:4")).toBeNull(); // only heads have an attended token
    expect(parseNodeKey("latent:1:2:3")).toBeNull();
    expect(parseNodeKey("attn-latent:1:x:3")).toBeNull();
  });
});

describe("component ranges", () => {
  it("gives latents the layers and widths of the loaded autoencoders", () => {
    expect(autoencoderLayers(info, "mlp")).toEqual([0, 2]);
    expect(kindLayers(info, "attention_autoencoder_latent")).toEqual([2]);
    expect(kindLayers(info, "mlp_neuron")).toEqual([0, 1, 2, 3]);
    expect(componentWidth(info, "mlp_autoencoder_latent", 0)).toBe(256);
    expect(componentWidth(info, "mlp_autoencoder_latent", 1)).toBeNull();
    expect(componentWidth(info, "attention_autoencoder_latent", 2)).toBe(128);
    expect(componentWidth(info, "attention_head", 1)).toBe(3);
    expect(componentWidth(null, "mlp_neuron", 1)).toBeNull();
  });
});

describe("tokenComponent", () => {
  it("names neurons and latents the way the read and scalar endpoints take them", () => {
    expect(tokenComponent("mlp_neuron", 5, 7)).toEqual({
      nodeType: "mlp_neuron",
      autoencoderSide: null,
      layerIndex: 5,
      componentIndex: 7,
    });
    expect(tokenComponent("attention_autoencoder_latent", 2, 9)).toEqual({
      nodeType: "autoencoder_latent",
      autoencoderSide: "attention",
      layerIndex: 2,
      componentIndex: 9,
    });
  });
});
