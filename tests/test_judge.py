"""The GPT-4.1-nano judge against a real local HTTP server speaking the OpenAI protocol, with injected faults.

Checked: parsing with an explicit unparseable outcome, retries on 429 (Retry-After honoured) / 500 / timeouts /
malformed bodies, the durable cache (resume without re-sending), the budget cap, the RPM limit, the Batch API
(submit, poll, resume by id, find a batch whose id was never recorded), the key never leaking, and the label
and evaluate stages running with `gold: openai` on the miniature.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rlhf.config import load_config
from rlhf.registry import stage_config
from rlhf.errors import ConfigError, RewardError
from rlhf.io import read_json, read_jsonl
from rlhf.judge import prompt as jp
from rlhf.judge.cache import Answer, AnswerCache
from rlhf.judge.client import BudgetExhausted, ChatClient
from rlhf.rewards.gold import JudgeGold, make_gold
from tests.conftest import REPO, StageProcess, write_config
from tests.fake_openai import FakeOpenAI

KEY = "sk-test-DO-NOT-LEAK-0123456789"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def judge_cfg(tmp_path, url, **judge):
    base = {"base_url": url, "timeout": 1.0, "max_backoff": 2.0, "concurrency": 4, "requests_per_minute": 6000}
    cfg = load_config(write_config(tmp_path, gold={"type": "openai", "judge": {**base, **judge}}))
    return stage_config(cfg, "label")  # what the label stage gets: its view, the experiment's judge cache filled in


def pairs(n):
    prompts = [f"instruction number {i}: say something" for i in range(n)]
    return prompts, ["x" * (i % 7 + 1) for i in range(n)], ["y" * (8 - i % 7) for i in range(n)]  # never a tie


def expected_prefer(a, b):
    return np.array([1.0 if len(x) >= len(y) else 0.0 for x, y in zip(a, b)])


# --- the prompt --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("Output (a)", "a"), ("output (B).", "b"), ("Output(b)", "b"), ("(a)", "a"), ("b", "b"), (" A. ", "a"),
    ("Output (a) is better than Output (b)", None), ("I find both equally good.", None), ("", None), (None, None),
    ("Both are bad", None)])
def test_parse_names_exactly_one_output_or_none(text, want):
    assert jp.parse(text) == want


def test_order_coin_is_deterministic_and_fair():
    coins = [jp.swapped(0, f"p{i}", "x", "y") for i in range(2000)]
    assert coins == [jp.swapped(0, f"p{i}", "x", "y") for i in range(2000)]
    assert 0.45 < np.mean(coins) < 0.55
    assert coins != [jp.swapped(1, f"p{i}", "x", "y") for i in range(2000)]


# --- the client against faults -----------------------------------------------------------------------------

def bucket_fault(key, attempt):
    """One request in ten per kind; each transient fault only on the first attempt."""
    kind = {0: "429", 1: "500", 2: "timeout", 3: "badjson", 4: "slow", 5: "malformed"}.get(int(key[:8], 16) % 10)
    return kind if kind in ("malformed",) or attempt == 1 else None


def test_faults_are_retried_and_each_request_answered_once(tmp_path):
    prompts, a, b = pairs(60)
    with FakeOpenAI(fault=bucket_fault, retry_after=0.3, timeout_sleep=1.5) as server:
        gold = make_gold(judge_cfg(tmp_path, server.url))
        assert isinstance(gold, JudgeGold)
        prefer = gold.prefer(prompts, a, b, np.random.default_rng(0))
        seen = {k: [f for _, f in v] for k, v in server.attempts.items()}
        kinds = {f for fs in seen.values() for f in fs}
        assert {"429", "500", "timeout", "badjson", "slow", "malformed"} <= kinds  # every fault was exercised
        assert server.duplicates() == {}
        assert len(server.answered) == 60
        for key, attempts in server.attempts.items():  # Retry-After honoured before the second try
            if attempts[0][1] == "429":
                assert attempts[1][0] - attempts[0][0] >= 0.3
        malformed = [k for k, fs in seen.items() if fs[0] == "malformed"]
    # unparseable answers are NaN, never a default; everything else matches the server's verdict
    assert np.isnan(prefer).sum() == len(malformed) > 0
    ok = ~np.isnan(prefer)
    np.testing.assert_array_equal(prefer[ok], expected_prefer(a, b)[ok])


def test_rerun_is_served_from_the_cache_without_sending(tmp_path):
    prompts, a, b = pairs(20)
    with FakeOpenAI() as server:
        cfg = judge_cfg(tmp_path, server.url)
        first = make_gold(cfg).prefer(prompts, a, b, None)
        sent = sum(len(v) for v in server.attempts.values())
        again = make_gold(cfg).prefer(prompts, a, b, None)  # a new process would read the same sqlite file
        assert sum(len(v) for v in server.attempts.values()) == sent == 20
    np.testing.assert_array_equal(first, again)


def test_budget_stops_cleanly_before_exceeding_and_resumes(tmp_path):
    prompts, a, b = pairs(40)
    with FakeOpenAI() as server:
        cfg = judge_cfg(tmp_path, server.url, concurrency=2)
        client = make_gold(cfg).client
        per_request = client.worst_case_cost(client.request(jp.messages(prompts[0], a[0], b[0])))
        cfg["gold"]["judge"]["budget_usd"] = 5.5 * per_request
        with pytest.raises(BudgetExhausted, match="raise the budget and rerun"):
            make_gold(cfg).prefer(prompts, a, b, None)
        rows = AnswerCache(tmp_path / "results" / "micro" / "judge_cache").answers()
        n, spent = len(rows), sum(r["cost_usd"] for r in rows)
        assert 5 <= n < 40 and spent <= cfg["gold"]["judge"]["budget_usd"]
        cfg["gold"]["judge"]["budget_usd"] = 1.0
        prefer = make_gold(cfg).prefer(prompts, a, b, None)
        assert server.duplicates() == {} and len(server.answered) == 40
    np.testing.assert_array_equal(prefer, expected_prefer(a, b))


def test_requests_per_minute_is_a_ceiling(tmp_path, monkeypatch):
    from rlhf.judge.client import RateLimiter
    released, acquire = [], RateLimiter.acquire

    def recorded(self):
        acquire(self)
        released.append(time.monotonic())
    monkeypatch.setattr(RateLimiter, "acquire", recorded)
    prompts, a, b = pairs(13)
    with FakeOpenAI() as server:
        gold = make_gold(judge_cfg(tmp_path, server.url, requests_per_minute=1200, concurrency=8))
        gold.prefer(prompts, a, b, None)
        assert len(server.answered) == 13
    # 20 per second, evenly spaced (not bursts), across the 8 worker threads: the k-th release is at least
    # k intervals after the first (sleep never ends early; the first may wake late, hence the slack).
    # Arrival times at the server are not checked: a request delayed in transit bunches with the next one.
    released = sorted(released)
    assert len(released) == 13
    assert all(t - released[0] >= k * 0.05 - 0.02 for k, t in enumerate(released))


def test_both_orders_average_and_disagreement_is_a_tie(tmp_path):
    prompts = ["p1", "p2", "p3"]
    cand, ref = ["good", "bad", "first"], ["bad", "good", "second"]

    def decide(instruction, x, y):  # p3: a position-biased judge always answers (a)
        if instruction == "p3":
            return "a"
        return "a" if x == "good" else "b"
    with FakeOpenAI(decide=decide) as server:
        gold = make_gold(judge_cfg(tmp_path, server.url, both_orders=True))
        assert gold.judge(prompts, cand, ref).tolist() == [1.0, 0.0, 0.5]
        assert len(server.answered) == 6


def test_key_stays_out_of_errors_cache_and_output(tmp_path, capfd):
    prompts, a, b = pairs(3)

    class Unauthorized(FakeOpenAI):
        def _chat(self, handler, body):
            handler._json(401, {"error": {"message": f"Incorrect API key provided: {KEY}", "code": "invalid_api_key"}})
    with Unauthorized() as server:
        with pytest.raises(RewardError) as err:
            make_gold(judge_cfg(tmp_path, server.url)).prefer(prompts, a, b, None)
    assert "HTTP 401" in str(err.value) and "OPENAI_API_KEY" in str(err.value)
    assert KEY not in str(err.value) and "sk-test" not in str(err.value)
    with FakeOpenAI() as server:
        make_gold(judge_cfg(tmp_path, server.url)).prefer(prompts, a, b, None)
        assert server.auth_headers == {f"Bearer {KEY}"}  # the key did reach the server, as a header only
    out, errtext = capfd.readouterr()
    assert KEY not in out + errtext
    for path in (tmp_path / "results").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_missing_key_and_unpriced_model_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = stage_config(load_config(write_config(tmp_path, gold={"type": "openai"})), "label")
    with pytest.raises(ConfigError, match="set the environment variable OPENAI_API_KEY"):
        make_gold(cfg)
    cfg = judge_cfg(tmp_path, "http://127.0.0.1:9/v1", model="my-open-judge")
    with pytest.raises(ConfigError, match="gold.judge.prices has no entry for model 'my-open-judge'"):
        make_gold(cfg)


# --- Batch API ---------------------------------------------------------------------------------------------

def test_batch_api_submits_polls_and_resumes_by_id(tmp_path, monkeypatch):
    prompts, a, b = pairs(25)
    with FakeOpenAI(polls_to_complete=3) as server:
        cfg = judge_cfg(tmp_path, server.url, batch_api=True, batch_poll_seconds=0.01, batch_max_requests=10)

        def killed(self, *args):
            raise KeyboardInterrupt  # the job dies while it waits for its batches
        monkeypatch.setattr(ChatClient, "_collect", killed)
        with pytest.raises(KeyboardInterrupt):
            make_gold(cfg).prefer(prompts, a, b, None)
        assert server.batches_created == 3  # 25 requests in batches of at most 10
        monkeypatch.undo()
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        prefer = make_gold(cfg).prefer(prompts, a, b, None)
        assert server.batches_created == 3 and server.duplicates() == {}
        rows = AnswerCache(tmp_path / "results" / "micro" / "judge_cache").answers()
        vias, costs = {r["via"] for r in rows}, sum(r["cost_usd"] for r in rows)
    np.testing.assert_array_equal(prefer, expected_prefer(a, b))
    assert len(vias) == 3 and all(v.startswith("batch:") for v in vias)
    client = make_gold(cfg).client
    full = sum(client.cost(len(jp.messages(p, x, y)[1]["content"]) // 4 + 20, 3)
               for p, x, y in zip(prompts, a, b))
    assert costs == pytest.approx(0.5 * full, rel=1e-6)  # the Batch API discount is booked


def test_batch_whose_id_was_never_recorded_is_found_by_metadata(tmp_path, monkeypatch):
    prompts, a, b = pairs(8)
    with FakeOpenAI(polls_to_complete=1) as server:
        cfg = judge_cfg(tmp_path, server.url, batch_api=True, batch_poll_seconds=0.01)
        real = AnswerCache.set_batch

        def die_before_recording(self, submission, batch_id, state):
            if state == "open":
                raise KeyboardInterrupt  # killed between batches.create and writing its id down
            return real(self, submission, batch_id, state)
        monkeypatch.setattr(AnswerCache, "set_batch", die_before_recording)
        with pytest.raises(KeyboardInterrupt):
            make_gold(cfg).prefer(prompts, a, b, None)
        monkeypatch.setattr(AnswerCache, "set_batch", real)
        prefer = make_gold(cfg).prefer(prompts, a, b, None)
        assert server.batches_created == 1 and server.duplicates() == {}
    np.testing.assert_array_equal(prefer, expected_prefer(a, b))


def test_batches_fit_the_token_limit_and_a_failed_batch_is_not_resubmitted_unchanged(tmp_path):
    """Batches are cut by prompt tokens (batch_max_tokens) as well as by requests; a batch the API fails as a whole
    (here: over the enqueued-token limit) is not sent again as it was: the rerun says why and what to change."""
    prompts, a, b = pairs(12)
    with FakeOpenAI(polls_to_complete=1, batch_token_limit=2000) as server:
        cfg = judge_cfg(tmp_path, server.url, batch_api=True, batch_poll_seconds=0.01)
        with pytest.raises(RewardError, match="12 of 12 requests have no answer"):
            make_gold(cfg).prefer(prompts, a, b, None)
        assert server.batches_created == 1
        with pytest.raises(RewardError, match=r"failed \(Enqueued token limit reached for gpt-4.1-nano\); "
                                              "resubmitted unchanged it would fail again: lower gold.judge.batch_max_"):
            make_gold(cfg).prefer(prompts, a, b, None)
        assert server.batches_created == 1
        cfg["gold"]["judge"]["batch_max_tokens"] = 2000
        prefer = make_gold(cfg).prefer(prompts, a, b, None)
        sizes = [v["_tokens"] for v in server.batches.values() if v["status"] == "completed"]
        assert len(sizes) == server.batches_created - 1 > 1 and max(sizes) <= 2000
    np.testing.assert_array_equal(prefer, expected_prefer(a, b))


# --- stages with gold: openai on the miniature -------------------------------------------------------------

def true_reward_judge():
    from rlhf.data.miniature import MiniatureSpec, true_reward
    spec = MiniatureSpec.from_config(load_config(REPO / "config" / "micro.yaml"))
    return lambda instruction, x, y: "a" if true_reward(instruction, x, spec) >= true_reward(instruction, y, spec) else "b"


def openai_micro(tmp_path, micro_run, url, **judge):
    """The micro config with gold: openai, reusing the micro run's samples, SFT and RM."""
    _, results = micro_run
    target = tmp_path / "results" / "micro"
    for name in ("data", "pairs", "sft", "rm"):
        shutil.copytree(results / name, target / name)
    (target / "pairs" / "labels.jsonl").unlink()
    judge = {"base_url": url, "timeout": 2.0, "max_backoff": 1.0, "concurrency": 4, **judge}
    return write_config(tmp_path, gold={"type": "openai", "judge": judge})


