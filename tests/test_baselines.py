"""The papers' baselines (issue 14): UWO's ensemble reward, AdvPO's adversarial head and BSPO's support test against
hand-worked values; DPO / TR-DPO, Elastic Reset and every baseline end to end."""
import math

import pytest
import torch
import yaml

from tests.conftest import REPO

from rlhf.algorithms.advpo import adversarial_head, precision_inverse
from rlhf.algorithms.ensemble import uncertainty_weighted_reward


def test_uwo_is_mean_minus_lambda_population_variance_or_std():
    rewards = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])  # member x completion; variance 8/3 and 0
    assert uncertainty_weighted_reward(rewards, 0.5).tolist() == pytest.approx([3 - 0.5 * 8 / 3, 2.0])
    assert uncertainty_weighted_reward(rewards, 0.5, "std").tolist() == pytest.approx([3 - 0.5 * math.sqrt(8 / 3), 2])
    assert uncertainty_weighted_reward(rewards, 0.0).tolist() == pytest.approx([3.0, 2.0])


def test_uwo_with_one_member_is_that_rm_and_keeps_float32_from_bf16():
    one = torch.tensor([[0.5, -1.25, 3.0]], dtype=torch.bfloat16)
    out = uncertainty_weighted_reward(one, 10.0, "std")
    assert out.dtype == torch.float32 and out.tolist() == [0.5, -1.25, 3.0]
    with pytest.raises(ValueError, match="penalty must be one of"):
        uncertainty_weighted_reward(one, 0.1, "mad")
    with pytest.raises(ValueError, match=r"\[K members, N completions\]"):
        uncertainty_weighted_reward(torch.ones(3), 0.1)


def test_advpo_head_by_hand():
    """M_D^-1 = diag(1, 4), phi_hat = (1, 1), g = (1, 1): M^-1 g = (1, 4), g^T M^-1 g = 5; B = 5 -> lambda* = 1,
    phi_adv = (0, -3). The second direction, where the RM's data is 4x thinner, takes 4x the correction."""
    m_inv, head = torch.diag(torch.tensor([1.0, 4.0])), torch.tensor([1.0, 1.0])
    policy, reference = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.5, 0.5], [-0.5, -0.5]])
    assert adversarial_head(head, m_inv, policy, reference, 5.0).tolist() == pytest.approx([0.0, -3.0])
    assert adversarial_head(head, m_inv, policy, reference, 1.25).tolist() == pytest.approx([0.5, -1.0])  # lambda* 2
    assert torch.equal(adversarial_head(head, m_inv, policy, reference, 0.0), head)  # zero budget: phi_hat
    assert torch.equal(adversarial_head(head, m_inv, reference, reference, 5.0), head)  # g = 0: nothing to exploit


def test_precision_inverse_ridge_makes_rank_deficient_data_invertible():
    """Every training feature lies on e1 (rank 1 of 3): M_D = diag(0.1 + sum x^2, 0.1, 0.1)."""
    chosen, rejected = torch.tensor([[1.0, 0, 0], [2.0, 0, 0]]), torch.tensor([[-1.0, 0, 0], [0.5, 0, 0]])
    m_inv = precision_inverse(chosen, rejected, ridge=0.1)
    assert torch.allclose(m_inv, torch.diag(torch.tensor([1 / 6.35, 10.0, 10.0])))
    with pytest.raises(ValueError, match="ridge must be > 0"):
        precision_inverse(chosen, rejected, ridge=0.0)


def test_advpo_head_spends_the_budget_and_lowers_rewards_along_g():
    """Random features: phi_adv lies on the ellipsoid (phi - phi_hat)^T M_D (phi - phi_hat) = B, and the reward gap
    of the policy's completions over the references' falls by exactly sqrt(B g^T M^-1 g), the most pessimistic
    head's; a completion moved from the references along g loses reward, one moved against g gains."""
    gen = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(40, 6, generator=gen), torch.randn(40, 6, generator=gen)
    m_inv = precision_inverse(chosen, rejected, ridge=1.0)
    head = torch.randn(6, generator=gen)
    reference = torch.randn(16, 6, generator=gen)
    policy = reference + torch.randn(6, generator=gen)  # every completion's features moved by the same vector
    budget = 3.0
    adv = adversarial_head(head, m_inv, policy, reference, budget)
    delta, g = adv - head, policy.mean(0) - reference.mean(0)
    assert delta @ torch.linalg.solve(m_inv, delta) == pytest.approx(budget, rel=1e-4)
    gap = lambda phi: (policy @ phi).mean() - (reference @ phi).mean()  # noqa: E731
    assert gap(adv) - gap(head) == pytest.approx(-math.sqrt(budget * (g @ m_inv @ g)), rel=1e-4)
    base = reference.mean(0)
    assert (base + g) @ adv - (base + g) @ head < base @ adv - base @ head  # along g: lower than at the references
    assert (base - g) @ adv - (base - g) @ head > base @ adv - base @ head


