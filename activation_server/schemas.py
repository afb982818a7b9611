"""Request and response schemas of the HTTP API (docs/api.md), in one module.

camelCase on the wire; requests also accept snake_case. Unknown fields are rejected (a typo in a
field name is an error naming it, not a silently ignored option). The UI's TypeScript types are
generated from the OpenAPI document these produce. Node type names come from the node types'
descriptions (`neuron_explainer.activations.describe`), never written out here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag
from pydantic.alias_generators import to_camel

from neuron_explainer.activations import describe, node_types
from neuron_explainer.activations.request import NODE_TYPES


def _api_names(keep: object = None) -> tuple[str, ...]:
    """The wire names of the node types (those whose description passes `keep`), in order."""
    descs = [describe(t) for t in node_types()]
    return tuple(dict.fromkeys(d.api_name for d in descs if keep is None or keep(d)))  # type: ignore[operator]


if TYPE_CHECKING:
    NodeTypeName = str
    TokenNodeTypeName = str
    RecordNodeType = str
else:
    NodeTypeName = Literal[_api_names()]
    # Node types with one node per token (every type but token pairs).
    TokenNodeTypeName = Literal[_api_names(lambda d: not d.per_token_pair)]
    # Per-token node types collated into datasets (/neuron_record).
    RecordNodeType = Literal[_api_names(lambda d: not d.per_token_pair and d.dataset_metric)]
DEFAULT_TABLE_NODE_TYPES = [describe(t).api_name for t in NODE_TYPES]
MetricName = Literal["activation", "write_magnitude", "direct_effect", "estimated_total_effect"]
LossFnName = Literal["logit_diff", "logit_minus_mean", "probs", "zero"]
AttentionTraceTypeName = Literal["query", "key", "query_and_key", "value"]
AutoencoderSideName = Literal["mlp", "attention"]
# Bounds of the request's numbers (docs/api.md "Limits"), so that a value out of any range is a 422
# naming its field, not an overflow deeper down (SQLite and torch take 64-bit integers at most).
# Indices (layers, tokens, components, token ids) are 32-bit: far beyond any model, and the library
# answers 400 or 404 for one the model or dataset does not have.
MAX_INDEX = 2**31 - 1


def _integral(value: object) -> object:
    """5.0 is the integer 5, as in JSON Schema (and JavaScript has no other way to write it); 5.5,
    `true` and "5" stay what they are, which strict validation refuses."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_integral)]
# (Bounds before the validator: after it, pydantic writes them as "ge"/"le", not JSON Schema's.)
Index = Annotated[int, Field(ge=0, le=MAX_INDEX), BeforeValidator(_integral)]
# An activation value set by an ablation, or a direction's coordinate: activations are O(1-100),
# and within this bound float32 (and bfloat16) arithmetic on them cannot overflow.
MAX_VALUE = 1e6
ActivationValue = Annotated[float, Field(ge=-MAX_VALUE, le=MAX_VALUE)]


def _text_or(other: str) -> Discriminator:
    """Text, or `other` (tagged with its type name): a value other than a string gets the errors
    of `other` only (`prompt[1]: ... less than or equal to ...`), not also `prompt: ... a valid
    string`. Error paths leave type names out (errors.field_path)."""
    return Discriminator(lambda value: "str" if isinstance(value, str) else other)


Text = Annotated[str, Field(min_length=1)]
# BOS before a text prompt; unset or null: the model's default (its tokenizer's own setting: Gemma
# yes, GPT-2 and SmolLM2 no; `bosByDefault` in /model_info). Token-id prompts are taken as given.
PrependBos = Annotated[
    bool | None,
    Field(
        description="put BOS before the prompt; null: the model's default (/model_info "
        "bosByDefault) for text, never for token ids"
    ),
]
TokenList = list[
    Annotated[Annotated[Text, Tag("str")] | Annotated[Index, Tag("int")], _text_or("int")]
]
Prompt = Annotated[
    Annotated[Text, Tag("str")]
    | Annotated[Annotated[list[Index], Field(min_length=1)], Tag("list[int]")],
    _text_or("list[int]"),
]


