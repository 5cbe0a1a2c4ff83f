"""The request side of the endpoint: which model or LoRA adapter, which session, which prompts, and
whether the request fits the server's limits and the model's context.

Text rule (OpenAI's, and vLLM's server's): the text of a choice that a stop string ended does not
contain the stop string. The engine API keeps it (``Completion.text`` ends where the stop string
ends, see :mod:`skyrl_backends.sampling`); :meth:`ServingState.text_of` is where the endpoint
drops it. Token ids are never cut: the token that completed the stop string is the last one.
"""

from __future__ import annotations

import time
from typing import Any

from skyrl_backends.http.engine_info import context_length, engine_states
from skyrl_backends.http.errors import APIError
from skyrl_backends.http.metrics import ServerMetrics
from skyrl_backends.http.settings import HTTPSettings, limit_hint
from skyrl_backends.http.text import TextCodec
from skyrl_backends.sampling import SamplingParams
from skyrl_backends.types import Completion, GenerateOutput, GenerateRequest

SESSION_HEADER = "x-session-id"  # as prime-rl sends it


class ServingState:
    def __init__(self, client: Any, tokenizer: Any, model_name: str, settings: HTTPSettings) -> None:
        self.client = client
        self.codec = TextCodec(tokenizer)
        self.model_name = model_name
        self.settings = settings
        self.created = int(time.time())
        self.max_model_len = context_length(client, settings.max_model_len)
        self.metrics = ServerMetrics(client)

    # -- model and adapters ----------------------------------------------------------------------
    async def lora_adapters(self) -> dict[str, str]:
        """Adapters loaded on the engines (name -> path), as ``/v1/models`` lists them."""
        adapters: dict[str, str] = {}
        for state in (await engine_states(self.client)).values():
            adapters.update(state.get("lora_adapters") or {})
        return adapters

    async def lora_for(self, name: str) -> str | None:
        """None for the base model, the adapter's name for a loaded LoRA adapter; 404 otherwise."""
        if name == self.model_name:
            return None
        adapters = await self.lora_adapters()
        if name in adapters:
            return name
        served = ", ".join([self.model_name, *sorted(adapters)])
        raise APIError(404, f"The model `{name}` does not exist. Served: {served}.", param="model",
                       code="model_not_found")

    # -- routing ---------------------------------------------------------------------------------
    @staticmethod
    def session_of(body: Any, headers: Any) -> str | None:
        """The session that routes this request: the ``session_id`` field, else the X-Session-ID
        header, else OpenAI's ``user`` field."""
        header = headers.get(SESSION_HEADER)
        for candidate in (body.session_id, header, body.user):
            if candidate:
                return str(candidate)
        return None

    # -- limits ----------------------------------------------------------------------------------
    def check_batch(self, num_prompts: int, n: int) -> None:
        s = self.settings
        if num_prompts > s.max_prompts_per_request:
            raise APIError(400, f"{num_prompts} prompts in one request is over "
                                f"{limit_hint('max_prompts_per_request', s)}. Send fewer prompts per request.",
                           param="prompt", code="too_many_prompts")
        if n > s.max_n:
            raise APIError(400, f"n={n} is over {limit_hint('max_n', s)}.", param="n")
        if num_prompts * n > s.max_sequences_per_request:
            raise APIError(400, f"{num_prompts} prompts x n={n} = {num_prompts * n} sequences is over "
                                f"{limit_hint('max_sequences_per_request', s)}.", param="n")

    def generation_length(self, prompts: list[list[int]], max_tokens: int | None, param: str,
                          prompt_param: str) -> int | None:
        """``max_tokens`` checked against the context (prompt + max_tokens), or, when it is None,
        the room the longest prompt leaves (vLLM's default); None when the context is unknown."""
        limit = self.max_model_len
        if limit is None:
            return max_tokens
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, and the prompt has "
                                f"{longest} tokens, leaving none to generate. Shorten the prompt.",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            return limit - longest
        if longest + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                                f"completion). Reduce the prompt or {param}.",
                           param=param, code="context_length_exceeded")
        return max_tokens

    # -- generation ------------------------------------------------------------------------------
    async def generate(self, prompts: list[list[int]], fields: dict[str, Any], session_id: str | None,
                       lora_name: str | None) -> GenerateOutput:
        params = SamplingParams.from_dict(fields)
        request = GenerateRequest(prompt_token_ids=prompts, sampling_params=params,
                                  session_ids=[session_id] * len(prompts) if session_id else None,
                                  lora_name=lora_name)
        return await self.client.generate(request)

    def text_of(self, completion: Completion) -> str:
        """The choice's text by OpenAI's rule: without the stop string that ended it."""
        text = completion.text if completion.text is not None else self.codec.decode(completion.token_ids)
        stop = completion.stop_reason
        if completion.finish_reason == "stop" and isinstance(stop, str) and stop and text.endswith(stop):
            text = text[: len(text) - len(stop)]
        return text
