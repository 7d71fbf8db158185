"""The LLM gateway: structured output over the openai SDK, memoized and metered.

Every request is identified by a digest of what decides its answer (model, messages, output
schema). An answered request is recorded in the ledger with its tokens and cost before the
answer is used, so a retry of the stage finds it there and never pays for it again. The SDK's
own retries are off: every try is the engine's, visible as an attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

import openai
from django.conf import settings
from django.utils import timezone
from openai.lib import type_to_response_format_param
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, ValidationError

from pipeline.core import store, tracing
from pipeline.core.errors import OutputInvalid, PermanentError, TransientError
from pipeline.core.policy import http_status_is_transient, retry_after_seconds
from pipeline.llm import prices
from pipeline.llm.budgets import spend_allowed
from pipeline.llm.policies import model_for_stage

if TYPE_CHECKING:
    from pipeline.core.context import StageContext

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
OFFLINE_MODEL = "offline-engine"


def request_digest(model: str, messages: Sequence[Mapping[str, Any]], response_format: Any) -> str:
    canonical = json.dumps(
        {"model": model, "messages": messages, "response_format": response_format},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def llm_enabled() -> bool:
    """Whether a real model is configured; without a key the offline engine answers."""
    return bool(settings.OPENAI_API_KEY)


@lru_cache(maxsize=4)
def _client(api_key: str, base_url: str | None, timeout_seconds: float) -> openai.OpenAI:
    return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_seconds)


def classify_openai_error(exc: openai.OpenAIError) -> TransientError | PermanentError:
    """Map the SDK's exceptions to the engine's: transient ones retry, permanent ones stop."""
    if isinstance(exc, openai.APITimeoutError):
        return TransientError("the LLM provider did not answer in time", code="llm_timeout")
    if isinstance(exc, openai.APIConnectionError):
        return TransientError("could not reach the LLM provider", code="llm_connection")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code = f"llm_http_{status}"
        if http_status_is_transient(status):
            retry_after = retry_after_seconds(exc.response.headers.get("retry-after"))
            return TransientError(
                f"the LLM provider answered HTTP {status}; will retry",
                code=code,
                retry_after_seconds=retry_after,
            )
        if status in (401, 403):
            return PermanentError(
                f"the LLM provider refused our credentials (HTTP {status}); "
                "check OPENAI_API_KEY and the key's access to LLM_MODEL",
                code=code,
            )
        return PermanentError(
            f"the LLM provider rejected the request ({_rejection(exc)}); "
            "check LLM_MODEL and OPENAI_BASE_URL",
            code=code,
        )
    return PermanentError(f"unexpected LLM client error: {exc}", code="llm_error")


def _rejection(exc: openai.APIStatusError) -> str:
    """The HTTP status, and the error's type and code when they are names. Not its message:
    a provider naming a value it refused quotes our request, a piece of a transcript."""
    names = [str(name) for name in (exc.type, exc.code) if name]
    kept = [name for name in names if name.isascii() and name.isidentifier()]
    return ", ".join([f"HTTP {exc.status_code}", *kept])


# A run whose input names a model under this key asks that one instead of LLM_MODEL (a re-run
# under another model: `run_rerun_from(input_changes={MODEL_INPUT: ...})`).
MODEL_INPUT = "llm_model"


class LLMGateway:
    """Structured calls bound to one attempt: memo lookups, budget, ledger."""

    def __init__(self, ctx: StageContext) -> None:
        self._ctx = ctx

    @property
    def model(self) -> str:
        """The model this stage asks: the run's own, if its input names one, else its
        policy's default or LLM_MODEL; refused if not allowed or not priced."""
        claim = self._ctx.claim
        return model_for_stage(
            workflow=claim.workflow,
            stage=claim.stage_name,
            asked=self._ctx.input.get(MODEL_INPUT) or None,
            on=timezone.now().date(),
        )

    def complete(
        self,
        *,
        messages: list[ChatCompletionMessageParam],
        output_type: type[T],
        offline: Callable[[], T],
        check: Callable[[T], None] | None = None,
        review: Callable[[T], str | None] | None = None,
    ) -> T:
        """Ask for an `output_type`; validate it (schema, then `check`); ask for a repair.

        Each attempt may send one repair request beyond those earlier attempts already sent: a
        first attempt repairs once, and a retry of a stage that failed with `output_invalid`
        goes on from the last recorded answer instead of failing again on the memoized ones.
        No answered request is ever sent again, because every repair carries the answers
        before it and so is a new request.

        `offline` builds the answer without a model when none is configured. `check` raises
        ValueError for an answer that parses but is wrong (e.g. cites unknown evidence): it is
        never accepted. `review` names doubts worth one repair request but not a failure (e.g.
        a value its evidence does not show): a valid answer is accepted once a repair has been
        asked for them, and the caller flags what is still doubtful."""
        if not llm_enabled():
            return self._offline(output_type, offline, messages)
        model = self.model
        # The SDK's structured-output schema, as `chat.completions.parse` would send it; the
        # call itself is `create`, so that an answer is kept raw, valid or not, for the memo
        # and the repair request.
        response_format = type_to_response_format_param(output_type)
        repairs_allowed = self._ctx.attempt_number
        accepted: T | None = None  # the last valid answer, doubts and all
        for repairs in range(repairs_allowed + 1):
            content = self._call(model, messages, response_format)
            problem = _problem(content, output_type, check)
            if problem is None:
                accepted = output_type.model_validate_json(content)
                problem = review(accepted) if review is not None and repairs == 0 else None
                if problem is None:
                    return accepted
            if repairs == repairs_allowed:
                break
            messages = [
                *messages,
                {"role": "assistant", "content": content},
                {
                    "role": "user",
                    "content": "Your answer was not valid: "
                    f"{problem}. Answer again with only JSON that satisfies the schema.",
                },
            ]
        if accepted is not None:
            return accepted
        raise OutputInvalid(
            f"the model's {output_type.__name__} was still invalid after {repairs_allowed} "
            f"repair request(s): {problem}; retry the stage to ask for one more repair"
        )

    def _offline(
        self,
        output_type: type[T],
        offline: Callable[[], T],
        messages: list[ChatCompletionMessageParam],
    ) -> T:
        digest = request_digest(OFFLINE_MODEL, messages, output_type.__name__)
        found = store.llm_call_find(self._ctx.claim, digest=digest)
        if found is not None:
            return output_type.model_validate_json(found.content)
        result = offline()
        recorded = store.llm_call_record(
            self._ctx.claim,
            digest=digest,
            model=OFFLINE_MODEL,
            content=result.model_dump_json(),
            input_tokens=0,
            output_tokens=0,
            cost_usd=prices.cost_usd(
                OFFLINE_MODEL, timezone.now().date(), input_tokens=0, output_tokens=0
            ),
            duration_ms=0,
        )
        return output_type.model_validate_json(recorded)

    def _call(
        self, model: str, messages: list[ChatCompletionMessageParam], response_format: Any
    ) -> str:
        """One request, sent only if no earlier attempt of this stage got its answer; traced
        (`pipeline.core.tracing`) whether it is sent or found in the memo."""
        claim = self._ctx.claim
        digest = request_digest(model, messages, response_format)
        max_tokens = int(settings.LLM_MAX_OUTPUT_TOKENS)
        with tracing.llm_span(model, max_tokens=max_tokens) as span:
            found = store.llm_call_find(claim, digest=digest)
            if found is not None:
                logger.info(
                    "run %s %s: reused an answered LLM call", claim.run_id, claim.stage_name
                )
                self._ctx.usage.saved_input_tokens += found.input_tokens
                self._ctx.usage.saved_output_tokens += found.output_tokens
                self._ctx.usage.saved_cost_usd += found.cost_usd
                span.reused(
                    input_tokens=found.input_tokens,
                    output_tokens=found.output_tokens,
                    cost_usd=found.cost_usd,
                )
                return found.content
            self._ctx.heartbeat()
            spend_allowed(subject=claim.subject)
            client = _client(
                settings.OPENAI_API_KEY,
                settings.OPENAI_BASE_URL,
                settings.LLM_REQUEST_TIMEOUT_SECONDS,
            )
            started = time.monotonic()
            try:
                completion = client.chat.completions.create(
                    model=model,
                    messages=messages,
                    response_format=response_format,
                    max_tokens=max_tokens,
                )
            except openai.OpenAIError as exc:
                raise classify_openai_error(exc) from exc
            duration_ms = int((time.monotonic() - started) * 1000)
            usage = completion.usage
            input_tokens = usage.prompt_tokens if usage else 0
            output_tokens = usage.completion_tokens if usage else 0
            content = (completion.choices[0].message.content or "") if completion.choices else ""
            cost_usd = prices.cost_usd(
                model, timezone.now().date(), input_tokens=input_tokens, output_tokens=output_tokens
            )
            span.answered(
                response_model=completion.model,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_usd=cost_usd,
                finish_reasons=[c.finish_reason for c in completion.choices if c.finish_reason],
            )
            # Another attempt may have been answered first: go on with the answer it recorded.
            return store.llm_call_record(
                claim,
                digest=digest,
                model=model,
                content=content,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_usd=cost_usd,
                duration_ms=duration_ms,
            )


def _problem(content: str, output_type: type[T], check: Callable[[T], None] | None) -> str | None:
    """What is wrong with an answer, in words a model (and an admin) can act on; None if ok."""
    try:
        parsed = output_type.model_validate_json(content)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'answer'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        return f"it does not match the {output_type.__name__} schema ({details})"
    if check is not None:
        try:
            check(parsed)
        except ValueError as exc:
            return str(exc)
    return None