class Schema(BaseModel):
    """Requests: strict types (`true` or `"5"` is no integer, `"true"` no boolean; `5.0` is 5),
    finite numbers only (`NaN` and `Infinity` are rejected)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        serialize_by_alias=True,
        strict=True,
        allow_inf_nan=False,
    )


class ResponseSchema(Schema):
    """Responses ignore unknown fields when parsed (a client keeps working with a newer server).
    They hold finite numbers only: JSON has no NaN, and a non-finite value is an error (errors.py),
    never a `null` where the schema says number."""

    model_config = ConfigDict(extra="ignore", strict=False)


# ---- nodes -------------------------------------------------------------------------------------


class NodeIndexModel(Schema):
    """A node: (node type, layer, token, [attended-to token], component). An autoencoder latent
    is one of the latents of the autoencoder its layer holds on `autoencoderSide`."""

    node_type: NodeTypeName
    layer_index: Index = Field(0, description="0 for embeddings")
    token_index: Index
    component_index: Index = Field(0, description="neuron, head or latent index")
    attended_token_index: Index | None = Field(
        None, description="attention head pairs only: the key token"
    )
    autoencoder_side: AutoencoderSideName | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="autoencoder latents only: the layer's MLP-side (hook_mlp_out or "
        "mlp.hook_post) or attention-side (hook_attn_out) autoencoder. Always in responses; "
        "requests may leave it out when the layer holds one autoencoder only",
    )


class NodeAblationModel(Schema):
    node: NodeIndexModel
    value: ActivationValue = Field(
        0.0, description="the activation to set (0 removes the node's write)"
    )


class NodeToTraceModel(Schema):
    node: NodeIndexModel
    attention_trace_type: AttentionTraceTypeName | None = Field(
        None, description="required for attention heads: through query, key, both, or value"
    )


class ScoredTokenModel(ResponseSchema):
    token: int
    text: str
    score: float = Field(description="logit, or the node's contribution in token space")
    probability: float | None = None


class ScoredKeyTokenModel(ResponseSchema):
    key_token_index: int = Field(description="the key token's position in the prompt")
    token: int
    text: str
    score: float


class NodeTokenViewsModel(ResponseSchema):
    upvoted_output_tokens: list[ScoredTokenModel]
    downvoted_output_tokens: list[ScoredTokenModel]
    upvoting_input_tokens: list[ScoredTokenModel] = Field(
        description="neurons: input tokens that upvote the pre-activation; heads: query side"
    )
    downvoting_input_tokens: list[ScoredTokenModel]
    upvoting_key_tokens: list[ScoredTokenModel] = Field(description="heads only: the key side")
    downvoting_key_tokens: list[ScoredTokenModel]
    token_pair_attributions: list[ScoredKeyTokenModel] = Field(
        default_factory=list,
        description="attention-side latents only: the key tokens k the latent's input came from, "
        "(e_j · attn_out[q, k]) · 1[z_j > 0] with e_j its encoder direction, top k",
    )


# ---- /batched_tdb ------------------------------------------------------------------------------


class InferenceRequestSpec(Schema):
    """What one forward/backward row computes: the prompt, `D`, ablations and the trace."""

    prompt: Prompt = Field(description="text, or token ids")
    target_tokens: TokenList = Field(default_factory=list)
    distractor_tokens: TokenList = Field(default_factory=list)
    loss_fn: LossFnName = "logit_diff"
    node_ablations: list[NodeAblationModel] = Field(default_factory=list)
    upstream_node_to_trace: NodeToTraceModel | None = None
    downstream_node_to_trace: NodeToTraceModel | None = None
    prepend_bos: PrependBos = None


class TdbSubRequest(InferenceRequestSpec):
    component_type_for_mlp: Literal["neuron", "autoencoder_latent"] = Field(
        "neuron",
        description="autoencoder_latent: in layers holding an MLP-side autoencoder its latents "
        "replace the neurons in the node table; other layers keep their neurons",
    )
    component_type_for_attention: Literal["attention_head", "autoencoder_latent"] = Field(
        "attention_head",
        description="autoencoder_latent: in layers holding an attention-side autoencoder its "
        "latents replace the heads in the node table; other layers keep their heads",
    )
    top_and_bottom_k_for_node_table: Integer = Field(10, ge=0, le=1000)
    token_view_k: Integer = Field(10, ge=0, le=200)
    token_views: bool = Field(True, description="compute token-space views of the table's nodes")


class BatchedTdbRequest(Schema):
    sub_requests: list[TdbSubRequest] = Field(min_length=1, max_length=64)


class NodeRow(ResponseSchema):
    """One node of the table, every metric (null where the node is not in this prompt)."""

    node: NodeIndexModel
    activation: float | None = None
    write_magnitude: float | None = None
    direct_effect: float | None = None
    estimated_total_effect: float | None = None
    token_views: NodeTokenViewsModel | None = None
    explanation: str | None = Field(
        None,
        description="the best explanation of the node's component in the server's datasets of "
        "the loaded model (`tdb explain`), else null",
    )
    explanation_score: float | None = Field(None, description="its score (null: none or undefined)")


class TokenSums(ResponseSchema):
    """Per-token sums of each metric for one node type (token-effect heat maps)."""

    activation: list[float] | None = None
    write_magnitude: list[float] | None = None
    direct_effect: list[float] | None = None
    estimated_total_effect: list[float] | None = None


class TdbSubResponse(ResponseSchema):
    token_ids: list[int]
    token_strings: list[str]
    read_position: int = Field(description="the token where D is read")
    direction_value: float = Field(description="D: the loss, or the traced pre-activation")
    bias_direct_effect: float = Field(description="the part of D written by layer biases")
    trace_description: str | None = None
    node_table: list[NodeRow]
    token_sums: dict[str, TokenSums] = Field(
        description="keys: embedding, mlp_neuron, attention_head_attended_from, "
        "attention_head_attended_to, and with latents mlp_autoencoder_latent, "
        "attention_autoencoder_latent (neurons and heads of layers whose latents replace them "
        "are left out of their sums)"
    )
    top_output_tokens: list[ScoredTokenModel]
    bottom_output_tokens: list[ScoredTokenModel]
    target_tokens: list[ScoredTokenModel]
    distractor_tokens: list[ScoredTokenModel]


class BatchedTdbResponse(ResponseSchema):
    sub_responses: list[TdbSubResponse]
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")


# ---- /batched ----------------------------------------------------------------------------------


class DerivedScalarsSpec(Schema):
    """Every value of one derived scalar in one layer: [token][component], or for attention
    heads [component][query token][key token] (keys after the query are 0)."""

    spec_type: Literal["derived_scalars"]
    node_type: NodeTypeName
    autoencoder_side: AutoencoderSideName | None = Field(
        None, description="latents: which autoencoder of the layer (when it holds both)"
    )
    metric: MetricName = "activation"
    layer_index: Index = 0
    component_indices: list[Index] | None = Field(None, description="default: all components")


class TopKSpec(Schema):
    """The node table: top and bottom k per node type and metric, every metric per node."""

    spec_type: Literal["top_k"]
    node_types: list[NodeTypeName] = Field(
        DEFAULT_TABLE_NODE_TYPES,
        description="autoencoder_latent: the latents of every loaded autoencoder, replacing "
        "the neurons / heads of their layers",
    )
    metrics: list[MetricName] = [
        "activation",
        "write_magnitude",
        "direct_effect",
        "estimated_total_effect",
    ]
    k: Integer = Field(10, ge=0, le=1000)


class ScoredTokensSpec(Schema):
    """Token-space views (docs/engine.md §6) of the given nodes."""

    spec_type: Literal["scored_tokens"]
    nodes: list[NodeIndexModel] = Field(min_length=1, max_length=256)
    k: Integer = Field(10, ge=1, le=200)


class TokenPairAttributionSpec(Schema):
    """Per key token: Σ_h A[q,k,h]·(v[k,h] W_O[h])·direction, for a residual-space direction."""

    spec_type: Literal["token_pair_attribution"]
    layer_index: Index
    query_token_index: Index
    direction: list[ActivationValue] = Field(
        description="a d_model vector, e.g. a latent's encoder row"
    )


ProcessingSpec = Annotated[
    DerivedScalarsSpec | TopKSpec | ScoredTokensSpec | TokenPairAttributionSpec,
    Field(discriminator="spec_type"),
]


class BatchedSubRequest(Schema):
    inference_request_spec: InferenceRequestSpec
    processing_request_spec_by_name: dict[str, ProcessingSpec] = Field(min_length=1)


class BatchedRequest(Schema):
    sub_requests: list[BatchedSubRequest] = Field(min_length=1, max_length=64)


class ProcessingResult(ResponseSchema):
    spec_type: str
    values: list[float] | list[list[float]] | list[list[list[float]]] | None = None
    node_table: list[NodeRow] | None = None
    token_views: list[NodeTokenViewsModel] | None = None


class BatchedSubResponse(ResponseSchema):
    token_ids: list[int]
    token_strings: list[str]
    direction_value: float
    processing_results_by_name: dict[str, ProcessingResult]


class BatchedResponse(ResponseSchema):
    sub_responses: list[BatchedSubResponse]


# ---- single components -------------------------------------------------------------------------


class DerivedScalarsRequest(Schema):
    prompt: Prompt
    node_type: TokenNodeTypeName = "mlp_neuron"
    autoencoder_side: AutoencoderSideName | None = Field(
        None, description="latents: which autoencoder of the layer (when it holds both)"
    )
    layer_index: Index = 0
    component_index: Index = Field(0, description="neuron or latent index")
    metric: MetricName = "activation"
    target_tokens: TokenList = Field(default_factory=list)
    distractor_tokens: TokenList = Field(default_factory=list)
    normalize_by_dataset_max: bool = False
    dataset_name: str | None = None
    prepend_bos: PrependBos = None


class DerivedScalarsResponse(ResponseSchema):
    token_ids: list[int]
    token_strings: list[str]
    values: list[float] = Field(description="the metric at every token")
    normalized_values: list[float] | None = Field(
        None,
        description="values / the component's max activation in its dataset, clipped to "
        "[-1, 1] (the scale of its dataset's activation records)",
    )
    dataset_max: float | None = None


class DerivedAttentionScalarsRequest(Schema):
    prompt: Prompt
    layer_index: Index
    head_index: Index
    metric: MetricName = "activation"
    target_tokens: TokenList = Field(default_factory=list)
    distractor_tokens: TokenList = Field(default_factory=list)
    normalize_by_dataset_max: bool = False
    dataset_name: str | None = None
    prepend_bos: PrependBos = None


class DerivedAttentionScalarsResponse(ResponseSchema):
    token_ids: list[int]
    token_strings: list[str]
    values: list[list[float]] = Field(
        description="row q holds the pairs (q, k) for k = 0..q (the lower triangle)"
    )
    normalized_values: list[list[float]] | None = Field(
        None, description="values / the head's max activation in its dataset, clipped to [-1, 1]"
    )
    dataset_max: float | None = None
    total_in: list[float] = Field(description="per key token: Σ over queries")
    max_in: list[float]
    total_out: list[float] = Field(description="per query token: Σ over keys")
    max_out: list[float]


# ---- model, tokens, generation, health ---------------------------------------------------------


class AutoencoderInfo(ResponseSchema):
    """A sparse autoencoder the server loaded (`tdb serve --autoencoder`)."""

    name: str = Field(description="its hook point, which names it")
    hook_name: str = Field(
        description="where it reads and is spliced in, e.g. blocks.5.hook_mlp_out"
    )
    layer_index: int
    autoencoder_side: AutoencoderSideName = Field(
        description="mlp: its latents are MLP-side autoencoder_latent nodes; attention: attention-side"
    )
    n_latents: int
    d_in: int = Field(description="width of the hooked activation")
    activation: Literal["relu", "topk"]
    k: int | None = Field(None, description="TopK: latents kept per token")
    input_normalization: Literal["none", "layer_norm", "constant_norm_rescale"]
    format: str = Field(description="the file format it was read from: native, saelens, openai")
    source: str | None = Field(None, description="the path it was loaded from")


class MetricInfo(ResponseSchema):
    name: MetricName
    signed: bool = Field(description="takes negative values (tables rank a bottom k too)")
    ranked: bool = Field(description="false where every node has the same value")


class NodeTypeInfo(ResponseSchema):
    """A node type's description: what the UI shows and sends for it. One per node type the
    library knows (latents once per autoencoder side)."""

    name: str = Field(
        description="the library's name: the collated dataset family and the component pages' "
        "path, e.g. mlp_neuron, mlp_autoencoder_latent"
    )
    node_type: NodeTypeName = Field(description="`nodeType` of its nodes on the wire")
    autoencoder_side: AutoencoderSideName | None = Field(
        None, description="autoencoder latents: the side (with nodeType autoencoder_latent)"
    )
    label: str = Field(description="e.g. MLP neuron")
    short_name: str = Field(description="names a node: '{shortName} L5 #123'")
    key: str = Field(description="the URL-safe prefix of node keys, e.g. mlp-latent")
    writes: Literal["embedding", "attention", "mlp"] = Field(
        description="where its write enters the residual stream"
    )
    per_token_pair: bool = Field(description="one node per (query, key <= query) token pair")
    traceable: bool = Field(description="has a pre-activation that upstreamNodeToTrace can trace")
    replaces: str | None = Field(
        None, description="in layers holding these nodes they replace this node type in tables"
    )
    dataset_metric: MetricName | None = Field(
        None, description="the metric its collated datasets record (null: not collated)"
    )
    metrics: list[MetricInfo]
    layers: list[int] | None = Field(
        None, description="layers holding nodes of this type in the loaded model (null: no model)"
    )
    widths: list[int] | None = Field(None, description="components in each of `layers`")


class NodeTypesResponse(ResponseSchema):
    node_types: list[NodeTypeInfo]


class ModelInfo(ResponseSchema):
    name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    max_prompt_tokens: int
    device: str
    dtype: str
    node_types: list[str] = Field(
        description="the wire node types the model has nodes of (autoencoder_latent when "
        "autoencoders are loaded)"
    )
    node_type_descriptions: list[NodeTypeInfo] = Field(
        description="every node type, with where the model has its nodes"
    )
    autoencoders: list[AutoencoderInfo] = Field(default_factory=list)
    bos_token: str | None = None
    bos_by_default: bool = Field(
        False,
        description="whether requests whose prependBos is unset put BOS before a text prompt (the "
        "model's tokenizer asks for it: Gemma yes, GPT-2 and SmolLM2 no)",
    )


class TokenizeRequest(Schema):
    text: str = Field(max_length=1_000_000)
    prepend_bos: PrependBos = None


class TokenizeResponse(ResponseSchema):
    token_ids: list[int]
    token_strings: list[str]


class GenerateRequest(Schema):
    prompt: Prompt
    max_new_tokens: Integer = Field(20, ge=1, le=512)
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 = greedy")
    top_k: Annotated[int, Field(ge=1, le=MAX_INDEX), BeforeValidator(_integral)] | None = None
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: Annotated[int, Field(ge=0, le=2**64 - 1), BeforeValidator(_integral)] | None = Field(
        None, description="the sampler's seed (64 bits)"
    )
    node_ablations: list[NodeAblationModel] = Field(
        default_factory=list, description="ablations at prompt positions, kept on every step"
    )
    prepend_bos: PrependBos = None


class GenerateResponse(ResponseSchema):
    completion: str
    token_ids: list[int] = Field(description="the new tokens")
    token_strings: list[str]


class WorkerRequest(ResponseSchema):
    """A request the model worker holds: running, or queued behind the running ones."""

    endpoint: str = Field(description="e.g. /batched_tdb")
    request_id: str = Field(description="its x-request-id")
    sub_requests: int
    queued_at: str = Field(description="when it was queued (ISO 8601, UTC)")
    started_at: str | None = Field(description="when it started running; null while queued")
    seconds_waiting: float = Field(description="in the queue")
    seconds_running: float | None = Field(description="null while queued")
    abandoned: bool = Field(
        description="its client went away or its deadline passed: it is being dropped or stopped"
    )


class HealthResponse(ResponseSchema):
    status: Literal["ok"] = "ok"
    model_loaded: bool
    model_name: str | None
    queued_requests: int = Field(description="requests waiting for the model (not running yet)")
    running: list[WorkerRequest] = Field(
        default_factory=list,
        description="what the model computes now: one request, or several merged debugger requests",
    )
    queue: list[WorkerRequest] = Field(default_factory=list, description="in the order they run")
    batches_run: int = Field(0, description="engine passes run so far")
    requests_merged: int = Field(
        0, description="debugger requests that shared an engine pass with others"
    )
    requests_cancelled: int = Field(
        0, description="requests whose client disconnected first: dropped from the queue or stopped"
    )
    requests_timed_out: int = Field(
        0, description="requests past --request-timeout: answered 504, dropped or stopped"
    )
    runs_stopped: int = Field(
        0, description="model runs stopped early because no request waited for them any more"
    )


# ---- collated datasets (read endpoints) and background jobs ----------------------------------------


class DatasetInfoModel(ResponseSchema):
    name: str = Field(description="what `datasetName` in record requests refers to")
    kind: Literal["store", "tdb"] = Field(description="a native SQLite store or a TDB JSON layout")
    location: str = Field(description="file path, folder or URL")
    families: list[str] = Field(description="component families it holds records for")
    available: bool = Field(description="false while a store is still to be written")
    model_name: str | None = None
    n_tokens: int | None = Field(default=None, description="tokens collated so far")
    status: Literal["in_progress", "complete"] | None = None
    layers: list[int] | None = None
    window_length: int | None = None
    corpus: str | None = None
    updated_at: str | None = None


class DatasetsMetadataResponse(ResponseSchema):
    datasets: list[DatasetInfoModel]


class NeuronRecordRequest(Schema):
    dataset_name: str | None = Field(
        None, description="name or location (default: the first dataset holding the family)"
    )
    node_type: RecordNodeType = "mlp_neuron"
    autoencoder_side: AutoencoderSideName | None = Field(
        None,
        description="autoencoder latents: the MLP-side or attention-side autoencoder's latent "
        "(may be left out when the datasets hold latents of one side only for this layer)",
    )
    layer_index: Index
    component_index: Index = Field(description="neuron (or latent) index")


class AttentionHeadRecordRequest(Schema):
    dataset_name: str | None = None
    layer_index: Index
    head_index: Index


class ActivationRecordModel(ResponseSchema):
    tokens: list[str]
    activations: list[float]
    normalized_activations: list[float] = Field(
        description="activations / the dataset max, clipped to [-1, 1]"
    )
    window_index: int | None = Field(None, description="the excerpt's window in the corpus")


class TokenSummariesModel(ResponseSchema):
    total_in: list[float] = Field(description="per token as the key: Σ over the queries reading it")
    max_in: list[float]
    total_out: list[float] = Field(description="per token as the query: Σ over the keys it reads")
    max_out: list[float]


class PairActivationRecordModel(ActivationRecordModel):
    """A head's excerpt: activations per pair (q, k <= q), row by row over the lower triangle."""

    summaries: TokenSummariesModel
    normalized_summaries: TokenSummariesModel = Field(
        description="max summaries / the dataset max; totals / the largest total in this response"
    )