def run_stage(stage, config, *extra):
    """The stage in its own process (killed, resumed), its log beside the config."""
    return StageProcess([stage, "--config", str(config), *extra], config.parent, env={"OPENAI_API_KEY": KEY})


@pytest.mark.slow
def test_label_stage_killed_and_resumed_labels_every_pair_once(tmp_path, micro_run):
    with FakeOpenAI(decide=true_reward_judge(), delay=0.05, fault=bucket_fault, timeout_sleep=2.5) as server:
        config = openai_micro(tmp_path, micro_run, server.url)
        cache = tmp_path / "results" / "micro" / "judge_cache"
        samples = read_jsonl(tmp_path / "results" / "micro" / "pairs" / "samples.jsonl")
        proc = run_stage("label", config)
        deadline = time.monotonic() + 60
        answered_before_kill = 0
        while time.monotonic() < deadline:  # SIGKILL once about a third of the pairs are answered
            if cache.exists():
                answered_before_kill = len(AnswerCache(cache).answers())
            if answered_before_kill >= len(samples) // 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        persisted = {r["answer"] for r in AnswerCache(cache).answers()}
        assert 0 < len(persisted) < len(samples)
        assert not (tmp_path / "results" / "micro" / "pairs" / "labels.jsonl").exists()  # nothing half-written
        out, _ = run_stage("label", config).communicate(timeout=120)
        assert "pairs labeled by gold 'openai'" in out, out
        dupes = server.duplicates()
        assert not set(dupes) & persisted  # no answered-and-saved request was ever sent again
        assert len(dupes) <= 4  # at most the requests in flight at the kill (concurrency 4)
        assert KEY not in out
    labels = read_jsonl(tmp_path / "results" / "micro" / "pairs" / "labels.jsonl")
    malformed = sum(1 for k, v in server.attempts.items() if v[0][1] == "malformed")
    assert len(labels) + malformed == len(samples)  # every pair labeled exactly once, except unparseable ones
    assert len({(r["prompt"], frozenset([r["chosen"], r["rejected"]])) for r in labels}) == len(labels)
    assert f"{malformed} left out, the judge's answer unparseable" in out


