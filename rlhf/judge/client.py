"""Chat-completions requests to any OpenAI-compatible API, with every answer cached durably as it arrives.

The `openai` client does the HTTP, `tenacity` the retries (exponential backoff with jitter, Retry-After
honoured), `tqdm` the progress bar. What is written here is only what those libraries do not do for us:
the persistent answer cache (see cache.py), a shared requests-per-minute limiter, a budget that reserves a
request's worst-case cost before sending it, and the Batch API's submit/poll/collect cycle resumable by id.

The API key is read from the environment variable named in the config and is passed to the client only; it
is never part of a request, a cache row, a log line or an error message (errors are scrubbed of it).
"""
from __future__ import annotations

import email.utils
import json
import os
import random
import re
import sys
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential
from tqdm.auto import tqdm

from rlhf.errors import ConfigError, RewardError
from rlhf.judge.cache import Answer, AnswerCache, request_key

MESSAGE_OVERHEAD_TOKENS = 8  # chat framing per message; generous


def model_price(jcfg: dict) -> dict:
    """{input, output} USD per 1M tokens of the judge model; a ConfigError naming the field when unpriced."""
    if jcfg["model"] not in jcfg["prices"]:
        raise ConfigError(f"gold.judge.prices has no entry for model {jcfg['model']!r}: add "
                          f"gold.judge.prices.{jcfg['model']}: {{input: X, output: Y}} (USD per 1M tokens; "
                          "0 for a self-hosted server)")
    return jcfg["prices"][jcfg["model"]]