class RecordStatistics(ResponseSchema):
    max_activation: float | None
    mean: float | None
    variance: float | None
    skewness: float | None
    kurtosis: float | None
    fraction_active: float | None = None
    dead: bool | None = None
    quantile_boundaries: list[float] | None = None


class NeuronRecordResponse(RecordStatistics):
    dataset: DatasetInfoModel
    node_type: str
    autoencoder_side: AutoencoderSideName | None = Field(
        None, exclude_if=lambda v: v is None, description="autoencoder latents only"
    )
    layer_index: int
    component_index: int
    explanation: ExplanationModel | None = Field(
        None, description="the best-scoring explanation the dataset holds (null: none)"
    )
    most_positive_activation_records: list[ActivationRecordModel]
    random_sample: list[ActivationRecordModel]
    random_sample_by_quantile: list[list[ActivationRecordModel]] | None = None


class AttentionHeadRecordResponse(RecordStatistics):
    dataset: DatasetInfoModel
    layer_index: int
    head_index: int
    explanation: ExplanationModel | None = Field(
        None, description="the best-scoring explanation the dataset holds (null: none)"
    )
    most_positive_activation_records: list[PairActivationRecordModel]
    random_sample: list[PairActivationRecordModel]
    random_sample_by_quantile: list[list[PairActivationRecordModel]] | None = None


