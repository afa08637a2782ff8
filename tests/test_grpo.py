"""GRPO (issue 23): the loss and gradient are the objective written out by hand, the reference is the model with its
adapters off (a frozen copy's log-probabilities), misbehaving rewards stop the run by name, training raises the
reward, and a run interrupted between the updates of one generation resumes exactly."""

import copy
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lora
from lora.data import load_prompts
from lora.train import GRPOConfig, GRPOTrainer, TrainConfig, grpo_loss
from lora.train.grpo import completion_logps, group_advantages
from lora.train.rewards import Rewards, exact_match, json_match, json_parses, length_penalty, load_reward, number_match
from conftest import make_char_tokenizer, make_llama_for, randomize_adapters

TESTS = Path(__file__).parent
WORDS = ["ab", "cde", "f", "ghij", "kl", "mno", "p", "qrs"]


def vowels(prompts, completions, **_):
    """The share of vowels among a completion's first four characters: a tiny random model starts near 0.05."""
    return [sum(ch in "aeiou" for ch in c[:4]) / 4 for c in completions]


def setup(tmp_path, grpo=None, adapter_std=None, **train):
    tok = make_char_tokenizer()
    model = make_llama_for(tok)
    frozen = copy.deepcopy(model)  # the base model as a separate copy, to check the one-copy reference against
    torch.manual_seed(0)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    if adapter_std:
        randomize_adapters(model, std=adapter_std)
    prompts, _ = load_prompts([{"prompt": f"Say {w}", "answer": w} for w in WORDS], tok)
    cfg = TrainConfig(**{"output_dir": str(tmp_path / "out"), "log_every": 1, "seq_len": 64, "batch_size": 2,
                         "learning_rate": 2e-2, "warmup_ratio": 0.0, "max_steps": 4, **train})
    grpo = GRPOConfig(**{"group_size": 4, "max_new_tokens": 4, **(grpo or {})})
    trainer = GRPOTrainer(model, cfg, grpo, prompts, [vowels], tok, eval_prompts=prompts)
    return model, frozen, tok, prompts, trainer


def logps_by_hand(model, prompt_ids, completion, temperature):
    """Log-probabilities of ``completion``'s tokens after ``prompt_ids``: one plain forward of the joined row."""
    ids = torch.tensor([prompt_ids + completion])
    logits = model(input_ids=ids).logits[0].float() / temperature  # (T, V)
    logps = logits.log_softmax(-1)
    start = len(prompt_ids) - 1  # position p predicts token p + 1
    return torch.stack([logps[start + t, tok] for t, tok in enumerate(completion)])


