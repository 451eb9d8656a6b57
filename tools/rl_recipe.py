"""Format SFT -> RL with a verifiable reward -> Hugging Face, end to end on the bundled assets
(`make rl`, docs/rl_loop.md 'The recipe').

1. the task (TASK below): prompts and their answers, a training set and a held-out set of
   120 held-out prompts that share none; `data/sft.jsonl`, conversations that teach the
   answer's format only (each reply a digit drawn regardless of the prompt), -> `k2m-preprocess
   --chat`;
2. `k2m-train` from scratch on them (a K2-shaped toy on the bundled tokenizer, 2 ranks): the
   policy answers in the format but does not solve the task;
3. `k2m-rl` from that checkpoint (2 ranks: DP2 x EP2, so two engines) with the exact-match reward:
   GRPO, one line per iteration, the held-out reward (greedy) before and after each iteration in
   `<out>/metrics.jsonl` (`reward_mean`, `heldout_reward_mean`);
4. `k2m-convert mcore-to-hf` of the last checkpoint to `<out>/hf`, and transformers' greedy
   generation on the held-out prompts must give the last held-out score again.

    python tools/rl_recipe.py --out runs/rl [--rl-iters N] [--seed S] [--skip-export]

Exit status 0 when the held-out reward rose by at least 0.4 and ended at 0.7 or more and
transformers reproduced it (with --rl-iters below the recipe's, the thresholds are not checked).
The steps run the CLIs as `python -m k2mcore.cli.*` with this interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when imported by path
from recipe_output import fresh_output, recipe_env  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = "assets:tokenizer/k2-tiny"
TOKENIZER_DIR = os.path.join(REPO, "k2mcore", "data", "assets", "tokenizer", "k2-tiny")

# -- the task -----------------------------------------------------------------------------------
#: "Most common digit in 3311416211141612?" -> "1": 16 digits of 1-6 (0 is left out: the
#: tokenizer merges "10" and "00"; every other digit is a token of its own), the answer 8 times,
#: each other digit at most 3 times. Chosen by prototyping (docs/rl_loop.md): at this size the
#: majority is learnable by RL from a policy that knows only the format, while "the largest of
#: five digits" is half solved by always saying 9 and copying a position was not learned at all.
ALPHABET, LENGTH, MAJORITY, OTHERS_AT_MOST = "123456", 16, 8, 3
TRAIN, HELDOUT_PER_ANSWER, SFT_CONVERSATIONS = 2000, 20, 960


def _item(rng: random.Random) -> tuple[str, str]:
    m = rng.choice(ALPHABET)
    pool = [d for d in ALPHABET if d != m] * OTHERS_AT_MOST
    digits = rng.sample(pool, LENGTH - MAJORITY) + [m] * MAJORITY
    rng.shuffle(digits)
    return "".join(digits), m


def task(seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts): {"prompt", "answer", "id"}, no prompt in both. The
    held-out set has as many prompts of each answer (20 x 6 = 120), so that a policy that always
    gives one digit scores exactly 1/6."""
    rng, seen = random.Random(seed), set()
    train: list[dict] = []
    heldout: dict[str, list[dict]] = {d: [] for d in ALPHABET}
    while len(train) < TRAIN or any(len(v) < HELDOUT_PER_ANSWER for v in heldout.values()):
        s, m = _item(rng)
        if s in seen:
            continue
        seen.add(s)
        row = {"prompt": f"Most common digit in {s}?", "answer": m, "id": f"maj-{s}"}
        if len(heldout[m]) < HELDOUT_PER_ANSWER:
            heldout[m].append(row)
        elif len(train) < TRAIN:
            train.append(row)
    return train, [row for d in ALPHABET for row in heldout[d]]