def test_ema_update_is_the_decayed_average_in_float32():
    from rlhf.algorithms.resets import ema_update
    ema = [torch.tensor([1.0, -2.0])]
    ema_update(ema, [torch.tensor([3.0, 2.0], dtype=torch.bfloat16)], decay=0.9)
    assert ema[0].dtype == torch.float32 and ema[0].tolist() == pytest.approx([1.2, -1.6])


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_elastic_reset_swaps_policy_ema_and_initial_at_the_configured_steps(tiny_lm, backend):
    """bf16 policy, reset every 2 updates, decay 0.5: after updates 1 and 3 only the EMA moves (the float32 average
    of pi_init and the policies so far); after updates 2 and 4 the policy becomes that EMA — its fp32 master weights
    exactly, its bf16 weights rounded — and the EMA restarts from pi_init."""
    import copy
    import types

    from rlhf.algorithms.resets import float32_copy
    from rlhf.distributed import Dist, deepspeed_available, make_update
    from rlhf.trainer import elastic_reset
    from tests.conftest import micro_grpo
    from tests.test_gr_options import _masters
    if backend == "deepspeed" and not deepspeed_available():
        pytest.skip("deepspeed is not installed")
    s = micro_grpo(backend=backend, lr=1e-2, elastic_reset_every=2, elastic_reset_decay=0.5)
    initial = copy.deepcopy(tiny_lm[0]).to(torch.bfloat16).requires_grad_(False)
    update = make_update(copy.deepcopy(initial).requires_grad_(True), s, Dist())
    run = types.SimpleNamespace(settings=s, policy=update.model, initial=initial, update=update,
                                ema=float32_copy(initial.parameters()))
    init = float32_copy(initial.parameters())
    expected, gen = [t.clone() for t in init], torch.Generator().manual_seed(0)
    for step in range(1, 5):
        params = list(update.model.parameters())
        update.write_rank_average(params, [torch.randn(p.shape, generator=gen) for p in params])
        update.step()
        weights = [p.detach().float() for p in update.model.parameters()]
        expected = [0.5 * e + 0.5 * w for e, w in zip(expected, weights)]
        stats = {}
        elastic_reset(run, step, stats)
        if step % 2:
            assert stats == {} and all(torch.allclose(e, x, atol=1e-6) for e, x in zip(run.ema, expected))
            assert all(torch.equal(w, p.float()) for w, p in zip(weights, update.model.parameters()))  # untouched
        else:
            assert stats == {"elastic_reset": 1}
            assert all(torch.allclose(m, x, atol=1e-6) for m, x in zip(_masters(update), expected))
            assert all(torch.equal(p, x.to(torch.bfloat16)) for p, x in zip(update.model.parameters(), _masters(update)))
            assert all(torch.equal(e, i) for e, i in zip(run.ema, init))  # the EMA restarts at pi_init
            expected = [t.clone() for t in init]


class Killed(Exception):
    pass


def test_elastic_reset_runs_in_the_grpo_stage_and_resumes_its_ema_bit_for_bit(micro_run, tmp_path, monkeypatch):
    """Elastic Reset every 3 updates with the KL kept: the reset is logged at update 3 only; a run killed in update 3
    resumes the update-2 checkpoint — whose EMA already holds updates 1-2 — and ends with the uninterrupted run's
    weights exactly (an EMA restarted at pi_init on resume would make update 3's reset land elsewhere)."""
    import rlhf.stages.grpo as grpo
    from rlhf.cli import main
    from rlhf.io import read_jsonl
    from rlhf.models import load_causal_lm
    from tests.conftest import write_config
    from tests.test_stages import _copy_upstream
    method = {"elastic": {"elastic_reset_every": 3, "elastic_reset_decay": 0.9, "kl_beta": 0.02}}
    args = ["grpo", "--method", "elastic", "--seed", "0", "--config"]
    runs = {}
    for name in ("whole", "killed"):
        _copy_upstream(micro_run, tmp_path / name)
        cfg = write_config(tmp_path / name, methods=method)
        if name == "killed":
            step = grpo.train_step

            def crash_at_3(run, batch, update):
                if update == 3:
                    raise Killed
                return step(run, batch, update)
            monkeypatch.setattr(grpo, "train_step", crash_at_3)
            with pytest.raises(Killed):
                main([*args, str(cfg)])
            monkeypatch.setattr(grpo, "train_step", step)
        assert main([*args, str(cfg)]) == 0
        runs[name] = tmp_path / name / "results" / "micro" / "grpo" / "elastic" / "seed0"
    train = [r for r in read_jsonl(runs["whole"] / "metrics.jsonl") if "proxy_reward" in r]
    assert [r["step"] for r in train if r.get("elastic_reset")] == [3] and all(r["kl_beta"] == 0.02 for r in train)
    whole, killed = (load_causal_lm(runs[n] / "policy", "float32", torch.device("cpu")).state_dict() for n in runs)
    assert all(torch.equal(whole[k], killed[k]) for k in whole)


DPO = {"methods": {"dpo": {}, "tr-dpo": {"sync_alpha": 0.5, "sync_steps": 2}}, "lr": 1e-3, "batch_size": 8,
       "max_length": 64}


def _dpo_trainer(micro_run, tmp_path, method: str, **dpo):
    """The dpo stage's trainer on the micro run's pairs and SFT policy, as the stage builds it."""
    from rlhf.config import load_config
    from rlhf.distributed import Dist
    from rlhf.io import read_jsonl
    from rlhf.models import load_causal_lm
    from rlhf.settings import DPOSettings
    from rlhf.models import tokenizer_of
    from rlhf.stages.dpo import DPOTrainer, dpo_config, pairs
    from tests.conftest import write_config
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(tmp_path, dpo={**DPO, **dpo}))
    root = micro_run[1]
    s = DPOSettings.for_method(cfg, method)
    tokenizer = tokenizer_of(root / "sft", cfg)
    rows = read_jsonl(root / "pairs" / "labels.jsonl")
    model = load_causal_lm(root / "sft", "float32", torch.device("cpu"))
    trainer = DPOTrainer(model=model, args=dpo_config(cfg, s, Dist(), 0, str(tmp_path / "trainer")),
                         train_dataset=pairs(rows), processing_class=tokenizer)
    return trainer, rows, tokenizer


