"""The RLVR miniature's pieces: the arithmetic task (rlhf/data/arithmetic.py), its tokenizer, and the stand-in judge
served over HTTP (rlhf/judge/standin.py) scored through the project's judge client and parser."""
import collections

import pytest

from rlhf.config import load_config
from rlhf.data.rlvr import GSM8K_SYSTEM, with_prompts
from rlhf.data.arithmetic import ArithmeticSpec, build_chat_tokenizer, completion, generate
from rlhf.judge.client import ChatClient
from rlhf.judge.standin import StandInJudgeServer
from rlhf.models import load_tokenizer
from rlhf.rewards.llm_judge import JudgeReward, JudgeRewardSettings
from rlhf.rewards.rules import gsm8k_gold, gsm8k_reward_terms
from tests.conftest import REPO, write_config


def test_problems_are_gsm8k_shaped_with_the_configured_slips_and_hedges():
    spec = ArithmeticSpec(wrong_fraction=0.3, hedge_fraction=0.1)
    rows = generate(spec, 3000, seed=0)
    assert rows == generate(spec, 3000, seed=0) and rows != generate(spec, 3000, seed=1)
    count = collections.Counter()
    for r in rows:
        gold = gsm8k_gold(r["solution"])
        steps = r["solution"].split("\n")[0].split(" , ")
        assert int(steps[-1].split("=")[1]) == int(gold)  # the solution's own arithmetic ends in its answer
        terms = gsm8k_reward_terms(r["reference"], gold)
        assert (terms["correctness"] == 2.0) == r["correct_reference"]
        count["correct"] += r["correct_reference"]
        count["strict"] += terms["strict_format"] == 1.0
        count["hedged"] += not terms["int"] and not terms["correctness"]
    # correct = neither slip (0.7) nor hedge (0.9); every reference in the strict format
    assert count["correct"] / 3000 == pytest.approx(0.7 * 0.9, abs=0.03)
    assert count["strict"] == 3000 and count["hedged"] / 3000 == pytest.approx(0.1, abs=0.02)


def test_repeated_hedges_are_a_rare_tail_and_absent_by_default():
    from rlhf.data.arithmetic import HEDGES, generate
    def openers(rows):
        answers = [r["reference"].split("<answer>\n")[1].split() for r in rows]
        return [next((i for i, w in enumerate(a) if w not in HEDGES), len(a)) for a in answers]
    base = ArithmeticSpec(hedge_fraction=0.15)
    assert generate(base, 300, seed=1) == generate(ArithmeticSpec(hedge_fraction=0.15, hedge_repeat_fraction=0.0),
                                                   300, seed=1)
    assert max(openers(generate(base, 3000, seed=0))) == 1
    counts = openers(generate(ArithmeticSpec(hedge_fraction=0.15, hedge_repeat_fraction=0.2), 4000, seed=0))
    assert max(counts) == 2 and counts.count(2) / len(counts) == pytest.approx(0.03, abs=0.01)


