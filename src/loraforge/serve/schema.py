"""OpenAI request bodies, with OpenAI's field names, validated strictly by type.

Unknown keys are accepted and ignored: OpenAI clients send fields this server has no use
for (`user`, `logit_bias`, `parallel_tool_calls`, …), and refusing them would break those
clients. Known keys are checked strictly — `"max_tokens": "16"` or `"temperature": "hot"`
is a 400 naming the field, never a silent coercion. Known features this server does not
implement (`n` > 1, `best_of`, `echo`, `suffix`) are refused with a 400 rather than
quietly answered differently than asked; `response_format` is held by a grammar and
`logprobs` computed from the logits (llama.cpp engine), or refused (the HF engine), never
ignored.

Tools: `tools` (functions), `tool_choice` ("auto", "none", "required" or a named
function) and the messages of a tool conversation (assistant `tool_calls`, role `tool`).
What each tool_choice holds is in serve/app.py (`ToolPlan`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from loraforge.errors import LoraforgeError
from loraforge.serve.sampling import SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends JSON text; a mapping is taken too


class ToolCallPart(_Body):
    type: Literal["function"] = "function"
    id: str | None = None
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallPart] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this is the result of

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        return self

    def as_dict(self) -> dict:
        # "developer" is OpenAI's newer name for the system role (o1 and later); chat
        # templates know only "system"
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "id": c.id, "function": c.function.model_dump()}
                                 for c in self.tool_calls]
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "response"
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None  # None: any JSON object
    strict: bool | None = None  # the answer always follows the schema here: it is a grammar


class ResponseFormat(_Body):
    """OpenAI's structured output, held by a llama.cpp grammar: the sampler can only draw
    tokens that keep the answer a prefix of valid JSON (of the schema), as llama-server does."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    _grammar: str | None = PrivateAttr(None)  # GBNF; None for free text

    @model_validator(mode="after")
    def _to_grammar(self):
        # converted while validating, so a schema the converter cannot take is a 400 naming it
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required when type is 'json_schema' ({'name': …, 'schema': {…}})")
        if self.type == "json_object" or (self.type == "json_schema" and self.json_schema.schema_ is None):
            self._grammar = json_object_grammar()
        elif self.type == "json_schema":
            self._grammar = json_schema_grammar(self.json_schema.schema_)
        return self

    def grammar(self) -> str | None:
        return self._grammar