def test_dpo_pairs_are_tokenized_as_the_rm_and_grpo_see_them(micro_run, tmp_path):
    """TRL's own tokenization of our pairs: prompt ids, then the completion's ids with EOS, exactly rm_input_ids."""
    from rlhf.models import rm_input_ids
    trainer, rows, tokenizer = _dpo_trainer(micro_run, tmp_path, "dpo")
    for row, r in zip(trainer.train_dataset, rows):
        assert row["prompt_ids"] + row["chosen_ids"] == rm_input_ids(tokenizer, r["prompt"], r["chosen"])
        assert row["prompt_ids"] + row["rejected_ids"] == rm_input_ids(tokenizer, r["prompt"], r["rejected"])


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_tr_dpo_reference_follows_the_soft_and_hard_rule_at_its_steps(micro_run, tmp_path, alpha):
    """pi_ref stays pi_sft through update 1, becomes alpha*pi_theta + (1-alpha)*pi_ref right after update 2 (alpha 1:
    a copy of the policy), stays through update 3, mixes again after update 4; plain DPO never moves it."""
    from transformers import TrainerCallback
    trainer, _, _ = _dpo_trainer(micro_run, tmp_path, "tr-dpo", methods={"tr-dpo": {"sync_alpha": alpha,
                                                                                    "sync_steps": 2}})
    snap = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            seen.append((state.global_step, snap(model), snap(trainer.ref_model)))
    trainer.add_callback(Record())  # after TRL's own sync callback, so it sees the synced reference
    reference = snap(trainer.ref_model)
    trainer.args.max_steps = 4
    trainer.train()
    assert [step for step, _, _ in seen] == [1, 2, 3, 4]
    for step, policy, ref in seen:
        if step % 2 == 0:
            reference = {k: alpha * policy[k] + (1 - alpha) * reference[k] for k in reference}
        assert all(torch.allclose(ref[k], reference[k], atol=1e-7) for k in reference), step
    moved = max((seen[-1][2][k] - seen[0][2][k]).abs().max().item() for k in reference)
    assert moved > 1e-6  # the reference did move
    plain, _, _ = _dpo_trainer(micro_run, tmp_path / "plain", "dpo")
    before = snap(plain.ref_model)
    plain.args.max_steps = 4
    plain.train()
    assert all(torch.equal(before[k], v) for k, v in snap(plain.ref_model).items())


@pytest.mark.slow
def test_the_baselines_run_through_snakemake_and_are_reported_beside_grpo(micro_run, tmp_path):
    """On the micro run's pairs, SFT policy and proxy RM (copied in), a dpo section, a UWO method over a 2-member
    ensemble, AdvPO, BSPO, Elastic Reset and scheduled-beta methods add exactly: a dpo job and an evaluation per DPO
    method, a rule per ensemble member, AdvPO's matrix, BSPO's ScoreLM, a GRPO run and evaluation per method, the
    report; every stage stays inside its declared files; the table lists the new rows after the GRPO methods'. Then a
    third member schedules only itself and the UWO run downstream of it."""
    import os
    import re
    import shutil
    from pathlib import Path

    import pandas as pd

    from rlhf.cli import TRACE_ENV
    from rlhf.io import read_json, read_jsonl
    from tests.conftest import jobs, snakemake, write_config
    from tests.test_workflow import stages_within_their_declarations
    shutil.copytree(micro_run[1], tmp_path / "results" / "micro")
    methods = {**yaml.safe_load((REPO / "config" / "micro.yaml").read_text())["methods"], "uwo": {"reward": "uwo", "uwo_lambda": 0.5},
               "advpo": {"reward": "advpo", "advpo_budget": 5.0, "kl_beta": 0.1},
               "bspo": {"reward": "bspo", "bspo_threshold": 1e-3},
               "elastic": {"elastic_reset_every": 2, "elastic_reset_decay": 0.9, "kl_beta": 0.02},
               "scheduled": {"kl_beta": 0.1, "kl_beta_decay_every": 2}}
    cfg = write_config(tmp_path, dpo=DPO, ensemble={"members": 2}, methods=methods)
    dry = snakemake(cfg, "-n", "--forcerun", "report")
    assert jobs(dry.stdout) == {"dpo": 2, "rm_member": 2, "advpo": 1, "bspo": 1, "grpo": 5, "evaluate": 7,
                                "report": 1, "all": 1}, dry.stdout[-2000:]
    (tmp_path / "trace").mkdir()
    run = snakemake(cfg, "--forcerun", "report", env={**os.environ, TRACE_ENV: str(tmp_path / "trace")})
    assert run.returncode == 0, run.stderr[-3000:]
    root = tmp_path / "results" / "micro"
    seen = stages_within_their_declarations(tmp_path / "trace", root)
    assert seen == {"dpo", "rm_member", "advpo", "bspo", "grpo", "evaluate", "report"}
    table = pd.read_csv(root / "report" / "table.csv")
    assert list(table["method"]) == ["sft", "noreg", "kl", "resets", "gr", "signcert", "uwo", "advpo", "bspo",
                                     "elastic", "scheduled", "dpo", "tr-dpo"]
    steps = lambda m: [r for r in read_jsonl(root / "grpo" / m / "seed0" / "metrics.jsonl")  # noqa: E731
                       if "proxy_reward" in r]
    assert steps("bspo") and all(0 <= r["bspo/unsupported_fraction"] <= 1 for r in steps("bspo"))
    assert [r["step"] for r in steps("elastic") if r.get("elastic_reset")] == [2, 4]  # micro: 4 steps
    assert [r["kl_beta"] for r in steps("scheduled")] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    # the grpo rule's recorded command text (Snakemake's code trigger) names no optional input, so a release that adds
    # one (as this issue added three) reruns no finished run
    import json
    codes = {record["code"] for record in map(json.loads, map(Path.read_text, (tmp_path / ".snakemake" / "metadata")
                                                                   .iterdir())) if record["rule"] == "grpo"}
    code = codes.pop()
    assert not codes and "{params.inputs}" in code and not re.search(r"\{input\.|ensemble|advpo|bspo", code), code
    for method in ("dpo", "tr-dpo"):
        assert (root / "dpo" / method / "seed0" / "policy" / "model.safetensors").is_file()
    # members: the proxy's held-out split, their own seeds (so their heads differ)
    members = [read_json(root / "rm_ensemble" / f"member{k}" / "metrics.json") for k in (1, 2)]
    assert members[0]["n_heldout"] == members[1]["n_heldout"] == read_json(root / "rm" / "metrics.json")["n_heldout"]
    from safetensors.torch import load_file
    heads = [load_file(root / "rm_ensemble" / f"member{k}" / "model.safetensors")["score.weight"] for k in (1, 2)]
    assert not torch.equal(heads[0], heads[1])
    assert "Nothing to be done" in snakemake(cfg, "-n").stdout  # each member cached
    more = write_config(tmp_path, dpo=DPO, ensemble={"members": 3}, methods=methods)
    assert jobs(snakemake(more, "-n").stdout) == {"rm_member": 1, "grpo": 1, "evaluate": 1, "report": 1, "all": 1}
    _mechanisms_on_the_baselines_artifacts(tmp_path, root, methods)


