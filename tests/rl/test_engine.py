"""The transformers rollout engine (sampling, log-probabilities, captured routes, versions), the
rewards, the prompts file and k2m-rl's one-line refusals before any process group."""
from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch

from harness.hf_models import hf_config, random_hf_model
from k2mcore.errors import RLError
from k2mcore.rl.engine import Prompt, Sampling, check_version
from k2mcore.rl.hf_engine import TransformersEngine, _checkpoint_views
from k2mcore.rl.rewards import exact_match, judge_reward, load_reward, math_answer, parse_number, score

STOP = 7
PROMPTS = [Prompt(tuple(range(10, 19)), "a"), Prompt(tuple(range(40, 45)), "b"),
           Prompt(tuple(range(90, 102)), "c", budget=5)]


@pytest.fixture(scope="module")
def models():
    """A random transformers DeepseekV3 (its expert bias and norms random too) and an engine
    synced from its checkpoint-named tensors."""
    ref = random_hf_model(hf_config(), seed=4)
    engine = TransformersEngine(ref.config.to_dict(), stop_ids=[STOP])
    engine.update_weights(_checkpoint_views(ref).items(), version=1)
    return ref, engine


def _router_picks(model, ids: list[int]) -> list[torch.Tensor]:
    """The top-k experts transformers' router picks at each position, per MoE layer, in one
    forward of the whole sequence."""
    picks = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: picks.append(o[2]))
             for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return picks


def test_samples_logprobs_and_routes_are_transformers_own(models):
    """Each sampled answer's log-probabilities are log softmax(logits / T) of one full forward
    of prompt + answer, and its routes (captured during the cached decoding) are the experts
    transformers' router picks in that forward, at every position and MoE layer."""
    ref, engine = models
    rollouts = engine.generate(PROMPTS, 4, Sampling(temperature=0.8, max_new_tokens=10, seed=1,
                                                    routes=True))
    assert [r.group for r in rollouts] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert max(len(r.response) for r in rollouts[8:]) <= 5  # the prompt's own budget
    checked = 0
    for r in rollouts:
        ids = r.prompt + r.response
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0, :-1].float() / 0.8
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        got = torch.tensor(r.logprobs)
        assert (want[len(r.prompt) - 1:] - got).abs().max() < 2e-5
        routes = torch.tensor(r.routes)  # [positions, layers, k]
        assert routes.shape == (len(ids) - 1, 2, 2)
        for layer, picks in enumerate(_router_picks(ref, ids[:-1])):
            assert torch.equal(picks.sort(-1).values, routes[:, layer].sort(-1).values)
            checked += picks.shape[0]
        assert r.truncated == (r.response[-1] != STOP)
    assert checked > 200


def test_sampling_is_seeded_per_prompt(models):
    """A prompt's answers depend on the seed and the prompt, not on the other prompts of the
    call (so not on how prompts are split over replicas); greedy answers are the argmax."""
    _, engine = models
    s = Sampling(temperature=1.0, max_new_tokens=8, seed=3)
    together = engine.generate(PROMPTS, 3, s)
    alone = engine.generate(PROMPTS[1:2], 3, s)
    assert [r.response for r in together[3:6]] == [r.response for r in alone]
    other = engine.generate(PROMPTS[1:2], 3, Sampling(temperature=1.0, max_new_tokens=8, seed=4))
    assert [r.response for r in other] != [r.response for r in alone]
    greedy = engine.generate(PROMPTS[:1], 2, Sampling(temperature=0.0, max_new_tokens=6))
    assert greedy[0].response == greedy[1].response


def test_versions_must_increase_and_match(models):
    _, engine = models
    with pytest.raises(RLError, match="engine at weight version 1 was sent version 1: "
                                      "versions must increase"):
        engine.update_weights(iter(()), version=1)
    with pytest.raises(RLError, match="holds weight version 1 but the policy is at version 2"):
        check_version(engine, 2, "rollouts")
    fresh = TransformersEngine(engine.model.config.to_dict(), stop_ids=[STOP])
    with pytest.raises(RLError, match="holds no weights"):
        fresh.generate(PROMPTS, 2, Sampling())


def test_an_incomplete_or_misnamed_sync_is_refused(models):
    ref, engine = models
    views = list(_checkpoint_views(ref).items())
    fresh = TransformersEngine(engine.model.config.to_dict(), stop_ids=[STOP])
    with pytest.raises(RLError, match="left 1 engine tensors unset"):
        fresh.update_weights(views[:-1], version=1)
    with pytest.raises(RLError, match="no tensor model.layers.0.bogus"):
        fresh.update_weights([("model.layers.0.bogus", torch.zeros(1))], version=2)
    assert fresh.version == -1  # a failed sync leaves an engine that refuses to generate


@pytest.mark.parametrize("answer,response,want", [
    ("42", "42", 1.0), ("42", " 42 ", 1.0), ("42", "42.", 0.0), ("42", "43", 0.0)])
def test_exact_match(answer, response, want):
    assert exact_match(Prompt((1,), "k", answer=answer), response) == want


@pytest.mark.parametrize("response,want", [
    ("so x = 1/2", Fraction(1, 2)), ("0.50", Fraction(1, 2)), ("\\boxed{3} not 4", 3),
    ("1,234 apples", 1234), ("-7", -7), ("no number", None)])
def test_math_answer_parsing(response, want):
    assert parse_number(response) == want


def test_math_answer_compares_values():
    p = Prompt((1,), "k", answer="1/2")
    assert [math_answer(p, r) for r in ("0.5", "\\boxed{1/2}", "2/4", "0.6", "")] == \
        [1.0, 1.0, 1.0, 0.0, 0.0]


