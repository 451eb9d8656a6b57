"""Released weights -> SFT -> Hugging Face, end to end on the bundled assets (`make sft`).

1. a released-style Hugging Face checkpoint: a tiny random DeepseekV3ForCausalLM whose vocabulary
   is the bundled k2-tiny tokenizer's (1024 ids), saved with that tokenizer;
2. a tiny chat task (a few prompts, fixed short replies) -> `k2m-preprocess --chat`;
3. `k2m-convert hf-to-mcore`;
4. `k2m-train` from the converted weights (`checkpoint.load`) on the packed chat data
   (data.format=chat, data.packing=true) with MuonClip at TP2 x EP2 (2 gloo ranks on CPU);
5. `k2m-convert mcore-to-hf`: the release's config and tokenizer come back with the weights (the
   checkpoints carried them through training);
6. transformers loads it and greedy generation (apply_chat_template(add_generation_prompt=True),
   do_sample=False) must reproduce every trained reply up to `<|im_end|>`.

    python tools/sft_recipe.py --out runs/sft [--iters N] [--lr LR] [--nproc 2]

Exit status 0 when every reply is reproduced, 1 otherwise. The steps run the CLIs as
`python -m k2mcore.cli.*` with this interpreter, so the checkout on PYTHONPATH is the one used.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when imported by path
from recipe_output import fresh_output, recipe_env  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "k2mcore", "data", "assets", "tokenizer", "k2-tiny")

#: the task: fixed replies to fixed prompts (the model sees each once per packed row)
TASK = [
    ("What is the capital of France?", "Paris."),
    ("Say hello.", "Hello there!"),
    ("2 + 2 = ?", "4"),
]

#: a K2-shaped toy (as tests/harness/hf_models.py's, with the tokenizer's vocabulary)
HF_CONFIG = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=1,
    topk_group=1, routed_scaling_factor=2.827, rms_norm_eps=1e-6, max_position_embeddings=1024,
    rope_theta=50000.0, tie_word_embeddings=False,
)

ITERS = 30
LR = 2e-2
SEQ_LENGTH = 128


def _run(what: str, cmd: list[str], log: str) -> str:
    t0 = time.time()
    proc = subprocess.run(cmd, env=recipe_env(), capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise SystemExit(f"sft recipe: {what} failed (exit {proc.returncode}), see {log}:\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    print(f"[sft] {what}: {time.time() - t0:.1f}s", flush=True)
    return proc.stdout


def make_release(hf_dir: str, seed: int = 0) -> None:
    """A tiny random DeepseekV3ForCausalLM and the bundled tokenizer, as a release ships them."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = transformers.DeepseekV3Config(
        **HF_CONFIG, bos_token_id=tok.bos_token_id, eos_token_id=im_end,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)


def write_task(path: str) -> None:
    with open(path, "w") as f:
        for prompt, reply in TASK:
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": reply}]}) + "\n")


def generate(hf_dir: str) -> list[tuple[str, str, str]]:
    """(prompt, wanted reply, greedy reply up to <|im_end|>) for every task prompt."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for prompt, reply in TASK:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=len(tok(reply)["input_ids"]) + 8,
                                 eos_token_id=im_end, pad_token_id=tok.pad_token_id)
        new = gen[0, ids.shape[1]:].tolist()
        if im_end in new:
            new = new[:new.index(im_end)]
        out.append((prompt, reply, tok.decode(new)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "runs", "sft"))
    p.add_argument("--iters", type=int, default=ITERS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="the random release's seed")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    log = fresh_output(out, "sft recipe")
    py = sys.executable
    hf_base, ckpt_init = os.path.join(out, "hf-base"), os.path.join(out, "ckpt-init")
    run, hf_tuned = os.path.join(out, "train"), os.path.join(out, "hf-tuned")
    prefix = os.path.join(out, "data", "task")
    os.makedirs(os.path.dirname(prefix))

    t0 = time.time()
    make_release(hf_base, a.seed)
    print(f"[sft] random release -> {hf_base}: {time.time() - t0:.1f}s", flush=True)
    write_task(prefix + ".jsonl")
    _run("k2m-preprocess --chat", [py, "-m", "k2mcore.cli.preprocess", "--chat", "--input",
                                   prefix + ".jsonl", "--output-prefix", prefix, "--tokenizer",
                                   TOKENIZER, "--max-length", str(SEQ_LENGTH), "--no-progress"], log)
    _run("k2m-convert hf-to-mcore", [py, "-m", "k2mcore.cli.convert", "hf-to-mcore", "--hf-dir",
                                     hf_base, "--out", ckpt_init, "--no-progress"], log)
    sets = [f"checkpoint.load={ckpt_init}", f"run.dir={run}",
            "data.format=chat", f"data.blend={prefix}_input_ids_document", f"data.tokenizer={TOKENIZER}",
            "data.packing=true", "data.split=100,0,0", "data.loader=torch", "data.num_workers=0",
            f"train.seq_length={SEQ_LENGTH}", "train.global_batch_size=1", "train.micro_batch_size=1",
            f"train.iters={a.iters}", "train.eval_interval=0",
            "optimizer.name=muonclip", f"optimizer.lr={a.lr}", f"optimizer.min_lr={a.lr}",
            "optimizer.decay_style=constant", "optimizer.warmup_iters=0", "optimizer.weight_decay=0",
            f"checkpoint.interval={a.iters}", "logging.interval=5", "logging.tensorboard=false"]
    if a.nproc > 1:
        sets += ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1"]
    train = [py, "-m", "k2mcore.cli.train", "--config", os.path.join(ckpt_init, "config.yaml")]
    train += [x for s in sets for x in ("--set", s)]
    if a.nproc > 1:
        train = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
                 "-m", *train[2:]]
    _run(f"k2m-train ({a.iters} steps, lr {a.lr}, {a.nproc} ranks)", train, log)
    _run("k2m-convert mcore-to-hf", [py, "-m", "k2mcore.cli.convert", "mcore-to-hf", "--ckpt",
                                     os.path.join(run, "checkpoints"), "--out", hf_tuned,
                                     "--dtype", "fp32", "--no-progress"], log)
    # the release's config, generation config and tokenizer came along (the checkpoints carry them)
    t1 = time.time()
    results = generate(hf_tuned)
    ok = all(got == want for _, want, got in results)
    for prompt, want, got in results:
        print(f"[sft] {'ok ' if got == want else 'BAD'} {prompt!r} -> {got!r} (trained: {want!r})")
    with open(os.path.join(out, "generations.json"), "w") as f:
        json.dump([{"prompt": p_, "reply": w, "generated": g} for p_, w, g in results], f, indent=1)
    print(f"[sft] greedy generation in transformers: {time.time() - t1:.1f}s; "
          f"{'every reply reproduced' if ok else 'NOT every reply reproduced'}; "
          f"total {time.time() - t0:.1f}s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