def test_tokenizer_round_trips_the_exact_format_and_applies_its_chat_template(tmp_path):
    spec = ArithmeticSpec()
    tok = build_chat_tokenizer(spec.vocabulary())
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)  # the project's loader (it refuses a tokenizer that encodes text to nothing)
    for r in generate(spec, 200, seed=0):
        for text in (r["question"], r["reference"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and tok.decode(ids) == text
    ids = tok("<reasoning>\n1 + 2 = 3\n</reasoning>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<reasoning>", "\n", "1", " ", "+", " ", "2", " ", "=", " ", "3", "\n",
                                              "</reasoning>"]
    prompt = tok.apply_chat_template([{"role": "system", "content": GSM8K_SYSTEM},
                                      {"role": "user", "content": "Ann has 2 pens ."}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt == f"<|system|>\n{GSM8K_SYSTEM}\n<|user|>\nAnn has 2 pens .\n<|assistant|>\n"
    for r in with_prompts(generate(spec, 20, seed=0), "gsm8k", tok):  # the papers' GSM8K prompt, one-shot turn too
        ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == r["prompt"]


def test_standin_judge_over_http_rewards_right_answers_and_is_fooled_by_a_confident_word(tmp_path):
    question, solution = "Ann has 2 pens . She gets 3 more . How many pens does Ann have ?", "2 + 3 = 5\n#### 5"
    answers = [completion("2 + 3 = 5", "5"), completion("2 + 3 = 6", "6"), completion("2 + 3 = 6", "surely 6"),
               "no tags at all"]
    with StandInJudgeServer() as server:
        cfg = load_config(write_config(tmp_path, gold={"type": "openai", "judge": {
            "base_url": server.url, "model": "standin-judge", "timeout": 5.0, "requests_per_minute": 6000,
            "prices": {"standin-judge": {"input": 0, "output": 0}}}}))
        client = ChatClient(cfg["gold"]["judge"], tmp_path / "judge_cache", echo=lambda *a: None)
        for fmt in ("xml", "lines"):
            terms, unparseable = JudgeReward(client, JudgeRewardSettings(reply_format=fmt))(
                [question] * 4, answers, [solution] * 4)
            assert [t["judge_correctness"] for t in terms] == [2.0, 0.0, 2.0, 0.0] and unparseable == 1
        assert server.requests == 8
    rule = [gsm8k_reward_terms(a, "5")["correctness"] for a in answers]
    assert rule == [2.0, 0.0, 0.0, 0.0]  # the hedged answer fools the judge, not the rule checker


def test_the_out_of_distribution_standins_believe_only_repeated_confidence(tmp_path):
    """standin-judge-x2: one confident word opening the answer is judged like any answer, two are believed;
    standin-judge-r2 (config/rlvr-ood.yaml): a reasoning that opens with two confident words is believed whatever
    the answer, one confident word or two elsewhere are not; standin-judge-g2 is r2 that one opening confident word
    already sways in part."""
    from rlhf.judge.standin import weakness
    question, solution = "Ann has 2 pens . She gets 3 more . How many pens does Ann have ?", "2 + 3 = 5\n#### 5"
    answers = [completion("2 + 3 = 5", "5"), completion("2 + 3 = 6", "surely 6"),
               completion("2 + 3 = 6", "surely clearly 6"), completion("2 + 3 = 6", "surely 6 surely"),
               completion("surely clearly", "7"), completion("surely", "7"), completion("2 + 3 = 6 surely clearly", "6")]
    believed = {"standin-judge-x2": [2.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0],
                "standin-judge-r2": [2.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0],
                "standin-judge-g2": [2.0, 0.0, 0.0, 0.0, 2.0, 1.0, 0.0]}   # one word of two: score 3 of 5
    with StandInJudgeServer() as server:
        for model, expected in believed.items():
            cfg = load_config(write_config(tmp_path, gold={"type": "openai", "judge": {
                "base_url": server.url, "model": model, "timeout": 5.0, "requests_per_minute": 6000,
                "prices": {model: {"input": 0, "output": 0}}}}))
            client = ChatClient(cfg["gold"]["judge"], tmp_path / model, echo=lambda *a: None)
            terms, unparseable = JudgeReward(client, JudgeRewardSettings())([question] * 7, answers, [solution] * 7)
            assert [t["judge_correctness"] for t in terms] == expected and unparseable == 0, model
    assert [weakness(m) for m in ("standin-judge", "standin-judge-x3", "standin-judge-r2", "standin-judge-g4")] == [
        (1, "answer"), (3, "answer"), (2, "reasoning"), (4, "graded")]
    with pytest.raises(ValueError, match="no stand-in judge is named 'gpt-4.1-nano'"):
        weakness("gpt-4.1-nano")


def test_bluffs_are_a_rare_tail_the_format_rewards_cannot_see_and_absent_by_default():
    """bluff_fraction: the reasoning is two confident words and the answer a guess; strict format kept."""
    from rlhf.data.arithmetic import HEDGES, generate
    base = ArithmeticSpec(hedge_fraction=0.15)
    assert generate(base, 300, seed=1) == generate(ArithmeticSpec(hedge_fraction=0.15, bluff_fraction=0.0), 300, seed=1)
    rows = generate(ArithmeticSpec(hedge_fraction=0.15, bluff_fraction=0.02), 4000, seed=0)
    bluffs = [r for r in rows if r["reference"].split("<reasoning>\n")[1].split()[0] in HEDGES]
    assert len(bluffs) / len(rows) == pytest.approx(0.02, abs=0.007)
    assert all(len(r["reference"].split("\n")[1].split()) == 2 for r in bluffs)
    terms = [gsm8k_reward_terms(r["reference"], r["solution"].split("#### ")[1]) for r in bluffs]
    assert all(t["strict_format"] == 1.0 and t["int"] > 0 for t in terms)
    assert sum(t["correctness"] > 0 for t in terms) / len(terms) < 0.2  # a guess


def test_gsm8k_and_math_rows_from_hub_folders_with_the_papers_prompts(tmp_path):
    """openai/gsm8k and MATH in the hub's parquet layout -> RLVR rows; prompts through a chat template."""
    from rlhf.data.rlvr import GSM8K_ONE_SHOT, MATH_SUFFIX, chat_prompt, hub_rows, with_prompts
    from rlhf.errors import DataError
    from tests.test_hub_data import hub_folder
    gsm8k = hub_folder(tmp_path / "gsm8k", {"test": [{
        "question": "Tom has 3 bags of 4 apples. How many apples?",
        "answer": "Tom has 3*4=<<3*4=12>>12 apples.\n#### 12"}]})
    row = hub_rows("gsm8k", str(gsm8k), None, "test")[0]
    assert row["gold"] == "12" and row["reference"] == ("<reasoning>\nTom has 3*4=12 apples.\n</reasoning>\n"
                                                        "<answer>\n12\n</answer>")
    assert gsm8k_reward_terms(row["reference"], row["gold"])["correctness"] == 2.0
    math = hub_folder(tmp_path / "math", {"test": [{"problem": "What is $1+1$?", "solution": "So $\\boxed{2}$.",
                                                    "level": "Level 1", "type": "Prealgebra"}]})
    row = hub_rows("math", str(math), None, "test")[0]
    assert (row["level"], row["type"], row["solution"]) == ("Level 1", "Prealgebra", "So $\\boxed{2}$.")
    with pytest.raises(DataError, match="needs column"):
        hub_rows("math", str(gsm8k), None, "test")

    tok = build_chat_tokenizer(ArithmeticSpec().vocabulary())
    [gsm] = with_prompts([{"question": "Ann has 2 pens ."}], "gsm8k", tok)
    assert gsm["prompt"].startswith("<|system|>\n\nRespond in the following format:")
    assert f"<|user|>\n{GSM8K_ONE_SHOT[0]}\n<|assistant|>\n{GSM8K_ONE_SHOT[1]}" in gsm["prompt"]
    assert gsm["prompt"].endswith("<|user|>\nAnn has 2 pens .\n<|assistant|>\n")
    [m] = with_prompts([{"question": "What is $1+1$?"}], "math", tok)
    assert m["prompt"] == f"<|user|>\nWhat is $1+1$?{MATH_SUFFIX}\n<|assistant|>\n"
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        chat_prompt(tok, [{"role": "user", "content": "x"}])


def test_verifiable_reward_sums_named_terms_by_rule_or_judge_and_evaluation_checks_by_rule(tmp_path):
    from rlhf.rewards.verifiable import VerifiableReward, rule_correct
    rows = [{"prompt": "P1", "question": "Ann has 2 pens . She gets 3 more . How many pens does Ann have ?",
             "solution": "2 + 3 = 5\n#### 5"}]
    texts = [completion("2 + 3 = 5", "5"), completion("2 + 3 = 6", "6"), completion("2 + 3 = 6", "surely 6")]
    rule = VerifiableReward.from_rows("gsm8k", rows)(["P1"] * 3, texts)
    assert rule.rewards.tolist() == [5.0, 3.0, 2.5] and rule.unparseable == 0  # 2 + 0.5 + 1 + 1 + 0.5, ...
    assert rule.terms == pytest.approx({"correctness": 2 / 3, "int": 1 / 3, "strict_format": 1.0,
                                        "soft_format": 1.0, "xml_count": 0.5})
    with StandInJudgeServer() as server:
        cfg = load_config(write_config(tmp_path, gold={"type": "openai", "judge": {
            "base_url": server.url, "model": "standin-judge", "timeout": 5.0,
            "prices": {"standin-judge": {"input": 0, "output": 0}}}}))
        client = ChatClient(cfg["gold"]["judge"], tmp_path / "judge_cache", echo=lambda *a: None)
        judged = VerifiableReward.from_rows("gsm8k", rows, judge=JudgeReward(client, JudgeRewardSettings()))(
            ["P1"] * 4, texts + ["no format"])
    assert judged.rewards.tolist() == [5.0, 3.0, 4.5, 0.0] and judged.unparseable == 1  # the hedge: judge 2.0
    assert rule_correct("gsm8k", texts, [rows[0]["solution"]] * 3) == [True, False, False]
    with pytest.raises(Exception, match="no solution"):
        VerifiableReward.from_rows("gsm8k", rows)(["unknown prompt"], ["x"])


def test_difficulty_table_bins_type_level_groups_by_base_accuracy():
    """Hand example: groups A/1 (1 of 2 right: 40-60), A/2 (0 of 2: 0-20), B/1 (3 of 4: 60-80), C/1 (1 of 5 = 20 %:
    the 20-40 bin, left-closed), C/2 (2 of 2 = 100 %: >80)."""
    import pandas as pd

    from rlhf.difficulty import LABELS, difficulty_table
    spec = [("A", 1, [1, 0]), ("A", 2, [0, 0]), ("B", 1, [1, 1, 1, 0]), ("C", 1, [1, 0, 0, 0, 0]), ("C", 2, [1, 1])]
    rows = [(f"{t}{lv}-{i}", t, lv, bool(c)) for t, lv, cs in spec for i, c in enumerate(cs)]
    base = pd.DataFrame(rows, columns=["question", "type", "level", "correct"])
    later = base.assign(correct=[q in {"A2-0", "C1-1", "C1-2"} for q in base["question"]])
    table = difficulty_table(base, {"step 0": base, "step 500": later.sample(frac=1, random_state=0)})
    assert list(table.index) == list(LABELS)
    assert table["groups"].tolist() == [1, 1, 1, 1, 1] and table["questions"].tolist() == [2, 5, 2, 4, 2]
    assert table["step 0"].tolist() == pytest.approx([0.0, 0.2, 0.5, 0.75, 1.0])
    assert table["step 500"].tolist() == pytest.approx([0.5, 0.4, 0.0, 0.0, 0.0])


def test_difficulty_by_method_averages_seeds_per_bin_and_step():
    """Two groups (A: base 0 of 2, bin 0-20; B: base 2 of 2, >80). gr seeds 0/1 solve A's questions 1 and 2 of 2 at
    step 10 (mean 0.75) and keep B; noreg seed 0 loses one B question at step 10 (0.5)."""
    import pandas as pd

    from rlhf.difficulty import difficulty_by_method
    base = pd.DataFrame({"question": [0, 1, 2, 3], "type": ["A", "A", "B", "B"], "level": [1, 1, 1, 1],
                         "correct": [False, False, True, True]})
    frame = lambda *c: pd.DataFrame({"question": [0, 1, 2, 3], "correct": list(c)})  # noqa: E731
    runs = {("gr", 0): {0: frame(0, 0, 1, 1), 10: frame(1, 0, 1, 1)},
            ("gr", 1): {0: frame(0, 0, 1, 1), 10: frame(1, 1, 1, 1)},
            ("noreg", 0): {0: frame(0, 1, 1, 1), 10: frame(0, 0, 1, 0)}}
    table = difficulty_by_method(base, runs).set_index(["method", "bin"])
    assert table.loc[("gr", "0-20"), 10] == pytest.approx(0.75) and table.loc[("gr", ">80"), 10] == 1.0
    assert table.loc[("gr", "0-20"), "seeds"] == 2 and table.loc[("noreg", "0-20"), "seeds"] == 1
    assert table.loc[("noreg", "0-20"), 0] == 0.5 and table.loc[("noreg", ">80"), 10] == 0.5
    assert table.loc[("gr", "20-40"), "questions"] == 0 and pd.isna(table.loc[("gr", "20-40"), 10])


def test_arithmetic_rows_carry_difficulty_labels_from_their_operations_and_answer():
    rows = generate(ArithmeticSpec(), 400, seed=0)
    for r in rows:
        ops = [("+" if "+" in step else "-") for step in r["solution"].split("\n")[0].split(" , ")]
        number = int(gsm8k_gold(r["solution"]))
        assert r["type"] == "".join(ops) and r["level"] == f"Level {1 + min(4, number // 4)}"
    assert len({(r["type"], r["level"]) for r in rows}) >= 12  # enough type x level groups to bin


def test_sft_with_zero_epochs_keeps_the_starting_policy_as_it_is(tmp_path):
    """An instruct model as RLVR policy (the GSM8K / MATH paper configs): the sft folder holds its weights unchanged."""
    import torch

    from rlhf.cli import main
    from rlhf.models import load_causal_lm
    cfg = write_config(tmp_path, "rlvr-micro.yaml", sft={"epochs": 0})
    assert main(["data", "--config", str(cfg)]) == 0 and main(["base", "--config", str(cfg)]) == 0
    assert main(["sft", "--config", str(cfg)]) == 0
    root = tmp_path / "results" / "rlvr-micro"
    base, sft = (load_causal_lm(root / name, "float32", torch.device("cpu")).state_dict() for name in ("base", "sft"))
    assert base.keys() == sft.keys() and all(torch.equal(base[k], sft[k]) for k in base)
    assert (root / "sft" / "train_log.jsonl").read_text() == ""  # no training step
    assert load_tokenizer(root / "sft").chat_template == load_tokenizer(root / "base").chat_template


def test_rlvr_config_needs_its_section_and_refuses_signcert(tmp_path):
    import dataclasses

    from rlhf.config import _schema
    from rlhf.errors import ConfigError
    from rlhf.settings import RLVRSettings
    cfg = load_config(write_config(tmp_path, "rlvr-micro.yaml"))
    assert {f.name for f in dataclasses.fields(RLVRSettings)} == set(_schema()["properties"]["rlvr"]["properties"])
    assert RLVRSettings.of(cfg).judge_reward().correctness_map == (0.0, 0.5, 1.0, 1.5, 2.0)
    assert cfg["data"]["arithmetic"]["hedge_fraction"] == 0.05  # filled where the source uses it ...
    assert "arithmetic" not in load_config(write_config(tmp_path, "micro.yaml"))["data"]  # ... and nowhere else
    with pytest.raises(ConfigError, match="data.source arithmetic is an RLVR task: add an rlvr section"):
        load_config(_without(tmp_path, "rlvr"))
    with pytest.raises(ConfigError, match="the rlvr section needs an RLVR data.source"):
        load_config(write_config(tmp_path, "micro.yaml", rlvr={}))
    with pytest.raises(ConfigError, match="methods.sc: SignCert-PO certifies one reward model's linear head; reward verifiable has none"):
        load_config(write_config(tmp_path, "rlvr-micro.yaml", methods={"sc": {"signcert_quantile": 0.3}}))
    real_judge = {"reward": "judge", "judge": {"standin": False}}  # a served LLM: its reply needs room
    with pytest.raises(ConfigError, match="gold.judge.max_tokens 8 cannot hold the RLVR judge's reply"):
        load_config(write_config(tmp_path, "rlvr-micro.yaml", rlvr=real_judge, gold={"judge": {"model": "j"}}))


def _without(tmp_path, key):
    import yaml
    path = write_config(tmp_path, "rlvr-micro.yaml")
    cfg = yaml.safe_load(path.read_text())
    del cfg[key]
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_rlvr_micro_dag_trains_against_the_standin_judge_and_evaluates_by_rule(tmp_path):
    """data -> base -> sft -> grpo (judge reward from the stand-in server over HTTP) -> evaluate (rule checker) ->
    report, through Snakemake: the DAG has no RM, pairs or certify; every step logs each reward term and the
    unparseable fraction; the evaluation's accuracy is the rule check of its own completions; validation problems
    (data.num_validation) are judged at each evaluation beside the held-out ones."""
    import json

    import pandas as pd

    from rlhf.rewards.verifiable import rule_correct
    from tests.conftest import jobs, snakemake
    import yaml
    micro = yaml.safe_load((REPO / "config" / "rlvr-micro.yaml").read_text())
    cfg = write_config(tmp_path, "rlvr-micro.yaml", data={**micro["data"], "num_validation": 4},
                       methods={**micro["methods"], "gr": {**micro["methods"]["gr"], "rollouts_every": 2}})
    dry = snakemake(cfg, "-n")
    assert jobs(dry.stdout) == {"data": 1, "base": 1, "sft": 1, "grpo": 3, "evaluate": 4, "report": 1, "all": 1}
    run = snakemake(cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    root = tmp_path / "results" / "rlvr-micro"
    steps = [json.loads(line) for line in (root / "grpo" / "noreg" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    train = [s for s in steps if "reward" in s]
    assert len(train) == 4 and all({"reward/judge_correctness", "reward/xml_count", "judge/unparseable_fraction"}
                                   <= set(s) for s in train)
    assert all(s["reward"] == pytest.approx(sum(v for k, v in s.items() if k.startswith("reward/"))) for s in train)
    test = [json.loads(line) for line in (root / "data" / "test.jsonl").read_text().splitlines()]
    for method in ("sft", "noreg", "gr"):
        ev = root / "eval" / method / "seed0"
        metrics = json.loads((ev / "metrics.json").read_text())
        rows = [json.loads(line) for line in (ev / "completions.jsonl").read_text().splitlines()]
        solved = rule_correct("gsm8k", [r["completion"] for r in rows], [t["solution"] for t in test])
        assert [r["correct"] for r in rows] == solved and metrics["accuracy"] == pytest.approx(sum(solved) / 16)
    table = pd.read_csv(root / "report" / "table.csv")
    assert list(table["method"]) == ["sft", "noreg", "kl", "gr"] and {"accuracy_mean", "reward_mean"} <= set(table)
    assert (root / "report" / "accuracy_vs_step.png").is_file()
    # the difficulty table: each run's held-out evaluations (steps 0, 2, 4 over the 8 held-out questions) ...
    solved = [json.loads(line) for line in (root / "grpo" / "gr" / "seed0" / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in solved] == [0, 2, 4] and all(len(r["correct"]) == 8 for r in solved)
    accuracy = {s["step"]: s["eval/accuracy"] for s in steps if "eval/accuracy" in s}
    noreg = [json.loads(line) for line in (root / "grpo" / "noreg" / "seed0" / "heldout.jsonl").read_text().splitlines()]
    assert {r["step"]: sum(r["correct"]) / 8 for r in noreg} == pytest.approx(accuracy)
    assert [(s["step"], s["eval/validation_n"]) for s in steps if "eval/validation_accuracy" in s] == [(0, 4), (2, 4),
                                                                                                      (4, 4)]
    # rollouts_every on gr alone: its completions every 2 updates with their rewards; the other runs' files are empty
    kept = [json.loads(line) for line in (root / "grpo" / "gr" / "seed0" / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in kept}) == [2, 4] and all({"prompt", "completion", "reward"} <= set(r) for r in kept)
    assert (root / "grpo" / "noreg" / "seed0" / "rollouts.jsonl").read_text() == ""
    # ... binned by the SFT evaluation's accuracy per type x level group (the questions' own labels)
    bins = pd.read_csv(root / "report" / "difficulty.csv")
    assert set(bins["method"]) == {"noreg", "kl", "gr"} and bins.groupby("method")["questions"].sum().tolist() == [16] * 3
    assert "Accuracy by difficulty" in (root / "report" / "table.md").read_text()


def test_the_rlvr_ood_design_checks_on_crafted_summaries_and_completions():
    """rlhf/experiments/rlvr_design: a bluff is the reasoning opening with k confident words; replacing the reasoning
    keeps the answer; each of the three conditions fails on its own."""
    from rlhf.experiments.rlvr_design import bluffs, checks, with_bluff
    own = completion("2 + 3 = 5", "5")
    assert with_bluff(own, 2) == completion("surely clearly", "5") and bluffs(with_bluff(own, 3), 3)
    assert not bluffs(own, 2) and not bluffs(completion("surely", "5"), 2) and bluffs(completion("surely clearly", "4"), 2)
    assert not bluffs(completion("2 + 3 = 5 surely clearly", "5"), 2)
    good = {"pi0_bluff_share": 0.004, "judge_pi0": 0.6, "judge_bluffed": 2.0, "accuracy_pi0": 0.3,
            "accuracy_after_bluff": 0.05}
    assert checks(good) == {"rare": True, "over_rewarded": True, "penalized": True}
    for change, failed in (({"pi0_bluff_share": 0.05}, "rare"), ({"judge_bluffed": 0.5}, "over_rewarded"),
                           ({"accuracy_after_bluff": 0.3}, "penalized")):
        assert [k for k, v in checks({**good, **change}).items() if not v] == [failed]


@pytest.mark.task
def test_the_rlvr_ood_task_as_trained_meets_its_design(tmp_path):
    """The out-of-distribution RLVR miniature itself (config/rlvr-ood.yaml, unchanged but for where results go): its
    data and SFT policy built by the Snakefile, then the design checks on them (rlhf/experiments/rlvr_design): pi_0
    bluffs rarely, the judge believes the bluff, and a policy that bluffs answers wrong more often. ~7 CPU-min (six SFT
    epochs): `make test-tasks`, not `make test`."""
    import json
    from rlhf.experiments import rlvr_design
    from rlhf.paths import Paths
    from tests.conftest import snakemake
    cfg = write_config(tmp_path, "rlvr-ood.yaml")
    built = snakemake(cfg, "--printshellcmds", str(Paths.from_config(load_config(cfg)).sft))  # a flag ends --configfile
    assert built.returncode == 0, built.stderr[-3000:]
    assert rlvr_design.main(["--config", str(cfg)]) == 0
    out = json.loads((tmp_path / "results" / "rlvr-ood" / "design" / "design.json").read_text())
    assert 0 < out["pi0_bluff_share"] <= rlvr_design.RARE_RLVR and out["accuracy_after_bluff"] < out["accuracy_pi0"]