def fixed_batch(prompts, device="cpu"):
    """Two prompts of different lengths, three completions each, of 1 to 5 tokens (padded with EOS = 2)."""
    completions = [[40, 41, 42, 2], [50, 2], [60, 61, 62, 63, 64], [70, 71, 2], [80], [45, 46, 47, 48, 2]]
    width = max(map(len, completions))
    ids = torch.full((6, width), 2)
    mask = torch.zeros((6, width), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = 1
    from lora.generate import pad_left

    p_ids, p_mask = pad_left([prompts[0]["input_ids"], prompts[3]["input_ids"]], 0)
    return completions, {"prompt_ids": p_ids, "prompt_mask": p_mask, "prompt_index": torch.tensor([0, 0, 0, 1, 1, 1]),
                         "completion_ids": ids, "completion_mask": mask}


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_loss_and_gradient_are_the_grpo_objective_written_out(tmp_path, normalization):
    temperature, epsilon, beta = 0.8, 0.2, 0.3
    model, frozen, _, prompts, trainer = setup(tmp_path, adapter_std=0.3, grpo=dict(
        group_size=3, temperature=temperature, epsilon=epsilon, beta=beta, loss_normalization=normalization,
        grpo_iterations=2))
    completions, batch = fixed_batch(prompts)
    prompt_of = [prompts[0]["input_ids"]] * 3 + [prompts[3]["input_ids"]] * 3
    rewards = [1.0, 0.0, 0.5, 0.0, 0.0, 1.0]

    # advantages by hand: reward minus the group mean, over the group's (unbiased) standard deviation + 1e-4
    advantages = []
    for group in (rewards[:3], rewards[3:]):
        mean = sum(group) / 3
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 2)
        advantages += [(r - mean) / (std + 1e-4) for r in group]
    assert torch.allclose(group_advantages(torch.tensor(rewards), 3), torch.tensor(advantages))

    with torch.no_grad():
        ref = [logps_by_hand(frozen, p, c, temperature) for p, c in zip(prompt_of, completions)]
        now = [logps_by_hand(model, p, c, temperature) for p, c in zip(prompt_of, completions)]
    # the sampling policy a little away from the current one, both ways, so that some ratios are clipped
    g = torch.Generator().manual_seed(0)
    old = [n + 0.4 * torch.randn(len(n), generator=g) for n in now]

    # the objective by hand, token by token
    model.zero_grad()
    total, tokens, per_sequence, clipped = 0.0, 0, [], 0
    for i, (p, c) in enumerate(zip(prompt_of, completions)):
        logp = logps_by_hand(model, p, c, temperature)
        sequence = 0.0
        for t in range(len(c)):
            ratio = torch.exp(logp[t] - old[i][t])
            a = advantages[i]
            surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
            clipped += int(bool(torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a < ratio * a))
            kl = torch.exp(ref[i][t] - logp[t]) - (ref[i][t] - logp[t]) - 1
            term = -surrogate + beta * kl
            total, sequence = total + term, sequence + term
        tokens += len(c)
        per_sequence.append(sequence / len(c))
    expected = total / tokens if normalization == "token" else sum(per_sequence) / len(per_sequence)
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert clipped > 0  # the clipping branch is exercised

    def padded(rows):
        out = torch.zeros(batch["completion_ids"].shape)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    full = {**batch, "advantages": torch.tensor(advantages), "old_logps": padded(old), "ref_logps": padded(ref)}
    full["terms"] = torch.tensor(tokens if normalization == "token" else 6)
    for shared_prompt in (True, False):  # the prompt's KV cache shared by its rows, or each row joined whole
        trainer.objective.model.zero_grad()
        if shared_prompt:
            loss = trainer.loss_module(full) / trainer.batches.terms(full)
        else:
            logps = completion_logps(model, trainer.objective.parts, full, temperature, shared_prompt=False)
            loss = grpo_loss(logps, full["old_logps"], full["ref_logps"], full["advantages"],
                             full["completion_mask"], epsilon, beta, normalization)
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
        for n, grad in expected_grads.items():
            got = dict(model.named_parameters())[n].grad  # equal to float32 rounding of the largest entry
            assert float((got - grad).abs().max()) <= 2e-5 * float(grad.abs().max()) + 1e-8, (n, shared_prompt)