class FunctionDef(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class _Generation(_Body):
    model: str
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # llama.cpp extension, 0 = off
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0  # llama.cpp extension
    typical_p: Annotated[float, Field(gt=0, le=1)] = 1.0  # llama.cpp extension
    repeat_penalty: Annotated[float, Field(gt=0)] = 1.0  # llama.cpp extension
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stops

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError("n: only n=1 is supported (send several requests; they are batched together)")
        return self

    def logprob_count(self) -> int | None:
        """None: no logprobs asked for; N: each token's and the N likeliest at its place."""
        raise NotImplementedError

    def sampling(self, max_tokens: int | None, stop: tuple[str, ...] = (),
                 stop_tokens: frozenset[int] = frozenset()) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, typical_p=self.typical_p, repeat_penalty=self.repeat_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty, seed=self.seed,
            stop=tuple(dict.fromkeys([*(self.stop or ()), *stop])), stop_tokens=stop_tokens, ignore_eos=self.ignore_eos,
            grammar=self.response_format.grammar() if self.response_format else None,
            logprobs=self.logprob_count())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Generation):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None  # the newer name of max_tokens
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # OpenAI's limit

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only with logprobs: true")
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _tool_choice(self):
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise ValueError("tool_choice: a function is asked for but no tools are given")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [tool.function.name for tool in self.tools]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice: function '{self.tool_choice.function.name}' is not among the "
                                 f"tools ({', '.join(names)})")
        return self

    def message_dicts(self) -> list[dict]:
        return [m.as_dict() for m in self.messages]

    def tool_dicts(self) -> list[dict] | None:
        """The tools as the chat template gets them (OpenAI's {"type": "function", "function": …})."""
        return [tool.model_dump(exclude_none=True, by_alias=True) for tool in self.tools] if self.tools else None

    def forced_function(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None


class CompletionRequest(_Generation):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(gt=0)] | None = 16  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None  # the legacy API's: N likeliest, at most 5

    def logprob_count(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _single(self):
        if self.echo or self.suffix or (self.best_of or 1) != 1:
            raise ValueError("echo, suffix and best_of are not supported by this server")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit


class EmbeddingRequest(_Body):
    model: str
    # text, texts, or token ids (one list, or a list of lists) as OpenAI takes them
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(gt=0)] | None = None

    @field_validator("input")
    @classmethod
    def _some_input(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("an empty list: send a string, a list of strings or a list of token ids")
        if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"{len(value)} inputs; at most {MAX_EMBEDDING_INPUTS} in one request")
        texts = [value] if isinstance(value, str) else value
        empty = next((i for i, item in enumerate(texts) if item in ("", [])), None)
        if empty is not None:
            raise ValueError(f"the input at index {empty} is empty: send some text (or token ids) to embed")
        return value

    def inputs(self) -> list[str | list[int]]:
        """Each input on its own: a text or a list of token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [self.input]
        return list(self.input)


def json_object_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def json_schema_grammar(schema: dict) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises whatever it meets (KeyError, ValueError, …)
        raise ValueError(f"json_schema.schema: cannot be turned into a grammar: {type(exc).__name__}: {exc}") from None


ROUTES = (("/v1/chat/completions", ChatCompletionRequest, "chat completion (streamed with stream: true)"),
          ("/v1/completions", CompletionRequest, "text completion (streamed with stream: true)"),
          ("/v1/embeddings", EmbeddingRequest, "embeddings (GGUF models)"))


def openapi_schema(version: str) -> dict:
    """The API as an OpenAPI 3.1 document, built from the request models above (the handlers
    read raw bodies, so FastAPI cannot see them): served at /openapi.json, and what the fault
    suite fuzzes."""
    from pydantic.json_schema import models_json_schema

    refs, components = models_json_schema([(model, "validation") for _, model, _ in ROUTES],
                                          ref_template="#/components/schemas/{model}")
    errors = {str(code): {"description": what, "content": {"application/json": {"schema": {"type": "object"}}}}
              for code, what in ((400, "invalid request (the message names the field)"),
                                 (401, "missing or wrong API key"), (404, "no such model on this server"))}
    paths = {path: {"post": {"summary": summary, "operationId": path.strip("/").replace("/", "_"),
                             "requestBody": {"required": True, "content": {"application/json": {
                                 "schema": refs[(model, "validation")]}}},
                             "responses": {"200": {"description": "the answer (JSON, or server-sent events when "
                                                                  "stream is true)"}, **errors}}}
             for path, model, summary in ROUTES}
    paths["/v1/models"] = {"get": {"summary": "the served model names", "operationId": "v1_models",
                                   "responses": {"200": {"description": "list of models"}, "401": errors["401"]}}}
    paths["/health"] = {"get": {"summary": "liveness and queue state", "operationId": "health",
                                "responses": {"200": {"description": "ok"}}}}
    return {"openapi": "3.1.0", "info": {"title": "loraforge", "version": version}, "paths": paths,
            "components": {"schemas": components.get("$defs", {})}}


def parse_body(model: type[_Body], raw: bytes) -> _Body:
    """Validate a JSON request body; any problem is a LoraforgeError naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise LoraforgeError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:5]:
        if error["type"] == "json_invalid":
            return f"the request body is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}"
        if error["type"] == "model_type" and not error["loc"]:
            return "the request body must be a JSON object"
        where = ".".join(str(p) for p in error["loc"] if not _is_union_tag(p))
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "invalid request: " + "; ".join(dict.fromkeys(problems))


def _is_union_tag(part) -> bool:
    # pydantic puts the union member it tried into the path ("stop.str"); people want "stop"
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list[str]", "list[TextPart]",
                                               "list[int]", "list[list[int]]")
                                      or part.startswith(("function-", "constrained-")))