def usd(price: dict, prompt_tokens: float, completion_tokens: float) -> float:
    return (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1e6


class MalformedResponse(Exception):
    """A 200 whose body is not a chat completion (retried like a 5xx: nothing usable was delivered)."""


class BudgetExhausted(RewardError):
    pass


class RateLimiter:
    """At most `rpm` request starts per minute, spaced evenly, shared by all worker threads."""

    def __init__(self, rpm: float):
        self.interval, self._next, self._lock = 60.0 / rpm, 0.0, threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class Budget:
    """Spend recorded in the cache plus worst-case reservations of requests in flight never exceeds the limit."""

    def __init__(self, limit: float | None, spent: float):
        self.limit, self.spent, self.paid, self._lock = limit, spent, spent, threading.Lock()

    def reserve(self, usd: float) -> bool:
        with self._lock:
            if self.limit is not None and self.spent + usd > self.limit:
                return False
            self.spent += usd
            return True

    def settle(self, reserved: float, actual: float) -> None:
        with self._lock:
            self.spent += actual - reserved
            self.paid += actual


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _retryable(exc: BaseException) -> bool:
    import openai  # loaded by ChatClient already; here to keep the module's import light (the config check)
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, MalformedResponse, json.JSONDecodeError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


class ChatClient:
    """Sends chat-completion requests (dicts: model, messages, max_tokens, temperature) and returns the answers.

    `answers(requests)` returns the answer text of every request, from the cache where it was answered before.
    """

    def __init__(self, jcfg: dict, cache_path: str | Path, echo=print):
        import openai  # heavy (httpx, pydantic): only a stage that asks a judge loads it
        self.cfg, self.echo = jcfg, echo
        self.price = model_price(jcfg)
        env = jcfg["api_key_env"]
        self._key = os.environ.get(env)
        if not self._key:
            if jcfg["base_url"] is None:
                raise ConfigError(f"gold.type openai: set the environment variable {env} to your API key "
                                  "(keys are never read from configs)")
            self._key = "EMPTY"  # self-hosted OpenAI-compatible servers (vLLM) usually need none
        self.client = openai.OpenAI(api_key=self._key, base_url=jcfg["base_url"], timeout=jcfg["timeout"],
                                    max_retries=0)  # tenacity retries, so every attempt is seen and rate limited
        self.cache = AnswerCache(cache_path)
        self.limiter = RateLimiter(jcfg["requests_per_minute"])
        self._expo = wait_random_exponential(multiplier=0.5, max=jcfg["max_backoff"])

    # --- requests, prices -------------------------------------------------------------------------------
    def request(self, messages: list[dict]) -> dict:
        c = self.cfg
        return {"model": c["model"], "messages": messages, "max_tokens": c["max_tokens"], "temperature": c["temperature"]}

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        return usd(self.price, prompt_tokens, completion_tokens) * (self.cfg["batch_discount"] if batch else 1.0)

    def worst_case_cost(self, request: dict, batch: bool = False) -> float:
        """An upper bound: a byte-level BPE token covers at least one UTF-8 byte."""
        prompt = sum(len(m["content"].encode()) + MESSAGE_OVERHEAD_TOKENS for m in request["messages"])
        return self.cost(prompt, request["max_tokens"], batch)

    def _scrub(self, text: str) -> str:
        text = text.replace(self._key, "<redacted>") if self._key and self._key != "EMPTY" else text
        return re.sub(r"sk-[A-Za-z0-9_*\-]{6,}", "sk-<redacted>", text)

    def _answer(self, completion: dict, request: dict, batch: bool) -> Answer:
        """Answer from a chat-completion body (dict); MalformedResponse when it is not one."""
        try:
            content = completion["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise MalformedResponse(f"no choices[0].message in the response: {str(completion)[:200]}") from None
        usage = completion.get("usage") or {}
        if "prompt_tokens" in usage and "completion_tokens" in usage:
            p, t = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
            cost = self.cost(p, t, batch)
        else:  # the answer was paid for; without usage, book the worst case rather than nothing
            p, t, cost = -1, -1, self.worst_case_cost(request, batch)
        return Answer(content or "", p, t, cost)

    # --- retries ----------------------------------------------------------------------------------------
    def _wait(self, state) -> float:
        after = _retry_after(state.outcome.exception())
        if after is not None:  # honour the server's Retry-After, plus a little jitter so workers spread out
            return min(after, self.cfg["max_backoff"]) + random.uniform(0, 0.1 * after + 0.01)
        return self._expo(state)

    def _retrying(self) -> Retrying:
        return Retrying(retry=retry_if_exception(_retryable), wait=self._wait,
                        stop=stop_after_attempt(self.cfg["max_attempts"]), reraise=True)

    def _call(self, fn, *args, **kwargs):
        """fn with retries; a final failure becomes one RewardError line (with the key scrubbed)."""
        try:
            for attempt in self._retrying():
                with attempt:
                    self.limiter.acquire()
                    return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported as one line; the traceback is not actionable
            status = getattr(e, "status_code", None)
            what = f"HTTP {status}" if status else type(e).__name__
            hint = ("check the key in $" + self.cfg["api_key_env"]) if status in (401, 403) else \
                "answered requests are cached; rerun to resume"
            raise RewardError(self._scrub(f"judge API ({self.cfg['base_url'] or 'api.openai.com'}): {what} after "
                                          f"{self.cfg['max_attempts']} attempt(s) at most: {e} ({hint})")) from None

    def _send(self, request: dict) -> Answer:
        def once():
            raw = self.client.chat.completions.with_raw_response.create(**request)
            return self._answer(json.loads(raw.text), request, batch=False)
        return self._call(once)

    # --- the public call --------------------------------------------------------------------------------
    def answers(self, requests: list[dict], desc: str = "judge") -> list[str]:
        keys = [request_key(r) for r in requests]
        unique = dict(zip(keys, requests))
        self._known = unique  # lets a resumed batch be collected without downloading its input file
        todo = {k: r for k, r in unique.items() if k not in self.cache.get_many(unique)}
        if self.cfg["batch_api"] and (todo or self.cache.open_batches()):  # a killed run's batches are collected
            self._batch(todo, desc)
        elif todo:
            self._online(todo, desc)
        done = self.cache.get_many(unique)
        missing = len(unique) - len(done)
        if missing:
            raise RewardError(f"judge: {missing} of {len(unique)} requests have no answer (see the messages above); "
                              f"answered ones are cached in {self.cache.path}; rerun to resume")
        return [done[k].content for k in keys]

    def _bar(self, total: int, desc: str, budget: Budget):
        bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, mininterval=1.0)
        bar.set_postfix_str(f"spent ${budget.paid:.4f}")
        return bar

    def _budget_stop(self, budget: Budget, answered: int, total: int) -> BudgetExhausted:
        return BudgetExhausted(
            f"judge: gold.judge.budget_usd ${self.cfg['budget_usd']:.2f} reached (${budget.spent:.4f} spent or "
            f"reserved); stopped cleanly after {answered} of {total} new requests. Answers are cached in "
            f"{self.cache.path}: raise the budget and rerun to resume")

    def _online(self, todo: dict[str, dict], desc: str) -> None:
        budget = Budget(self.cfg["budget_usd"], self.cache.spent())
        stop, lock = threading.Event(), threading.Lock()
        bar, answered = self._bar(len(todo), desc, budget), [0]

        def one(key: str, request: dict) -> None:
            if stop.is_set():
                return
            worst = self.worst_case_cost(request)
            if not budget.reserve(worst):
                stop.set()
                return
            try:
                answer = self._send(request)
            except BaseException:
                budget.settle(worst, 0.0)
                raise
            self.cache.put(key, request, answer)  # committed before anything else happens
            budget.settle(worst, answer.cost_usd)
            with lock:
                answered[0] += 1
                bar.update()
                bar.set_postfix_str(f"spent ${budget.paid:.4f}")

        with ThreadPoolExecutor(self.cfg["concurrency"]) as pool:
            futures = [pool.submit(one, k, r) for k, r in todo.items()]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failure = next((f.exception() for f in finished if f.exception() is not None), None)
            if failure is not None:
                stop.set()
                for f in futures:
                    f.cancel()
        bar.close()
        if failure is not None:
            raise failure
        if stop.is_set():
            raise self._budget_stop(budget, answered[0], len(todo))

    # --- Batch API --------------------------------------------------------------------------------------
    def _batch(self, todo: dict[str, dict], desc: str) -> None:
        """Submit uncached requests as batches, recorded before creation; poll and collect; resume by id."""
        for submission, batch_id, _ in self.cache.open_batches():  # a previous run's batches first
            self._collect(submission, batch_id or self._find_batch(submission), desc)
        done = self.cache.get_many(todo)
        todo = {k: r for k, r in todo.items() if k not in done}
        budget = Budget(self.cfg["budget_usd"], self.cache.spent())
        failed, submitted = self.cache.failed_batches(), 0
        for chunk in self._batch_chunks(list(todo.items())):
            if frozenset(k for k, _ in chunk) in failed:  # the same batch again would fail the same way
                batch_id, reason = failed[frozenset(k for k, _ in chunk)]
                raise RewardError(f"judge: batch {batch_id} of these {len(chunk)} requests failed ({reason}); "
                                  "resubmitted unchanged it would fail again: lower gold.judge.batch_max_tokens or "
                                  "batch_max_requests (or set batch_api: false), then rerun")
            reserved = sum(self.worst_case_cost(r, batch=True) for _, r in chunk)
            if not budget.reserve(reserved):
                raise self._budget_stop(budget, submitted, len(todo))
            submitted += len(chunk)
            submission = uuid.uuid4().hex
            self.cache.add_submission(submission, [k for k, _ in chunk], reserved)
            lines = "\n".join(json.dumps({"custom_id": k, "method": "POST", "url": "/v1/chat/completions", "body": r})
                              for k, r in chunk)
            upload = self._call(self.client.files.create, file=("rlhf-judge-batch.jsonl", lines.encode()),
                                purpose="batch")
            batch = self.client.batches.create(  # not retried blindly: a lost reply is found by metadata on rerun
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                metadata={"rlhf_submission": submission})
            self.cache.set_batch(submission, batch.id, "open")
            self.echo(f"judge: submitted batch {batch.id} ({len(chunk)} requests); a rerun resumes it by id")
        for submission, batch_id, _ in self.cache.open_batches():
            self._collect(submission, batch_id, desc)

    def _batch_chunks(self, items: list[tuple[str, dict]]):
        """Consecutive batches of at most batch_max_requests requests and batch_max_tokens prompt tokens (bounded by
        the prompts' UTF-8 bytes): the API refuses a batch above the organization's enqueued-token limit."""
        chunk, tokens = [], 0
        for key, request in items:
            size = sum(len(m["content"].encode()) + MESSAGE_OVERHEAD_TOKENS for m in request["messages"])
            if chunk and (len(chunk) == self.cfg["batch_max_requests"] or tokens + size > self.cfg["batch_max_tokens"]):
                yield chunk
                chunk, tokens = [], 0
            chunk.append((key, request))
            tokens += size
        if chunk:
            yield chunk

    def _find_batch(self, submission: str) -> str | None:
        for batch in self._call(self.client.batches.list, limit=100):
            if (batch.metadata or {}).get("rlhf_submission") == submission:
                return batch.id
        return None

    def _collect(self, submission: str, batch_id: str | None, desc: str) -> None:
        if batch_id is None:  # recorded but never created: its requests are simply submitted again
            self.cache.set_batch(submission, None, "failed")
            return
        self.cache.set_batch(submission, batch_id, "open")
        bar = tqdm(desc=f"{desc} batch {batch_id}", unit="req", file=sys.stderr)
        while True:
            batch = self._call(self.client.batches.retrieve, batch_id)
            counts = batch.request_counts
            if counts is not None:
                bar.total = counts.total
                bar.n = counts.completed + counts.failed
                bar.refresh()
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                break
            time.sleep(self.cfg["batch_poll_seconds"])
        bar.close()
        requests, downloaded = dict(getattr(self, "_known", {})), False
        if batch.output_file_id:
            text = self._call(self.client.files.content, batch.output_file_id).text
            for line in filter(None, text.splitlines()):
                row = json.loads(line)
                response = row.get("response") or {}
                if response.get("status_code") != 200:
                    continue
                key = row["custom_id"]
                if key not in requests and not downloaded:  # submitted for other requests (another stage)
                    downloaded = True
                    requests.update({request_key(r): r for r in self._batch_requests(batch.input_file_id)})
                if key in requests:
                    try:
                        answer = self._answer(response["body"], requests[key], batch=True)
                    except MalformedResponse:
                        continue
                    self.cache.put(key, requests[key], answer, via=f"batch:{batch_id}")
        errors = getattr(getattr(batch, "errors", None), "data", None) or []
        reason = "; ".join(str(getattr(e, "message", e)) for e in errors) or (
            batch.status if batch.status != "completed" and not batch.output_file_id else None)
        self.cache.set_batch(submission, batch_id, "collected" if batch.status == "completed" else "failed", reason)
        self.echo(f"judge: batch {batch_id} {batch.status}" + (f": {reason}" if reason else ""))

    def _batch_requests(self, input_file_id: str) -> list[dict]:
        text = self._call(self.client.files.content, input_file_id).text
        return [json.loads(line)["body"] for line in filter(None, text.splitlines())]

    def close(self) -> None:
        self.cache.close()
        self.client.close()