def test_reference_is_the_model_with_adapters_off_equal_to_a_frozen_copy(tmp_path):
    model, frozen, _, prompts, trainer = setup(tmp_path, adapter_std=0.3, grpo=dict(beta=0.1, grpo_iterations=2))
    rollout = trainer.plan.rollout(0)
    groups = trainer.plan.step_prompts(0)
    checked = 0
    with torch.no_grad():
        for prompts_of_batch, batch in zip(groups, rollout.batches):
            for row in range(len(batch["completion_ids"])):
                n = int(batch["completion_mask"][row].sum())
                completion = batch["completion_ids"][row, :n].tolist()
                prompt_ids = prompts_of_batch[int(batch["prompt_index"][row])]["input_ids"]
                ref = logps_by_hand(frozen, prompt_ids, completion, 1.0)
                policy = logps_by_hand(model, prompt_ids, completion, 1.0)
                torch.testing.assert_close(batch["ref_logps"][row, :n], ref, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(batch["old_logps"][row, :n], policy, atol=1e-5, rtol=1e-5)
                assert not torch.allclose(ref, policy, atol=1e-3)  # the adapter really acts
                checked += 1
    assert checked == 2 * 4  # batch_size 2 prompts x group_size 4
    # one copy of the weights: the trainer's objective holds the model's parameters and nothing more
    assert sum(p.numel() for p in trainer.objective.parameters()) == sum(p.numel() for p in model.parameters())


def test_skipping_zero_advantage_completions_leaves_the_step_unchanged(tmp_path):
    model, _, _, prompts, trainer = setup(tmp_path, adapter_std=0.3, grpo=dict(group_size=3, beta=0.0))
    completions, batch = fixed_batch(prompts)
    lengths = batch["completion_mask"].sum(1)
    advantages = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.25]), 3)  # the first group: no signal
    skipped = trainer.plan._micro_batch([prompts[0], prompts[3]], batch["completion_ids"], lengths, advantages)
    every_row = {**batch, "advantages": advantages, "terms": lengths.sum()}  # the step with every completion in it
    results = []
    for b in (skipped, every_row):
        model.zero_grad()
        loss = trainer.loss_module(b) / trainer.batches.terms(b)
        loss.backward()
        results.append((len(b["completion_ids"]), float(loss),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (rows_skipped, loss_skipped, grads_skipped), (rows_all, loss_all, grads_all) = results
    assert (rows_skipped, rows_all) == (3, 6)
    assert loss_skipped == pytest.approx(loss_all, rel=1e-6)
    for n in grads_all:
        torch.testing.assert_close(grads_skipped[n], grads_all[n], atol=1e-7, rtol=1e-5, msg=n)


def raises(prompts, completions, **_):
    return [1 / 0 for _ in completions]


def too_few(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)


def not_finite(prompts, completions, **_):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def not_a_list(prompts, completions, **_):
    return 1.0


@pytest.mark.parametrize("fn, message", [
    (raises, r"reward function test_grpo:raises raised ZeroDivisionError: division by zero"),
    (too_few, r"reward function test_grpo:too_few returned 7 scores for 8 completions; return one number per"),
    (not_finite, r"reward function test_grpo:not_finite returned nan for completion 0 .*finite number"),
    (not_a_list, r"reward function test_grpo:not_a_list returned a float; return a list of 8 numbers"),
])
def test_a_misbehaving_reward_stops_the_run_naming_the_function(tmp_path, fn, message):
    model, _, tok, prompts, _ = setup(tmp_path)
    trainer = GRPOTrainer(model, TrainConfig(output_dir=str(tmp_path / "bad"), max_steps=2, batch_size=2,
                                             seq_len=64), GRPOConfig(group_size=4, max_new_tokens=4),
                          prompts, [vowels, fn], tok)
    with pytest.raises(ValueError, match=message):
        trainer.train()


def test_reward_names_and_weights_are_checked():
    with pytest.raises(ValueError, match=r"no built-in reward 'nope'; the built-in ones are exact_match, number_match"):
        load_reward("nope")
    with pytest.raises(ValueError, match=r"cannot import 'no_such_module_x'"):
        load_reward("no_such_module_x:fn")
    with pytest.raises(ValueError, match=r"lora.train.rewards has no 'missing'"):
        load_reward("lora.train.rewards:missing")
    assert load_reward("lora.train.rewards:number_match") is number_match
    with pytest.raises(ValueError, match=r"reward_weights must be 1 finite number\(s\), one per reward function"):
        Rewards(["number_match"], [1.0, 2.0])
    totals, by_name = Rewards([exact_match, length_penalty], [1.0, 0.5]).score(
        ["q", "q"], ["12", " 3 "], {"answer": ["12", "4"]})
    assert by_name == {"exact_match": [1.0, 0.0], "length_penalty": [-0.02, -0.01]}
    assert totals == pytest.approx([0.99, -0.005])


def test_built_in_rewards():
    assert number_match(None, ["13 + 14 = 27", "The sum is 1,204.", "27.0", "no number", "-3"],
                        ["27", "1204", 27, "5", "-3"]) == [1.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"number_match: the answer 'x' is not a number"):
        number_match(None, ["1"], ["x"])
    assert exact_match(None, [" Lyon\n", "lyon"], ["Lyon", "Lyon"]) == [1.0, 0.0]
    assert json_parses(None, ['{"a": 1}', " [1, 2] ", "42", '{"a": 1} and more', "{"], ) == [1.0, 1.0, 0.0, 0.0, 0.0]
    answer = json.dumps({"name": "Ann", "city": "Oslo"})
    assert json_match(None, ['{"city": "Oslo", "name": "Ann"}', '{"name": "Ann", "city": "Oslo"}\nThanks!',
                             '{"name": "Ann"}', "Ann, Oslo"], [answer, {"name": "Ann", "city": "Oslo"}, answer,
                                                               answer]) == [1.0, 1.0, 0.0, 0.0]


def test_settings_and_prompts_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"GRPOConfig.group_size must be an integer >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match=r"GRPOConfig.temperature must be > 0"):
        GRPOConfig(temperature=0)
    with pytest.raises(ValueError, match=r"GRPOConfig.loss_normalization must be one of \('token', 'sequence'\)"):
        GRPOConfig(loss_normalization="mean")
    tok = make_char_tokenizer()
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"question": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: a prompt record needs a 'prompt' key"):
        load_prompts(bad, tok)
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: this record has the columns \[\], the first one \['answer'\]"):
        load_prompts(bad, tok)
    prompts, stats = load_prompts([{"prompt": "short"}, {"prompt": "a much longer prompt than that"}], tok,
                                  max_length=30)
    assert len(prompts) == 1 and stats.dropped == 1
    model = make_llama_for(tok)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    with pytest.raises(ValueError, match=r"a completion can reach .* more than seq_len=20"):
        GRPOTrainer(model, TrainConfig(output_dir=str(tmp_path / "o"), seq_len=20), GRPOConfig(max_new_tokens=16),
                    prompts, [vowels], tok)


def test_training_raises_the_reward_and_reports_it(tmp_path):
    model, _, _, prompts, trainer = setup(tmp_path, max_steps=30, grpo=dict(group_size=8, beta=0.04))
    before = trainer.evaluate()
    result = trainer.train()
    after = result.eval_metrics
    assert after["eval_reward"] > before["eval_reward"] + 0.5
    rewards = [h["reward"] for h in trainer.history]
    assert sum(rewards[-5:]) / 5 > 3 * rewards[0]
    for key in ("reward_std", "groups_with_signal", "completion_length", "clip_ratio", "kl", "reward/test_grpo:vowels"):
        assert key in trainer.history[-1]
    assert trainer.history[-1]["kl"] > 0  # the policy has moved away from the reference
    assert (tmp_path / "out" / "loss_curve.png").is_file()


def test_interrupted_between_updates_of_one_generation_resumes_exactly(tmp_path):
    grpo = dict(beta=0.1, grpo_iterations=2)
    model, _, _, _, trainer = setup(tmp_path / "straight", grpo=grpo, max_steps=6)
    trainer.train()
    straight, history = lora.adapter_state_dict(model), trainer.history

    def stop_at_3(trainer, step, metrics):
        if step == 3:  # the middle of generation 1 (steps 2 and 3): its rollouts go into the checkpoint
            raise KeyboardInterrupt

    model, _, _, _, trainer = setup(tmp_path / "cut", grpo=grpo, max_steps=6)
    trainer.callbacks.append(stop_at_3)
    assert trainer.train().interrupted and trainer.step == 3
    saved = json.loads((tmp_path / "cut" / "out" / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert saved["plan"]["rollouts"][0]["generation"] == 1
    model, _, _, _, trainer = setup(tmp_path / "cut", grpo=grpo, max_steps=6, resume=True)
    trainer.train()
    for key, value in straight.items():
        torch.testing.assert_close(lora.adapter_state_dict(model)[key], value, atol=0, rtol=0, msg=key)
    assert [h["reward"] for h in trainer.history] == [h["reward"] for h in history]
    # other GRPO settings are refused on resume
    _, _, _, _, trainer = setup(tmp_path / "cut", grpo={**grpo, "group_size": 2}, max_steps=6, resume=True)
    with pytest.raises(ValueError, match=r"written with group_size=4; this run has group_size=2"):
        trainer.train()


WORKER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import torch
    import lora
    from lora.train import GRPOTrainer, GRPOConfig, TrainConfig
    from test_grpo import setup, vowels

    tmp = Path({tmp!r})
    rank = int(os.environ["RANK"])
    model, _, tok, prompts, trainer = setup(tmp / "run", max_steps=3, grpo=dict(beta=0.05))
    assert trainer.world == 2
    trainer.train()
    flat = torch.cat([v.flatten() for v in lora.adapter_state_dict(model).values()])
    sys.stdout.write(f"RANK {{rank}} ADAPTER {{float(flat.abs().sum()):.8f}} REWARD {{trainer.history[-1]['reward']:.6f}}\\n")

    def fails_on_rank_1(prompts, completions, **_):
        if int(os.environ["RANK"]) == 1:
            raise RuntimeError("bad row")
        return [0.0] * len(completions)

    bad = GRPOTrainer(model, TrainConfig(output_dir=str(tmp / "bad"), max_steps=2, batch_size=2, seq_len=64),
                      GRPOConfig(group_size=4, max_new_tokens=4), prompts, [fails_on_rank_1], tok)
    try:
        bad.train()
    except ValueError as e:
        sys.stdout.write(f"RANK {{rank}} ERROR {{e}}\\n")
    sys.stdout.flush()
""")


def test_two_processes_train_together_and_stop_together(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS), tmp=str(tmp_path)))
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("a process hung")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    adapters = sorted(line for line in lines if " ADAPTER " in line)
    assert len(adapters) == 2
    # DDP: both processes hold the same adapter, and report the same (all-reduced) reward
    assert adapters[0].split(" ", 2)[2] == adapters[1].split(" ", 2)[2]
    errors = sorted(line for line in lines if " ERROR " in line)
    assert len(errors) == 2, proc.stdout
    for line in errors:
        assert re.search(r"reward function \S*fails_on_rank_1 raised RuntimeError: bad row", line), line
    assert errors[0].startswith("RANK 0") and "(on process 1)" in errors[0]


def test_recipe_learns_on_a_tiny_model_and_writes_metrics(tmp_path):
    tok = make_char_tokenizer()
    make_llama_for(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Say {w}", "answer": w}) + "\n" for w in WORDS))
    sys.path.insert(0, str(TESTS.parent / "recipes"))
    import grpo as recipe

    out = tmp_path / "run"
    metrics = recipe.main([f"model={tmp_path / 'model'}", f"train_file={rows}", f"eval_file={rows}",
                           f"output_dir={out}", f"adapter_dir={tmp_path / 'adapter'}", "rewards=test_grpo:vowels",
                           "max_steps=30", "learning_rate=2e-2", "batch_size=2", "group_size=8", "max_new_tokens=4",
                           "seq_len=64", "r=4", "alpha=8"])
    assert metrics["accuracy_before"] < 0.2 and metrics["accuracy_after"] >= 0.75
    assert metrics["reward_after"] > metrics["reward_before"] + 0.5
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["curve"]) == 30 and saved["rewards"] == ["test_grpo:vowels"]
    assert (Path(saved["adapter"]) / "adapter_model.safetensors").is_file()
    assert (out / "loss_curve.png").is_file()