@pytest.mark.slow
def test_evaluate_stage_with_openai_judge(tmp_path, micro_run):
    with FakeOpenAI(decide=true_reward_judge()) as server:
        config = openai_micro(tmp_path, micro_run, server.url, both_orders=True)
        out, _ = run_stage("evaluate", config, "--method", "sft", "--seed", "0").communicate(timeout=300)
        assert "win rate" in out, out
    metrics = read_json(tmp_path / "results" / "micro" / "eval" / "sft" / "seed0" / "metrics.json")
    programmatic = read_json(micro_run[1] / "eval" / "sft" / "seed0" / "metrics.json")
    assert metrics["unparseable"] == 0 and metrics["n"] == programmatic["n"]
    # the same completions (same seed) judged by the true reward through the API: the same win rate
    assert metrics["win_rate"] == pytest.approx(programmatic["win_rate"])
    assert "gold_reward" not in metrics
    rows = read_jsonl(tmp_path / "results" / "micro" / "eval" / "sft" / "seed0" / "completions.jsonl")
    assert all(r["outcome"] in (0.0, 0.5, 1.0) for r in rows)
    assert not any(KEY in json.dumps(r) for r in rows)


@pytest.mark.slow
def test_grpo_asks_the_judge_online_even_with_the_batch_api_on(tmp_path, micro_run):
    """GRPO's periodic evaluations run on rank 0 while the other ranks wait: never a Batch API wait of hours."""
    with FakeOpenAI(decide=true_reward_judge()) as server:
        config = openai_micro(tmp_path, micro_run, server.url, batch_api=True, batch_poll_seconds=0.01)
        out, _ = run_stage("grpo", config, "--method", "noreg", "--seed", "0", "grpo.steps=2",
                           "grpo.eval_every=2").communicate(timeout=300)
        assert "this stage asks the judge online" in out and "grpo: noreg seed 0: 2 steps" in out, out
        assert server.batches_created == 0 and sum(server.answered.values()) > 0
    curve = read_jsonl(tmp_path / "results" / "micro" / "grpo" / "noreg" / "seed0" / "metrics.jsonl")
    assert [r["step"] for r in curve if "eval/win_rate" in r] == [0, 2]


