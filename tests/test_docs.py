"""README.md and docs/ name only paths, config keys and command flags that exist (the checker:
tests/harness/docs_check.py), and the checker finds a planted stale one of each."""
from __future__ import annotations

from harness import docs_check


def test_the_docs_name_only_what_exists():
    texts = {path: open(path).read() for path in docs_check.doc_files()}
    assert len(texts) >= 10
    assert docs_check.problems(texts) == []


def test_a_stale_path_key_and_flag_are_found():
    planted = "\n".join([
        "Run `k2m-train --config k2-tiny --set optimizer.muon.momentum=0.9` (fine), and see",
        "`k2mcore/optim/muonclip/sharded.py` and `tests/harness/` (fine).",
        "Stale: `k2mcore/optim/distributed.py`, `optimizer.muon.nesterov_steps`,",
        "`checkpoint.{dir,keep,interval_s}`, and",
        "```bash",
        "launch/local.sh 4 --config k2-tiny --set parallel.tpp=2 \\",
        "    --resume-from runs/x",
        "k2m-convert mcore-to-hf --ckpt C --out D --hf-dir E   # --hf-dir is hf-to-mcore's",
        "k2m-plan --config kimi-k2 --world-size 256 --search --top 3",
        "```",
    ])
    assert docs_check.problems({"planted.md": planted}) == [
        "planted.md: k2m-convert mcore-to-hf has no flag --hf-dir",
        "planted.md: k2m-train has no flag --resume-from",
        "planted.md: no config key checkpoint.interval_s",
        "planted.md: no config key optimizer.muon.nesterov_steps",
        "planted.md: no config key parallel.tpp",
        "planted.md: no such path k2mcore/optim/distributed.py",
    ]