class JobModel(ResponseSchema):
    id: str
    kind: Literal["collate", "explain"] = Field(
        description="the tdb command it runs: collate (the default store) or explain (its "
        "components, with the no-LLM baseline)"
    )
    description: str
    status: Literal["queued", "running", "done", "failed", "stopped"]
    output: str = Field(description="what the job writes (a store path)")
    unit: Literal["tokens", "components"] = Field(
        "tokens", description="what tokens, totalTokens and tokensPerSecond count"
    )
    tokens: int = Field(description="units (see unit) processed so far")
    total_tokens: int | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    started_at: str | None = None
    finished_at: str | None = None
    message: str | None = Field(None, description="why it failed or stopped")
    log: list[str] = Field(description="the last lines of its log")


class JobsResponse(ResponseSchema):
    jobs: list[JobModel]


class ErrorResponse(ResponseSchema):
    message: str = Field(description="what went wrong, naming the field")
    detail: object | None = None
    request_id: str


# ---- explanations (TDB's route names) -----------------------------------------------------------

if TYPE_CHECKING:
    ExplainedNodeType = str
else:
    # Node types whose components are collated (neurons, heads, latents) and so can be explained.
    ExplainedNodeType = Literal[_api_names(lambda d: d.dataset_metric)]


class ExplanationMethodModel(ResponseSchema):
    explainer: str = Field(description="'baseline' or 'llm'")
    simulator: str = Field(description="'baseline' or 'all_at_once'")
    model: str = Field(description="the LLM's name; '' for the baseline")
    prompt_version: str