def test_judge_cost_counts_requests_from_the_config(tmp_path, capsys):
    from rlhf.cli import main
    from rlhf.stages.judge_cost import estimate
    cfg = load_config(write_config(tmp_path, gold={"type": "openai"}))
    with pytest.raises(ConfigError, match="--prompt-tokens"):
        estimate(cfg)
    rows = {r["what"]: r for r in estimate(cfg, prompt_tokens=100)}
    assert rows["label"]["requests"] == 60                 # sample.num_prompts x pairs_per_prompt
    assert rows["evaluate"]["requests"] == (5 + 1) * 16     # (methods x seeds + SFT) x test prompts
    assert rows["grpo evals"]["requests"] == 5 * 3 * 8 * 2  # runs x (step 0, 2, 4) x prompts x (win rate + RM acc)
    longer = {r["what"]: r for r in estimate(cfg, prompt_tokens=200)}
    for what in ("label", "evaluate", "grpo evals"):  # each request carries its prompt once, at the input price
        extra = 100 * rows[what]["requests"]
        assert (longer[what]["input_mtok"] - rows[what]["input_mtok"]) * 1e6 == pytest.approx(extra)
        assert longer[what]["usd"] - rows[what]["usd"] == pytest.approx(extra * 0.10 / 1e6)
    assert rows["total"]["requests"] == 60 + 96 + 240
    assert main(["judge-cost", "--config", str(write_config(tmp_path, gold={"type": "openai"})),
                 "--prompt-tokens", "100"]) == 0
    assert f"{'label':12}{60:>11,}" in capsys.readouterr().out