def sft_conversations(prompts: list[dict], seed: int = 99) -> list[dict]:
    """The format only: each reply is a digit of 1-6 drawn independently of the prompt."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": p["prompt"]},
                          {"role": "assistant", "content": rng.choice(ALPHABET)}]}
            for p in rng.sample(prompts, SFT_CONVERSATIONS)]


# -- the model and the runs -----------------------------------------------------------------------
MODEL = ["model.hidden_size=64", "model.num_layers=3", "model.num_attention_heads=4",
         "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.ffn_hidden_size=96",
         "model.moe_ffn_hidden_size=32", "model.num_experts=8", "model.moe_topk=2",
         "model.first_k_dense=1",
         # at the usual 0.02 the format-trained toy gives every prompt the same distribution to
         # three decimals and RL only moves which constant digit it says; at 0.1 it learns
         "model.init_std=0.1",
         # plain RoPE: K2's YaRN (x32 over 4,096 positions) is for long contexts; with it this
         # toy's RL stalled for one seed of three (0.575), without it four seeds of four pass
         "model.rope_scaling=null"]
SEQ_LENGTH = 80  # the prompts are 73 tokens (the template's system prompt included), budget 8
SFT = dict(iters=30, gbs=32, lr=3e-3)
RL = dict(iters=30, prompts=32, samples=8, minibatches=4, lr=1e-3, temperature=1.0,
          max_new_tokens=8)
LAYOUT = ["parallel.ep=2"]  # 2 ranks: DP2 (two engines) x EP2


def _torchrun(module: str, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", module]


def _run(what: str, cmd: list[str], log: str, echo: bool = False) -> str:
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=recipe_env(), stdout=subprocess.PIPE, stderr=f, text=True)
        lines = []
        for line in proc.stdout:
            f.write(line)
            lines.append(line)
            if echo and line.startswith(("iteration", "k2m-rl")):
                print(f"[rl] {line.rstrip()}", flush=True)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"rl recipe: {what} failed (exit {proc.returncode}), see {log}:\n"
                         f"{''.join(lines)[-3000:]}")
    print(f"[rl] {what}: {time.time() - t0:.1f}s", flush=True)
    return "".join(lines)


def _sets(items: list[str]) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def rl_config(run_dir: str, data: str, sft_ckpt: str, iters: int) -> list[str]:
    """k2m-rl's overrides of the k2-tiny preset (the tests reuse them): the run in `run_dir`,
    the prompts in `data`, starting from `sft_ckpt`."""
    r = RL
    return MODEL + LAYOUT + [
        f"run.dir={run_dir}", f"checkpoint.load={sft_ckpt}", "data.format=rollouts",
        "data.blend=null", f"data.tokenizer={TOKENIZER}",
        f"rl.prompts={os.path.join(data, 'train.jsonl')}",
        f"rl.heldout_prompts={os.path.join(data, 'heldout.jsonl')}",
        f"rl.samples={r['samples']}", f"rl.minibatches={r['minibatches']}",
        f"train.global_batch_size={r['prompts'] * r['samples'] // r['minibatches']}",
        f"train.micro_batch_size={r['prompts'] * r['samples'] // r['minibatches'] // 2}",
        f"train.iters={iters * r['minibatches']}", f"train.seq_length={SEQ_LENGTH}",
        "train.eval_interval=0", "train.dtype=fp32", f"rl.temperature={r['temperature']}",
        f"rl.max_new_tokens={r['max_new_tokens']}", "rl.reward=exact_match",
        "rl.sync_bucket_mb=0.25",  # the toy's 1.2 MiB in several buckets, as a large model's
        "optimizer.name=adamw", f"optimizer.lr={r['lr']}", f"optimizer.min_lr={r['lr']}",
        "optimizer.decay_style=constant", "optimizer.warmup_iters=0", "optimizer.weight_decay=0",
        f"checkpoint.interval={r['minibatches']}", "checkpoint.keep=1",
        "logging.tensorboard=false", "logging.interval=1000"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "runs", "rl"))
    p.add_argument("--rl-iters", type=int, default=RL["iters"])
    p.add_argument("--seed", type=int, default=1234,
                   help="train.seed of both runs: the initial weights, the SFT order, sampling")
    p.add_argument("--rl-set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more override of the k2m-rl run (repeatable)")
    p.add_argument("--skip-export", action="store_true",
                   help="stop after k2m-rl (no HF export and transformers check)")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    log = fresh_output(out, "rl recipe")
    data = os.path.join(out, "data")
    os.makedirs(data)
    py = sys.executable
    t0 = time.time()

    train, heldout = task()
    for name, rows in (("train", train), ("heldout", heldout)):
        with open(os.path.join(data, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(data, "sft.jsonl"), "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in sft_conversations(train))
    print(f"[rl] task: {len(train)} training prompts, {len(heldout)} held-out "
          f"(e.g. {train[0]['prompt']!r} -> {train[0]['answer']!r})", flush=True)
    prefix = os.path.join(data, "sft")
    _run("k2m-preprocess --chat (format-only SFT data)",
         [py, "-m", "k2mcore.cli.preprocess", "--chat", "--input", prefix + ".jsonl",
          "--output-prefix", prefix, "--tokenizer", TOKENIZER_DIR, "--max-length",
          str(SEQ_LENGTH), "--no-progress"], log)
    sft_dir = os.path.join(out, "sft")
    s = SFT
    _run(f"k2m-train: format SFT ({s['iters']} steps)", _torchrun("k2mcore.cli.train", 2) + [
        "--config", "k2-tiny"] + _sets(MODEL + LAYOUT + [
            f"run.dir={sft_dir}", "data.format=chat", f"data.blend={prefix}_input_ids_document",
            f"data.tokenizer={TOKENIZER}", "data.split=100,0,0", "data.loader=torch",
            "data.num_workers=0", f"train.seq_length={SEQ_LENGTH}",
            f"train.global_batch_size={s['gbs']}", f"train.micro_batch_size={s['gbs'] // 2}",
            f"train.iters={s['iters']}", "train.eval_interval=0", "train.dtype=fp32",
            f"train.seed={a.seed}",
            "optimizer.name=adamw", f"optimizer.lr={s['lr']}", f"optimizer.min_lr={s['lr']}",
            "optimizer.decay_style=constant", "optimizer.warmup_iters=0", "optimizer.weight_decay=0",
            f"checkpoint.interval={s['iters']}", "logging.tensorboard=false",
            "logging.interval=1000"]), log)
    _run(f"k2m-rl ({a.rl_iters} iterations)", _torchrun("k2mcore.cli.rl", 2) + [
        "--config", "k2-tiny"] + _sets(rl_config(out, data, os.path.join(sft_dir, "checkpoints"),
                                                a.rl_iters) + [f"train.seed={a.seed}", *a.rl_set]),
         log, echo=True)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    scores = [r["heldout_reward_mean"] for r in rows if "heldout_reward_mean" in r]
    first, last = scores[0], scores[-1]
    print(f"[rl] held-out reward {first:.3f} -> {last:.3f} (rise {last - first:+.3f}) over "
          f"{a.rl_iters} iterations", flush=True)
    ok = True
    if not a.skip_export:
        hf = os.path.join(out, "hf")
        _run("k2m-convert mcore-to-hf", [py, "-m", "k2mcore.cli.convert", "mcore-to-hf",
                                         "--ckpt", os.path.join(out, "checkpoints"), "--out", hf,
                                         "--dtype", "fp32", "--tokenizer", TOKENIZER_DIR,
                                         "--no-progress"], log)
        again = heldout_score(hf, heldout)
        ok = abs(again - last) < 1e-9
        print(f"[rl] transformers on {hf}: held-out reward {again:.3f} "
              f"({'the same' if ok else 'NOT the same'} as the run's last)", flush=True)
    if a.rl_iters >= RL["iters"]:
        ok = ok and last - first >= 0.4 and last >= 0.7
    print(f"[rl] {'done' if ok else 'FAILED'} in {time.time() - t0:.0f}s", flush=True)
    return 0 if ok else 1


def heldout_score(hf_dir: str, heldout: list[dict]) -> float:
    """transformers' greedy answers (generate, KV cache) to the held-out prompts, exact match."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    right = 0
    for item in heldout:
        ids = tok.apply_chat_template([{"role": "user", "content": item["prompt"]}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=RL["max_new_tokens"], eos_token_id=end,
                                 pad_token_id=tok.pad_token_id)
        new = gen[0, ids.shape[1]:].tolist()
        new = new[:new.index(end)] if end in new else new  # as k2m-rl decodes an answer
        right += tok.decode(new, skip_special_tokens=True).strip() == item["answer"]
    return right / len(heldout)


if __name__ == "__main__":
    sys.exit(main())
