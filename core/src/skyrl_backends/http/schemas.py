"""Request bodies of the OpenAI-compatible endpoints (pydantic).

OpenAI's fields, plus the extensions vLLM's server also accepts (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``return_token_ids``,
``return_tokens_as_token_ids``, ``add_generation_prompt``, ``continue_final_message``,
``chat_template_kwargs``) and our own: ``session_id``, which routes every request of a session to
the same engine, and, on chat, ``prompt_token_ids``, a prompt given as token ids instead of
messages. Unknown fields are rejected with a 400 naming them (as OpenAI does), never silently
ignored; so are OpenAI features the engines do not implement (penalties, ``logit_bias``,
``suffix``, forced tool choice...), with the reason. Limits that depend on the server's settings
(``n``, prompts per request, context length) are checked by the app.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from skyrl_backends.http.errors import APIError

MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it (content as one string)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # Extensions (as in vLLM's server).
    session_id: str | None = Field(default=None, max_length=512)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        values = [value] if isinstance(value, str) else value
        if len(values) > 16:
            raise ValueError("at most 16 stop sequences")
        return values

    @model_validator(mode="after")
    def _unsupported(self) -> _Sampling:
        if self.presence_penalty or self.frequency_penalty:
            name = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise APIError(400, f"{name} is not supported by these engines; use repetition_penalty instead.",
                           param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by these engines.", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true.", param="stream_options")
        return self

    def sampling_fields(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        """Canonical sampling parameters (validated again, and named, by SamplingParams)."""
        fields: dict[str, Any] = {"n": self.n}
        if max_tokens is not None:
            fields["max_generate_length"] = max_tokens
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                             ("top_k", "top_k"), ("min_p", "min_p"), ("repetition_penalty", "repetition_penalty"),
                             ("min_new_tokens", "min_tokens"), ("ignore_eos", "ignore_eos")):
            value = getattr(self, theirs)
            if value is not None:
                fields[ours] = value
        if self.stop:
            fields["stop"] = self.stop
        if self.stop_token_ids:
            fields["stop_token_ids"] = self.stop_token_ids
        if logprobs is not None:
            fields["logprobs"] = logprobs
        return fields


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Extensions: vLLM's template options, and a prompt given as token ids (no template applied).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    prompt_token_ids: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
        if not self.messages and self.prompt_token_ids is None:
            raise APIError(400, "messages must not be empty (or give the prompt as prompt_token_ids).",
                           param="messages")
        if self.messages and self.prompt_token_ids is not None:
            raise APIError(400, "give either messages or prompt_token_ids, not both (send messages=[] with "
                                "prompt_token_ids).", param="prompt_token_ids")
        if self.tool_choice not in (None, "auto", "none"):
            raise APIError(400, "tool_choice 'required' or a named function needs constrained decoding, which "
                                "these engines do not do; use 'auto' or 'none'.", param="tool_choice")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt=false.",
                           param="continue_final_message")
        return self

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template sees (none with ``tool_choice="none"``)."""
        return None if self.tool_choice == "none" else self.tools

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported.", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of must equal n (ranking by log-probability is not implemented).",
                           param="best_of")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (no prompt log-probabilities).",
                           param="echo")
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "prompt must not be empty.", param="prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]