class ScoredExcerptModel(ResponseSchema):
    """A held-out excerpt an explanation was scored on: the component's true activations and the
    simulator's predictions at the same positions."""

    tokens: list[str]
    activations: list[float] = Field(
        description="the true activations: one per token (attention heads: one per token pair "
        "(q, k <= q), row by row over the lower triangle, as in the records)"
    )
    simulated_activations: list[float] = Field(
        description="the simulator's predictions at the same positions, on its own scale "
        "(the baseline's: 0-10 per listed item, summed)"
    )
    group: Literal["top", "random"] | None = Field(
        description="a held-out top-activating excerpt or a random one"
    )


class ExplanationModel(ResponseSchema):
    """One explanation of a component and its scores on held-out excerpts (datasets.md,
    "Explanations"). Scores are null where undefined."""

    explanation: str | None = Field(description="null when this method failed for the component")
    score: float | None = Field(
        description="the headline score: rocAucScore for heads, else the correlation"
    )
    ev_correlation_score: float | None
    rsquared_score: float | None
    absolute_dev_explained_score: float | None
    roc_auc_score: float | None = Field(description="attention heads only")
    n_scored_excerpts: int
    method: ExplanationMethodModel
    error: str | None = Field(None, description="why this method failed, else null")
    dataset_name: str
    scored_excerpts: list[ScoredExcerptModel] | None = Field(
        None,
        description="/explain and /score only: the excerpts scored (held-out top ones, then "
        "random ones) with true and simulated activations; null for stored explanations (a "
        "store keeps scores, not simulations)",
    )