def test_a_reward_that_raises_names_the_prompt():
    def broken(prompt, response):
        raise KeyError("rubric")

    prompts = [Prompt((1,), "q1", text="fine"), Prompt((2,), "q2", text="What is 2+2?")]
    with pytest.raises(RLError) as err:
        score(lambda p, r: 1.0 if p.key == "q1" else broken(p, r), prompts, ["a", "b"])
    assert "prompt 'q2' ('What is 2+2?'): KeyError" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(RLError, match="returned nan for prompt 'q1'"):
        score(lambda p, r: float("nan"), prompts[:1], ["a"])


def test_reward_specs_and_the_judge_hook():
    assert load_reward("exact_match") is exact_match and load_reward("math") is math_answer
    assert load_reward("k2mcore.rl.rewards:exact_match") is exact_match
    calls = []

    def judge(prompt_text, response, rubric):
        calls.append((prompt_text, response, rubric))
        return 0.25

    reward = judge_reward(judge, "be concise")
    assert score(reward, [Prompt((1,), "k", text="hi")], ["hello"]) == [0.25]
    assert calls == [("hi", "hello", "be concise")]


@pytest.mark.parametrize("lines,overrides,needle", [
    ([{"prompt": "x" * 400, "answer": "1"}], [],
     "p.jsonl:1: the prompt has"),
    ([{"prompt": "hi", "answer": "1", "budget": 60}], [],
     "p.jsonl:1: the prompt has"),
    ([{"prompt": "hi"}, {"messages": [{"role": "assistant", "content": "x"}]}], [],
     "p.jsonl:2: 'messages' must be system and user messages"),
    ([{"prompt": "hi", "id": "a"}, {"prompt": "ho", "id": "a"}], [],
     "p.jsonl:2: id 'a' already used at line 1"),
    ([{"prompt": "hi"}], ["rl.reward=nomodule_xyz:fn"], "rl.reward='nomodule_xyz:fn': cannot import"),
    ([{"prompt": "hi"}], ["rl.reward=k2mcore.rl.rewards:BUILTIN"], "is not callable"),
    ([{"prompt": "hi"}], ["rl.reward=exact"], "rl.reward='exact': not one of exact_match, math"),
    ([{"prompt": 3}], [], "p.jsonl:1: 'prompt' must be a string"),
    ([{"prompt": "hi", "messages": []}], [], "p.jsonl:1: a prompt line has either 'prompt'"),
    ([{"prompt": "hi", "answer": [1]}], [], "p.jsonl:1: 'answer' must be a string or a number"),
    ([{"prompt": "hi", "id": True}], [], "p.jsonl:1: 'id' must be a string or an integer"),
    ([{"prompt": "hi", "budget": 0}], [], "p.jsonl:1: 'budget' must be a positive integer"),
    ([], [], "p.jsonl holds no prompt"),
    ([{"prompt": "hi"}], ["rl.prompts=/nonexistent/p.jsonl"], "rl.prompts: /nonexistent/p.jsonl not found"),
    ([{"prompt": "hi"}], ["rl.prompts=null"], "rl.prompts: k2m-rl needs a prompts file"),
    ([{"prompt": "hi"}], ["data.tokenizer=assets:tokenizer/k2-tiny.tiktoken"],
     "is not a tokenizer directory (k2m-rl renders prompts with its chat template)"),
    ([{"prompt": "hi"}], ["rl.samples=3"], "rl.samples=3 does not divide the rollout batch"),
    ([{"prompt": "hi"}], ["train.iters=3"], "train.iters=3: k2m-rl runs whole iterations"),
])
def test_k2m_rl_refuses_bad_input_in_one_line(tmp_path, capsys, lines, overrides, needle):
    """Before torch.distributed or megatron start: the prompt that does not fit with its budget,
    bad prompt lines, an unknown reward, sizes that do not make whole groups or iterations."""
    from k2mcore.cli.rl import main

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) or "\n")
    args = ["--config", "k2-tiny"]
    for item in ["data.format=rollouts", "data.tokenizer=assets:tokenizer/k2-tiny",
                 f"rl.prompts={path}", "train.seq_length=64", "rl.max_new_tokens=16",
                 "rl.samples=4", "rl.minibatches=2", "train.iters=4", "train.eval_interval=0",
                 *overrides]:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("k2m-rl: error: ") and needle in err and "\n" not in err, err


def test_temperature_schedule_and_prompt_order():
    """rl.temperature_final: linear from rl.temperature at the first iteration to it at the last;
    the prompts: P per iteration in a shuffled order per epoch, every prompt once an epoch."""
    from k2mcore.config.loader import load_config
    from k2mcore.rl.loop import Plan, temperature

    cfg = load_config("k2-tiny", ["data.format=rollouts", "rl.temperature=1.2",
                                  "rl.temperature_final=0.8", "train.eval_interval=0"])
    assert [round(temperature(cfg, i, 5), 6) for i in range(5)] == [1.2, 1.1, 1.0, 0.9, 0.8]
    cfg.rl.temperature_final = None
    assert temperature(cfg, 3, 5) == 1.2
    prompts = [Prompt((i,), f"p{i}") for i in range(10)]
    plan = Plan(prompts, [], exact_match, [STOP], 0, per_iteration=4, iterations=5)
    order = [p.key for i in range(5) for p in plan.batch(i, seed=7)]
    assert sorted(order[:10]) == sorted(order[10:20]) == sorted(p.key for p in prompts)
    assert order[:10] != order[10:20]  # each epoch its own order
    assert [p.key for p in plan.batch(2, seed=7)] == order[8:12]  # resumable from the position