def test_judge_cost_takes_each_methods_own_eval_settings(tmp_path):
    """A method that evaluates on more prompts, more often or with longer completions costs more."""
    from rlhf.stages.judge_cost import estimate
    base = {"noreg": {}, "kl": {"kl_beta": 0.1}}
    same = {r["what"]: r for r in estimate(load_config(write_config(
        tmp_path, gold={"type": "openai"}, methods=base)), prompt_tokens=100)}["grpo evals"]
    bigger = {r["what"]: r for r in estimate(load_config(write_config(
        tmp_path, gold={"type": "openai"},
        methods={**base, "kl": {"kl_beta": 0.1, "eval_prompts": 16, "eval_every": 1, "max_new_tokens": 40}})),
        prompt_tokens=100)}["grpo evals"]
    assert same["requests"] == 2 * 3 * 8 * 2                  # 2 methods x (step 0, 2, 4) x 8 prompts x 2
    assert bigger["requests"] == (3 * 8 + 5 * 16) * 2          # kl: steps 0..4 x 16 prompts
    per_request = lambda r: r["input_mtok"] / r["requests"]  # noqa: E731
    assert per_request(bigger) > per_request(same)             # kl's completions are longer


def test_an_earlier_releases_sqlite_cache_is_read_and_a_bad_one_refused(tmp_path):
    """Answers paid for under the previous cache format (one sqlite file) are found, counted and never asked again."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "judge_cache.sqlite")
    db.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, model TEXT, request TEXT, content TEXT, prompt_tokens "
               "INTEGER, completion_tokens INTEGER, cost_usd REAL, via TEXT, created REAL)")
    db.execute("INSERT INTO answers VALUES ('k', 'm', '{}', 'Output (a)', 10, 2, 0.25, 'online', 0)")
    db.commit()
    db.close()
    cache = AnswerCache(tmp_path / "judge_cache")
    assert cache.get_many(["k", "other"]) == {"k": Answer("Output (a)", 10, 2, 0.25)} and cache.spent() == 0.25
    assert not list((tmp_path / "judge_cache").iterdir())  # nothing written by reading
    (tmp_path / "bad.sqlite").write_text("not a database, just text " * 100)
    with pytest.raises(ConfigError, match="not a usable sqlite file"):
        AnswerCache(tmp_path / "bad")


WRITER = """
import json, sys
from rlhf.judge.client import ChatClient
cfg = json.loads(sys.argv[1])
client = ChatClient(cfg, sys.argv[2])
out = client.answers([client.request([{"role": "user", "content": f"question {i}"}]) for i in range(40)])
print(json.dumps(out))
"""


def test_two_jobs_on_one_cache_folder_share_no_file_and_lose_no_answer(tmp_path):
    """Two processes (two jobs of one experiment, on one network filesystem) ask the same 40 questions at once through
    one cache folder: each appends only to its own shard, no SQLite file is written, and every answer either paid for
    is kept and counted; a third process gets all 40 from the cache without a request."""
    with FakeOpenAI(respond=lambda body: "Output (a)", delay=0.01) as server:
        jcfg = judge_cfg(tmp_path, server.url, concurrency=4)["gold"]["judge"]
        folder = tmp_path / "shared" / "judge_cache"
        env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": str(REPO)}
        jobs = [subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(jcfg), str(folder)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [job.communicate(timeout=120) for job in jobs]
        assert all(job.returncode == 0 for job in jobs), [err[-2000:] for _, err in outs]
        assert all(json.loads(out) == ["Output (a)"] * 40 for out, _ in outs)
        shards = sorted(folder.iterdir())
        assert [p.suffix for p in shards] == [".jsonl", ".jsonl"] and not list(tmp_path.rglob("*.sqlite*"))
        assert {p.name.split("-")[1] for p in shards} == {str(job.pid) for job in jobs}  # one writer per file
        rows = AnswerCache(folder).answers()
        sent = sum(server.answered.values())
        assert len(rows) == sent >= 40 and {r["answer"] for r in rows} == set(server.answered)  # all paid, all kept
        assert AnswerCache(folder).spent() == pytest.approx(sum(r["cost_usd"] for r in rows))
        client = ChatClient(jcfg, folder)
        assert client.answers([client.request([{"role": "user", "content": f"question {i}"}]) for i in range(40)]) \
            == ["Output (a)"] * 40
        assert sum(server.answered.values()) == sent  # the third process sent nothing


def test_a_line_cut_by_a_kill_is_ignored_and_asked_again(tmp_path):
    cache = AnswerCache(tmp_path / "c")
    cache.put("k1", {"model": "m"}, Answer("x", 1, 1, 0.5))
    cache.close()
    shard = next((tmp_path / "c").iterdir())
    with open(shard, "ab") as f:
        f.write(b'{"answer": "k2", "model": "m", "content": "y", "cost')  # the process died mid-write
    fresh = AnswerCache(tmp_path / "c")
    assert set(fresh.get_many(["k1", "k2"])) == {"k1"} and fresh.spent() == 0.5
