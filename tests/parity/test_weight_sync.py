"""Weight sync from the trainer's layout to the transformers rollout engine (sync_probe.py,
inside the shared launches): the engine's tensors are `k2m-convert mcore-to-hf`'s of the same
step bit for bit, and its log-probabilities are the trainer's, with and without R3."""
from __future__ import annotations

import pytest
from sync_probe import RUNS

# the engine (transformers) and the trainer (megatron) compute the same fp32 model in another
# order of operations: fp32 rounding on log-probabilities of order 7
LOGPROB_ATOL = 2e-5


@pytest.mark.parametrize("layout", RUNS)
def test_synced_engine_holds_the_export_bit_for_bit(sync_results, layout):
    r = sync_results[layout]
    assert r["names_equal"] and r["tensors"] == 129
    assert r["bit_mismatches"] == 0
    assert r["bias_nonzero"]  # the routers' expert bias (a buffer) travels too


@pytest.mark.parametrize("layout", RUNS)
def test_sync_moves_buckets_within_the_limit(sync_results, layout):
    """Several buckets; each within rl.sync_bucket_mb except a single entry larger than it (the
    embedding, the output layer, the dense layer's gated MLP). Bytes from other ranks: none at
    1 rank, some when the weights are spread."""
    r = sync_results[layout]
    assert r["buckets"] == len(r["bucket_bytes"]) > 10
    singles = [b for b in r["bucket_bytes"] if b > r["limit"]]
    assert len(singles) == 3 and r["buckets"] - len(singles) >= 10
    assert (r["bytes_moved"] == 0) == (layout == "1rank")
    if layout != "1rank":
        assert 0 < r["bytes_moved"] < sum(r["bucket_bytes"])


@pytest.mark.parametrize("layout", RUNS)
def test_engine_logprobs_equal_the_trainers(sync_results, layout):
    """The engine's sampling log-probabilities (T = 0.9) against k2mcore.rl.logprobs of the
    same rollouts in the layout: plain, and with R3 replaying the routes the engine captured."""
    r = sync_results[layout]
    assert sum(r["responses"]) > 20
    assert r["logprob_diff"]["plain"] < LOGPROB_ATOL
    assert r["logprob_diff"]["r3"] < LOGPROB_ATOL
