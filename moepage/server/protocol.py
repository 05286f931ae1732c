"""OpenAI wire format as pydantic models (requests validated here; responses built from them)."""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

Finite = Annotated[float, Field(allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class Permissive(BaseModel):
    """Clients send fields we do not use (user, store, metadata, ...): accept and ignore them."""

    model_config = ConfigDict(extra="allow")


# ---- requests -------------------------------------------------------------------------------------
class ContentPart(Permissive):
    type: StrictStr
    text: Optional[StrictStr] = None


class FunctionCall(Permissive):
    name: StrictStr
    arguments: Union[StrictStr, dict[str, Any]] = "{}"


class ToolCall(Permissive):
    id: Optional[StrictStr] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Permissive):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[ContentPart], None] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[StrictStr] = None
    reasoning_content: Optional[StrictStr] = None


class FunctionDefinition(Permissive):
    name: StrictStr = Field(min_length=1, max_length=256)
    description: Optional[StrictStr] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[StrictBool] = None


class Tool(Permissive):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoiceFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(Permissive):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class StreamOptions(Permissive):
    include_usage: Optional[StrictBool] = False


class JsonSchemaFormat(Permissive):
    name: Optional[StrictStr] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(Permissive):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class SamplingFields(Permissive):
    """Fields shared by chat and completions (OpenAI's plus vLLM-style top_k, min_p, repetition_penalty)."""

    model: Optional[StrictStr] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]] = None
    top_p: Optional[Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] = None
    top_k: Optional[Annotated[StrictInt, Field(ge=-1, le=1_000_000)]] = None
    min_p: Optional[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = None
    presence_penalty: Optional[Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]] = None
    frequency_penalty: Optional[Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]] = None
    seed: Optional[Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]] = None
    stop: Union[StrictStr, list[StrictStr], None] = None  # count and lengths checked with the settings' limits
    stop_token_ids: Optional[Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=64)]] = None
    ignore_eos: Optional[StrictBool] = False
    n: Optional[Annotated[StrictInt, Field(ge=1, le=128)]] = 1
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[StrictStr, Bias]] = None
    user: Optional[StrictStr] = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v):
        for key in v or {}:
            if not (key.isascii() and key.lstrip("-").isdigit()):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


MaxTokens = Optional[Annotated[StrictInt, Field(ge=1)]]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[Annotated[StrictInt, Field(ge=0, le=20)]] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[StrictBool] = None
    response_format: Optional[ResponseFormat] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None


class CompletionRequest(SamplingFields):
    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)],
                  Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)],
                  Annotated[list[Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]],
                            Field(min_length=1)]]
    suffix: Optional[StrictStr] = None
    max_tokens: Optional[Annotated[StrictInt, Field(ge=1)]] = 16
    echo: Optional[StrictBool] = False
    logprobs: Optional[Annotated[StrictInt, Field(ge=0, le=20)]] = None
    best_of: Optional[Annotated[StrictInt, Field(ge=1, le=128)]] = None


class TokenizeRequest(Permissive):
    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1)]] = None
    add_special_tokens: Optional[StrictBool] = True
    add_generation_prompt: Optional[StrictBool] = True
    tools: Optional[list[Tool]] = None


class DetokenizeRequest(Permissive):
    model: Optional[StrictStr] = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


# ---- responses ------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose state came from the prompt cache


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[ResponseToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moepage"
    max_model_len: Optional[int] = None  # vLLM's name for the served context
    context_length: Optional[int] = None  # OpenRouter's and LM Studio's
    meta: Optional[dict] = None  # llama-server's: n_ctx, n_ctx_train, n_vocab, n_embd


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
