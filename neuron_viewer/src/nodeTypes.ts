// The node type descriptions (GET /node_types), fetched once by App at start-up. Pages are
// rendered only once they are here, so every component below App can read them.
import { createContext, useContext } from "react";
import type { NodeTypes } from "./lib/nodes";

export const NodeTypesContext = createContext<NodeTypes | null>(null);

export function useNodeTypes(): NodeTypes {
  const types = useContext(NodeTypesContext);
  if (!types) throw new Error("useNodeTypes outside NodeTypesContext (App provides it)");
  return types;
}