def _mechanisms_on_the_baselines_artifacts(tmp_path, root, methods):
    """The mechanisms stage on this DAG's real RMs (proxy, 2 UWO members, AdvPO's matrix, BSPO's ScoreLM): the DAG
    schedules it before the report once noreg keeps rollouts; run on rollouts made of pi_0's labelled completions (2
    logged steps of groups of G = 4), it reads each signal with its method's settings and splits every completion."""
    from rlhf import mechanisms
    from rlhf.cli import main
    from rlhf.io import read_json, read_jsonl, write_jsonl
    from tests.conftest import jobs, snakemake, write_config
    diagnosed = {**methods, "noreg": {**methods["noreg"], "rollouts_every": 2}}
    (tmp_path / "mech").mkdir()
    cfg = write_config(tmp_path / "mech", dpo=DPO, ensemble={"members": 2}, methods=diagnosed,
                       mechanisms={"method": "noreg"})
    planned = jobs(snakemake(cfg, "-n").stdout)
    assert planned["mechanisms"] == 1 and planned["report"] == 1, planned
    mech_root = tmp_path / "mech" / "results" / "micro"
    import shutil
    for part in ("sft", "rm", "pairs", "rm_ensemble", "advpo", "bspo", "data"):
        shutil.copytree(root / part, mech_root / part)
    labels = read_jsonl(root / "pairs" / "labels.jsonl")[:16]
    texts = [r[k] for r in labels for k in ("chosen", "rejected")]
    rows = [{"step": step, "prompt": labels[(i // 4) % len(labels)]["prompt"], "completion": t, "reward": 0.0}
            for step in (2, 4) for i, t in enumerate(texts)]
    write_jsonl(mech_root / "grpo" / "noreg" / "seed0" / "rollouts.jsonl", rows)
    assert main(["mechanisms", "--config", str(cfg)]) == 0
    summary = read_json(mech_root / "mechanisms" / "summary.json")
    assert summary["signals"] == {"signcert": "signcert", "uwo": "uwo", "advpo": "advpo", "bspo": "bspo"}
    seed = summary["seeds"]["0"]
    assert seed["n"] == len(rows) and seed["n_exploit"] + seed["n_other"] == len(rows)
    assert sorted(seed["steps"]) == ["2", "4"] and all(v["n"] == len(texts) for v in seed["steps"].values())
    for key in ("signcert/rho_negative/other", "signcert/radius_median/other", "bspo/unsupported/other",
                "uwo/member_std/other", "advpo/uncertainty/other"):
        assert seed[key] == seed[key], key  # every signal measured (not NaN) on the non-exploit completions
    table = mechanisms.markdown(summary, {"gr": [1.0]})
    assert all(name in table for name, _ in mechanisms.SIGNALS.values()) and "GR: realized perturbation" in table


def test_uwo_reward_is_the_ensemble_mean_minus_lambda_times_its_disagreement(tiny_lm, tmp_path):
    """Two member RMs with different heads score the same completions; the ensemble scorer's reward is the UWO value
    of their rewards."""
    from rlhf.algorithms.ensemble import uncertainty_weighted_reward
    from rlhf.models import load_reward_model
    from rlhf.rewards.proxy_rm import EnsembleScorer, RewardScorer
    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "lm")
    members = []
    for k in (1, 2):
        torch.manual_seed(k)  # a fresh head per member
        members.append(RewardScorer(load_reward_model(tmp_path / "lm", tok), tok))
    prompts, completions = ["post : alice lost the car . tldr :"] * 3, ["alice lost car", "car", "bob"]
    single = torch.stack([m(prompts, completions).rewards for m in members])
    assert not torch.allclose(single[0], single[1])
    for penalty in ("var", "std"):
        got = EnsembleScorer(members, 0.7, penalty)(prompts, completions)
        assert torch.equal(got.rewards, uncertainty_weighted_reward(single, 0.7, penalty))


def test_uwo_needs_an_ensemble_and_goes_without_signcert(tmp_path):
    from rlhf.cli import main
    from rlhf.config import load_config
    from rlhf.errors import ConfigError
    from tests.conftest import write_config
    uwo = {"reward": "uwo", "uwo_lambda": 0.1}
    with pytest.raises(ConfigError, match="methods.u: reward uwo needs an ensemble section"):
        load_config(write_config(tmp_path, methods={"u": uwo}))
    with pytest.raises(ConfigError, match="methods.u: reward uwo needs uwo_lambda"):
        load_config(write_config(tmp_path, ensemble={}, methods={"u": {"reward": "uwo"}}))
    with pytest.raises(ConfigError, match="methods.u: uwo_lambda is reward uwo's setting; the method's reward is proxy"):
        load_config(write_config(tmp_path, ensemble={}, methods={"u": {"uwo_lambda": 0.1}}))
    with pytest.raises(ConfigError, match="methods.u: SignCert-PO certifies one reward model's linear head; reward uwo"):
        load_config(write_config(tmp_path, ensemble={}, methods={"u": {**uwo, "signcert_quantile": 0.3}}))
    cfg = write_config(tmp_path, ensemble={"members": 2}, methods={"u": uwo})
    assert load_config(cfg)["ensemble"] == {"members": 2, "model": None}
    assert main(["rm_member", "--config", str(cfg), "--member", "3"]) == 2  # one line naming the members


def test_dpo_method_names_are_unique_and_need_pairs(tmp_path):
    from rlhf.config import load_config
    from rlhf.errors import ConfigError
    from tests.conftest import write_config
    with pytest.raises(ConfigError, match="dpo.methods.kl: the name is taken"):
        load_config(write_config(tmp_path, dpo={"methods": {"kl": {}}}))
    with pytest.raises(ConfigError, match="dpo.methods.sft: the name is taken"):
        load_config(write_config(tmp_path, dpo={"methods": {"sft": {}}}))
    with pytest.raises(ConfigError, match="the dpo section needs preference pairs"):
        load_config(write_config(tmp_path, "rlvr-micro.yaml", dpo={"methods": {"dpo": {}}}))
    cfg = load_config(write_config(tmp_path, dpo={"methods": {"d": {}}}))
    assert cfg["dpo"]["methods"]["d"] == {"sync_alpha": None, "sync_steps": 512} and cfg["dpo"]["beta"] == 0.1
    import dataclasses

    from rlhf.config import _schema
    from rlhf.settings import DPOSettings
    dpo = _schema()["properties"]["dpo"]["properties"]  # the typed settings name the schema's fields, no more
    assert {f.name for f in dataclasses.fields(DPOSettings)} == \
        (set(dpo) - {"methods"}) | set(dpo["methods"]["additionalProperties"]["properties"])


def test_advpo_matrix_is_the_proxy_features_on_its_training_pairs_and_the_reward_uses_the_adversarial_head(
        micro_run, tmp_path):
    """The advpo stage's M_D^-1 = (ridge I + sum e e^T)^-1 over the rm stage's training pairs (not the held-out ones);
    the AdvPO reward is the proxy's features times adversarial_head(...) plus the bias: with budget 0 the proxy's own
    reward, with a budget a lower reward gap of the completions over the references than the proxy gives."""
    from rlhf.algorithms.advpo import adversarial_head, precision_inverse
    from rlhf.cli import main
    from rlhf.config import load_config
    from rlhf.io import read_jsonl
    from rlhf.rewards.proxy_rm import AdvPOScorer, split_by_prompt
    from rlhf.models import tokenizer_of
    from rlhf.rewards.proxy_rm import load_proxy
    from tests.conftest import write_config
    from tests.test_stages import _copy_upstream
    dst = _copy_upstream(micro_run, tmp_path)
    import shutil
    shutil.copytree(micro_run[1] / "pairs", dst / "pairs")
    cfg_path = write_config(tmp_path, methods={"advpo": {"reward": "advpo", "advpo_budget": 5.0}}, advpo={"ridge": 0.5})
    assert main(["advpo", "--config", str(cfg_path)]) == 0
    saved = torch.load(dst / "advpo" / "precision.pt", weights_only=True)
    cfg = load_config(cfg_path)
    rows = read_jsonl(dst / "pairs" / "labels.jsonl")
    held, train = split_by_prompt(rows, cfg["rm"]["eval_fraction"], cfg["seed"])
    proxy = load_proxy(dst / "rm", cfg, tokenizer_of(dst / "rm", cfg), torch.device("cpu"))
    features = lambda key: proxy([r["prompt"] for r in train], [r[key] for r in train]).features  # noqa: E731
    assert saved["pairs"] == len(train) < len(rows) and saved["ridge"] == 0.5
    torch.testing.assert_close(saved["m_inverse"], precision_inverse(features("chosen"), features("rejected"), 0.5))
    # the reward on completions of two prompts, against their references
    prompts = [train[0]["prompt"]] * 2 + [train[1]["prompt"]] * 2
    completions = [train[0]["chosen"], train[0]["rejected"], train[1]["chosen"], train[1]["rejected"]]
    references = {r["prompt"]: "bob" for r in train}
    plain = proxy(prompts, completions)
    zero = AdvPOScorer(proxy, saved["m_inverse"], 0.0, references)(prompts, completions)
    torch.testing.assert_close(zero.rewards, plain.rewards, rtol=1e-5, atol=1e-5)
    adv = AdvPOScorer(proxy, saved["m_inverse"], 5.0, references)(prompts, completions)
    refs = proxy(list(dict.fromkeys(prompts)), ["bob", "bob"]).features
    head = proxy.head.weight.detach()[0]
    bias = 0.0 if proxy.head.bias is None else proxy.head.bias.detach()[0]  # transformers' score heads: no bias
    phi = adversarial_head(head, saved["m_inverse"], plain.features, refs, 5.0)
    torch.testing.assert_close(adv.rewards, plain.features @ phi + bias)
    gap = lambda r, phi: r.mean() - (refs @ phi).mean()  # noqa: E731
    assert gap(adv.rewards, phi) < gap(plain.rewards, head)

    def gather(t):
        raise AssertionError("a rank scoring alone must not gather (the other ranks wait at a barrier)")
    training = AdvPOScorer(proxy, saved["m_inverse"], 5.0, {}, gather=gather)
    alone = training.on_one_rank(references)(prompts, completions)  # rank 0's held-out evaluation
    torch.testing.assert_close(alone.rewards, adv.rewards)


def test_advpo_goes_without_uwo_and_signcert(tmp_path):
    from rlhf.config import load_config
    from rlhf.errors import ConfigError
    from tests.conftest import write_config
    with pytest.raises(ConfigError, match="methods.a: uwo_lambda is reward uwo's setting; the method's reward is advpo"):
        load_config(write_config(tmp_path, ensemble={}, methods={"a": {"reward": "advpo", "advpo_budget": 1.0,
                                                                         "uwo_lambda": 0.1}}))
    with pytest.raises(ConfigError, match="methods.a: reward advpo is an RLHF reward; this experiment is RLVR"):
        load_config(write_config(tmp_path, base="rlvr-micro.yaml", methods={"a": {"reward": "advpo",
                                                                                  "advpo_budget": 1.0}}))


def test_bspo_loss_and_support_test_by_hand():
    from rlhf.algorithms.bspo import behavior_supported_rewards, least_supported, scorelm_loss
    loss, nll = scorelm_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), torch.log(torch.tensor([0.5, 0.25])),
                             alpha=0.5)
    bt = (-math.log(1 / (1 + math.exp(-1))) + math.log(2)) / 2
    assert nll.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert loss.item() == pytest.approx(bt + 0.5 * nll.item())
    # 3 completions x 4 positions: the mask marks each one's tokens; a masked-out -20 (a prompt token) never counts
    logprobs = torch.tensor([[-20.0, -1.0, -2.0, -0.5], [-0.1, -9.0, -0.2, -30.0], [-0.3, -0.3, -0.3, -0.3]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    least = least_supported(logprobs, mask)
    assert least.tolist() == [-2.0, -9.0, math.inf]
    rewards = torch.tensor([1.0, 5.0, 3.0])
    out, unsupported = behavior_supported_rewards(rewards, least, threshold=math.exp(-5), r_min=-7.0)
    assert out.tolist() == [1.0, -7.0, 3.0] and unsupported.tolist() == [False, True, False]
    out, unsupported = behavior_supported_rewards(rewards, least, threshold=math.exp(-2), r_min=-7.0)  # beta <= t
    assert out.tolist() == [-7.0, -7.0, 3.0]
    out, _ = behavior_supported_rewards(rewards, least, threshold=0.0, r_min=-7.0)  # threshold 0: nothing rejected
    assert torch.equal(out, rewards)


def test_bspo_scorer_tests_the_completion_tokens_eos_included_under_the_lms_own_distribution(tiny_lm, tmp_path):
    """On crafted completions, the scorer's least-supported log beta is the minimum over the completion's tokens and
    EOS (never the prompt's) of the causal LM's own log-softmax, read one position earlier; a completion with a rare
    token falls outside the support at a threshold between the two, and only its reward becomes r_min."""
    from rlhf.models import attach_behavior_head, encode_prompt, load_causal_lm, load_reward_model, rm_input_ids
    from rlhf.rewards.proxy_rm import BSPOScorer, RewardScorer
    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    lm = load_causal_lm(tmp_path / "lm")
    prompts = ["post : alice lost the car . tldr :", "post : bob found a dog . tldr :"]
    words = ["alice", "car", "lost", "the", "dog", "bob", "found", "a", "."]

    def by_hand(prompt, completion):
        ids = rm_input_ids(tok, prompt, completion)
        logp = lm(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        start = len(encode_prompt(tok, prompt))
        return min(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))

    with torch.no_grad():
        table = {(p, w): by_hand(p, w) for p in prompts for w in words}
    (p_rare, rare), (p_common, common) = min(table, key=table.get), max(table, key=table.get)
    reward_model = load_reward_model(tmp_path / "lm", tok)
    attach_behavior_head(reward_model, tmp_path / "lm")
    threshold = math.exp((table[p_rare, rare] + table[p_common, common]) / 2)
    scorer = BSPOScorer(reward_model, tok, batch_size=3, threshold=threshold, r_min=-100.0)
    batch_p = [p_common, p_rare, p_common, prompts[0]]
    batch_c = [common, rare, f"{common} {rare} {common}", "alice lost the car"]
    _, least = scorer.behavior(batch_p, batch_c)
    with torch.no_grad():
        expected = [by_hand(p, c) for p, c in zip(batch_p, batch_c)]
    torch.testing.assert_close(least, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    scores = scorer(batch_p, batch_c)
    plain = RewardScorer(reward_model, tok)(batch_p, batch_c)
    assert scores.unsupported.tolist() == [e <= math.log(threshold) for e in expected]
    assert scores.unsupported[:2].tolist() == [False, True]
    torch.testing.assert_close(scores.rewards, torch.where(scores.unsupported, torch.tensor(-100.0), plain.rewards))
    torch.testing.assert_close(scores.features, plain.features)


def test_untied_lm_head_is_kept_and_the_saved_scorelm_loads_as_the_causal_lm(tmp_path):
    """GPT-NeoX / Pythia keep an untied LM head: it is attached under the causal class's name, so the saved folder
    loads as the causal LM (same logits) and as the reward model (same rewards)."""
    from transformers import AutoModelForCausalLM

    from rlhf.models import attach_behavior_head, behavior_logits, load_reward_model
    from tests.conftest import build_tiny
    model, tok = build_tiny(arch="gpt_neox")
    model.config.tie_word_embeddings = False
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone() + 0.5 * torch.randn_like(head.weight))
    model.save_pretrained(tmp_path / "lm")
    ids = torch.tensor([tok("post : alice lost the car . tldr : alice")["input_ids"]])
    rm = load_reward_model(tmp_path / "lm", tok)
    attach_behavior_head(rm, tmp_path / "lm")
    with torch.no_grad():
        hidden = rm.base_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(behavior_logits(rm, hidden), model(input_ids=ids).logits)
        rm.save_pretrained(tmp_path / "scorelm")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "scorelm")
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
        torch.testing.assert_close(load_reward_model(tmp_path / "scorelm", tok)(input_ids=ids).logits,
                                   rm(input_ids=ids).logits)


def test_bspo_stage_trains_the_lm_head_and_records_r_min_and_the_support_calibration(micro_run, tmp_path):
    """The bspo stage on the micro run's pairs: a folder that loads as the reward model and as beta; r_min_train is
    the lowest ScoreLM reward over the training completions (not the held-out ones); the unsupported fractions fall
    as the threshold falls; with alpha > 0 the behavior NLL of the training completions is lower than with alpha 0."""
    import shutil

    from transformers import AutoModelForCausalLM

    from rlhf.cli import main
    from rlhf.config import load_config
    from rlhf.io import read_json
    from rlhf.models import encode_prompt, load_reward_model, rm_input_ids
    from rlhf.rewards.proxy_rm import BSPOScorer, RewardScorer
    from rlhf.settings import GRPOSettings
    from rlhf.models import tokenizer_of
    from rlhf.rewards.proxy_rm import load_bspo
    from rlhf.stages.common import training_pairs
    from tests.conftest import write_config
    from tests.test_stages import _copy_upstream
    dst = _copy_upstream(micro_run, tmp_path)
    shutil.copytree(micro_run[1] / "pairs", dst / "pairs")
    nll = {}
    for alpha in (0.0, 1.0):  # 3 epochs at the micro RM's lr: enough for the LM term to show
        cfg_path = write_config(tmp_path, methods={"bspo": {"reward": "bspo", "bspo_threshold": 1e-4}}, bspo={"alpha": alpha},
                                rm={"lr": 1.0e-3, "epochs": 3, "batch_size": 8, "max_length": 48})
        shutil.rmtree(dst / "bspo", ignore_errors=True)
        assert main(["bspo", "--config", str(cfg_path)]) == 0
        folder, cfg = dst / "bspo" / "rm", load_config(cfg_path)
        metrics = read_json(folder / "metrics.json")
        heldout, train = training_pairs(cfg, dst / "pairs" / "labels.jsonl")
        tok = tokenizer_of(folder, cfg)
        scorer = load_bspo(folder, cfg, GRPOSettings.for_method(cfg, "bspo"), tok, torch.device("cpu"))
        assert scorer.r_min == metrics["r_min_train"]
        prompts, completions = [x["prompt"] for x in train] * 2, [x["chosen"] for x in train] + [
            x["rejected"] for x in train]
        rewards = RewardScorer(load_reward_model(folder, tok), tok)(prompts, completions).rewards
        assert metrics["r_min_train"] == pytest.approx(rewards.min().item(), abs=1e-6)
        fractions = list(metrics["unsupported_heldout"].values())
        assert fractions == sorted(fractions, reverse=True) and metrics["n_heldout"] == len(heldout)
        # mean NLL of the training completions' tokens under beta (the stage's own loss term)
        lm = AutoModelForCausalLM.from_pretrained(folder)
        total, count = 0.0, 0
        with torch.no_grad():
            for p, c in zip(prompts, completions):
                ids = rm_input_ids(tok, p, c)
                logp = lm(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
                start = len(encode_prompt(tok, p))
                total -= sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
                count += len(ids) - start
        nll[alpha] = total / count
        assert isinstance(scorer, BSPOScorer)
    assert nll[1.0] < nll[0.0] - 0.05, nll  # measured: 3.83 vs 3.95


def test_bspo_goes_without_the_other_reward_replacements(tmp_path):
    from rlhf.config import load_config
    from rlhf.errors import ConfigError
    from tests.conftest import write_config
    for other, error in (({"advpo_budget": 1.0}, "advpo_budget is reward advpo's setting; the method's reward is bspo"),
                         ({"signcert_quantile": 0.3}, "SignCert-PO certifies one reward model's linear head")):
        with pytest.raises(ConfigError, match=f"methods.b: {error}"):
            load_config(write_config(tmp_path, methods={"b": {"reward": "bspo", "bspo_threshold": 1e-4, **other}}))


def test_scorelm_collator_marks_the_completion_tokens_of_chosen_then_rejected_rows():
    from rlhf.stages.bspo import CompletionCollator
    batch = CompletionCollator(pad_token_id=0)([{"chosen_ids": [5, 6, 7, 8], "chosen_start": 2,
                                                 "rejected_ids": [5, 6, 9], "rejected_start": 2},
                                                {"chosen_ids": [4, 7], "chosen_start": 1,
                                                 "rejected_ids": [4, 3, 3, 3, 1], "rejected_start": 0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0], [4, 7, 0, 0, 0], [5, 6, 9, 0, 0], [4, 3, 3, 3, 1]]
    assert batch["completion_mask"].int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                                       [1, 1, 1, 1, 1]]


# docs/extending.md's worked example, carried out: a reward kind registered from this file alone (its loader, its
# scorer and its table entry) trains a GRPO run through the stage. Nothing in rlhf/ names it.
class KeywordReward:
    """1 per occurrence of a word in the completion: the word is read from the kind's declared input file."""

    def __init__(self, word: str):
        self.word, self.calls = word, []

    def __call__(self, prompts: list[str], completions: list[str]):
        from rlhf.rewards.proxy_rm import Scores
        rewards = torch.tensor([float(c.split().count(self.word)) for c in completions])
        self.calls.append(rewards)
        return Scores(rewards, torch.empty(len(completions), 0))  # no features: SignCert-PO refuses it


def load_keyword_reward(ctx):
    import json
    return KEYWORD.setdefault("reward", KeywordReward(json.loads(ctx.inputs["keyword"][0].read_text())["word"]))


KEYWORD: dict = {}


@pytest.fixture
def keyword_kind(monkeypatch):
    from rlhf.rewards.kinds import REWARDS, RewardKind
    kind = RewardKind("keyword", "1 per occurrence of the word in keyword.json", load_keyword_reward,
                      inputs=lambda P, cfg: {"keyword": [P.root / "keyword.json"]})
    monkeypatch.setitem(REWARDS, kind.name, kind)  # register(kind), undone after the test
    KEYWORD.clear()
    return kind


def test_a_reward_registered_from_a_test_file_trains_a_grpo_run_through_the_stage(micro_run, tmp_path, keyword_kind):
    import json

    from rlhf.cli import main
    from rlhf.config import load_config
    from rlhf.errors import ConfigError
    from rlhf.io import read_jsonl
    from rlhf.registry import stage_files
    from tests.conftest import write_config
    from tests.test_stages import _copy_upstream
    root = _copy_upstream(micro_run, tmp_path)
    (root / "keyword.json").write_text(json.dumps({"word": "a"}))
    cfg_path = write_config(tmp_path, methods={"kw": {"reward": "keyword"}})
    cfg = load_config(cfg_path)
    assert stage_files("grpo", cfg, "kw", 0)["inputs"]["keyword"] == [root / "keyword.json"]  # the rule's input
    assert main(["grpo", "--method", "kw", "--seed", "0", "--config", str(cfg_path)]) == 0
    reward = KEYWORD["reward"]
    steps = [r for r in read_jsonl(root / "grpo" / "kw" / "seed0" / "metrics.jsonl") if "proxy_reward" in r]
    assert len(steps) == cfg["grpo"]["steps"] and (root / "grpo" / "kw" / "seed0" / "policy").is_dir()
    means = {round(r.mean().item(), 5) for r in reward.calls}  # training steps and rank 0's diagnostics
    assert all(round(r["proxy_reward"], 5) in means for r in steps)  # each step trained on this reward's scores
    with pytest.raises(ConfigError, match="methods.kw: SignCert-PO certifies one reward model's linear head; reward "
                                          "keyword has none"):
        load_config(write_config(tmp_path, methods={"kw": {"reward": "keyword", "signcert_quantile": 0.2}}))
    with pytest.raises(ConfigError, match="methods.kw: reward 'nokind' is not a reward kind \\(have: proxy, uwo, advpo, "
                                          "bspo, verifiable, keyword\\)"):
        load_config(write_config(tmp_path, methods={"kw": {"reward": "nokind"}}))


def test_register_adds_a_kind_once_and_refuses_another_under_its_name(monkeypatch):
    from rlhf.rewards.kinds import REWARDS, RewardKind, register, reward_kind
    monkeypatch.setattr("rlhf.rewards.kinds.REWARDS", dict(REWARDS))
    import rlhf.rewards.kinds as kinds
    kind = RewardKind("keyword", "a test kind", "tests.test_baselines:load_keyword_reward")
    assert register(kind) is kind and register(kind) is kind and kinds.REWARDS["keyword"] is kind
    with pytest.raises(ValueError, match="reward kind 'keyword' is registered already"):
        register(RewardKind("keyword", "another", load_keyword_reward))
    assert reward_kind("proxy").certifiable and not reward_kind("uwo").certifiable