class ExplanationNodeRequest(Schema):
    """A collated component: an MLP neuron, attention head or autoencoder latent."""

    dataset_name: str | None = Field(
        None, description="name or location (default: the first dataset holding the family)"
    )
    node_type: ExplainedNodeType = "mlp_neuron"
    autoencoder_side: AutoencoderSideName | None = None
    layer_index: Index
    component_index: Index = Field(description="neuron, head or latent index")


class ExistingExplanationsRequest(ExplanationNodeRequest):
    pass


class ExistingExplanationsResponse(ResponseSchema):
    explanations: list[ExplanationModel] = Field(description="best score first; failed ones last")


class ExplainRequest(ExplanationNodeRequest):
    pass


class ExplainResponse(ResponseSchema):
    explanations: list[ExplanationModel] = Field(description="the baseline's explanation, scored")
    dataset: DatasetInfoModel


class ScoreRequest(ExplanationNodeRequest):
    explanation: Text = Field(description="an explanation to score (in the baseline's form)")


class ScoreResponse(ResponseSchema):
    score: float | None
    explanation: ExplanationModel
    dataset: DatasetInfoModel


# ---- OpenAI-compatible endpoints (/v1/...) -----------------------------------------------------
# OpenAI's field names (snake_case) and shapes, so that OpenAI's clients and other tools work;
# unknown fields are rejected here too, and every option OpenAI has that this server lacks is
# either accepted at its neutral value (n = 1, stream = false, penalties 0) or absent (a 422).


class OpenAISchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class OpenAIResponse(OpenAISchema):
    model_config = ConfigDict(extra="ignore", strict=False)


MaxNewTokens = Annotated[int, Field(ge=0, le=512), BeforeValidator(_integral)]
TopLogprobs = Annotated[int, Field(ge=0, le=20), BeforeValidator(_integral)]
Seed = Annotated[int, Field(ge=0, le=2**64 - 1), BeforeValidator(_integral)]


class OpenAIOptions(OpenAISchema):
    """Options both completion endpoints take."""

    model: str = Field(description="the served model's name (GET /v1/models)")
    max_tokens: MaxNewTokens | None = Field(None, description="new tokens at most (default 16)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = Field(1, description="one choice per request")
    stream: Literal[False] = Field(False, description="no streaming")
    stop: str | list[str] | None = Field(None, description="stop sequences (excluded)")
    seed: Seed | None = None
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0
    user: str | None = None


class ChatMessage(OpenAISchema):
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatCompletionRequest(OpenAIOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxNewTokens | None = Field(None, description="= max_tokens")
    logprobs: bool = Field(False, description="log-probabilities of the new tokens")
    top_logprobs: TopLogprobs | None = Field(None, description="alternatives per token (0-20)")


class CompletionRequest(OpenAIOptions):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0, le=MAX_INDEX)]], Field(min_length=1)]
    ) = Field(description="text (special tokens allowed) or token ids")
    logprobs: TopLogprobs | None = Field(
        None, description="log-probabilities of each token and this many alternatives (0-20)"
    )
    echo: bool = Field(False, description="the prompt too: its text and its tokens' logprobs")


class ModelCard(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(OpenAIResponse):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(OpenAIResponse):
    content: list[ChatTokenLogprob]


class AssistantMessage(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(OpenAIResponse):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(OpenAIResponse):
    """Per token (the prompt's first when echoed has no logprob: null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(OpenAIResponse):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class TextCompletion(OpenAIResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
