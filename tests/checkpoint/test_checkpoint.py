"""Checkpoints: resharding, exact resume, atomic saves, keep-K, clear errors, no pickle.

Two launches of ckpt_worker.py: 4 ranks (train and save at TP2 x EP2, interrupt a save, resume
at the same layout, at PP2 x VPP2 x EP2 and at CP2 x EP2, which saves again) and 1 rank (resume
at 1 rank, also the CP2 run's checkpoint, damaged copies, the non-distributed optimizer). Filesystem-only behaviour is unit-tested without launching anything.
"""
from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch

from harness.launching import launch
from k2mcore import checkpoint as ck

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ckpt_worker.py")
RESHARDED = ["1rank", "pp2-vpp2-ep2", "cp2-ep2"]
LOSS_RTOL = 1e-6  # fp32 reductions in another order
PARAM_ATOL = 1e-6  # after two AdamW steps of ~2e-4 each; a wrong optimizer state is ~1e-4 off


def _launch(out: str, phase: str, nproc: int) -> str:
    return launch(WORKER, ["--out", out, "--phase", phase], nproc, what=f"{phase} phase",
                  timeout=600)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt"))
    log = _launch(out, "save", 4) + _launch(out, "load", 1)
    saved = torch.load(os.path.join(out, "save_phase.pt"), weights_only=True)
    loaded = torch.load(os.path.join(out, "load_phase.pt"), weights_only=True)
    return {"out": out, "log": log, "save": saved, "same": saved["same_layout"],
            "pp2-vpp2-ep2": saved["other_layout"], "cp2-ep2": saved["cp_layout"],
            "1rank": loaded}


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_exact(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for key, ref in want.items():
        assert not torch.isnan(got[key]).any(), f"{what} {key}: part of it was never gathered"
        assert torch.equal(got[key], ref), f"{what} {key}: {(got[key] - ref).abs().max():.3e}"


# --------------------------------------------------------------------------------------------
# Resume and reshard
def test_same_layout_resume_is_bit_exact(results):
    ref, got = results["save"], results["same"]
    assert got["meta"]["step"] == 2 and got["meta"]["consumed_samples"] == 8
    assert got["meta"]["rng_restored"] and got["rng_equal_all_ranks"]
    _assert_exact(got["loaded"]["params"], ref["step2"]["params"], "params")
    _assert_exact(got["loaded"]["optim"], ref["step2"]["optim"], "optimizer")
    assert got["losses"] == ref["losses"]
    assert _max_diff(got["after"], ref["after"]) == 0.0


@pytest.mark.parametrize("layout", RESHARDED)
def test_resharded_load_restores_model_and_optimizer_exactly(results, layout):
    """TP2 x EP2 (DP2) -> another layout: weights, fp32 main params, exp_avg and exp_avg_sq of
    every parameter equal the saved ones (resharding only moves data)."""
    ref, got = results["save"]["step2"], results[layout]
    assert got["meta"]["step"] == 2 and not got["meta"]["rng_restored"]
    _assert_exact(got["loaded"]["params"], ref["params"], "params")
    _assert_exact(got["loaded"]["optim"], ref["optim"], "optimizer")
    kinds = {key.split(".")[2] for key in ref["optim"]}
    assert kinds == {"param", "exp_avg", "exp_avg_sq"}, kinds  # megatron's names


@pytest.mark.parametrize("layout", RESHARDED)
def test_resharded_training_continues_with_the_same_losses(results, layout):
    ref, got = results["save"], results[layout]
    assert got["lr"] == ref["lr3"]  # the scheduler resumed at step 2
    for have, want in zip(got["losses"], ref["losses"]):
        assert abs(have - want) <= LOSS_RTOL * abs(want), (got["losses"], ref["losses"])
    moved = _max_diff(ref["after"], ref["step2"]["params"])
    diff = _max_diff(got["after"], ref["after"])
    print(f"{layout}: losses {got['losses']} (saved run {ref['losses']}), "
          f"weights after 2 more steps within {diff:.1e} (they moved {moved:.1e})")
    assert moved > 100 * PARAM_ATOL  # the comparison can tell a wrong optimizer state apart
    assert diff <= PARAM_ATOL


def test_checkpoint_saved_at_cp2_resumes_at_cp1(results):
    """The reverse of the cp2-ep2 resume above: what the CP2 run saved at step 4 loads on 1 rank
    exactly, and two more steps give the CP2 run's losses and weights."""
    cp2, got = results["cp2-ep2"], results["1rank"]["from_cp2"]
    assert got["meta"]["step"] == 4 and got["meta"]["consumed_samples"] == 16
    _assert_exact(got["loaded"]["params"], cp2["saved"]["params"], "params")
    _assert_exact(got["loaded"]["optim"], cp2["saved"]["optim"], "optimizer")
    assert got["lr"] == cp2["lr_next"]
    for have, want in zip(got["losses"], cp2["later_losses"]):
        assert abs(have - want) <= LOSS_RTOL * abs(want), (got["losses"], cp2["later_losses"])
    assert _max_diff(got["after"], cp2["later_after"]) <= PARAM_ATOL


def test_save_hands_no_optimizer_state_to_collectives(results):
    """Each rank writes the optimizer state it holds: saving passes no tensor through a
    collective (the commit's few small objects are pickled), while megatron's gathered form,
    the control, moves at least each rank's own state through them."""
    for rank, (saved, control, held) in enumerate(results["save"]["collective_bytes"]):
        print(f"rank {rank}: save {saved} B through collectives, megatron's gathered form "
              f"{control} B, optimizer state held {held} B")
        assert saved == 0
        assert control >= held > 0


def test_optimizer_state_is_saved_as_owned_boxes(results):
    meta = json.load(open(os.path.join(results["out"], "ckpt", "step_00000002", "metadata.json")))
    assert meta["optimizer"]["sharding"] == "owned_boxes"


def test_non_distributed_optimizer_round_trip(results):
    plain = results["1rank"]["plain_adam"]
    assert plain["losses"][0] == plain["losses"][1]
    assert _max_diff(*plain["after"]) == 0.0


def test_load_from_a_root_takes_its_newest_checkpoint(results):
    assert results["1rank"]["latest_from_root"] == 4


def test_timings_are_reported(results):
    save_s, load_s = results["save"]["save_s"], results["1rank"]["load_s"]
    print(f"k2-tiny: save at 4 ranks {save_s[1]:.2f} s, load at 4 ranks "
          f"{results['same']['load_s']:.2f} s, at 1 rank {load_s:.2f} s")
    assert max(save_s) < 30 and load_s < 30


# --------------------------------------------------------------------------------------------
# Atomicity, pruning, errors, pickle
def test_interrupted_save_leaves_the_previous_checkpoint_newest(results):
    r = results["save"]
    assert "step_00000005: save failed before it was complete" in r["interrupted_error"]
    assert ".tmp_step_00000005" in r["after_interrupt"]
    assert "step_00000005" not in r["after_interrupt"]
    assert r["latest_after_interrupt"].endswith("step_00000004")
    assert "incomplete checkpoint (no metadata.json)" in results["1rank"]["errors"]["tmp_dir"]


def test_keep_last_two(results):
    assert results["save"]["after_keep"] == ["step_00000002", "step_00000004"]


DAMAGE = {
    "no_marker": ("step_00000002",
                  "incomplete checkpoint (no metadata.json) — it was not finished"),
    "bad_marker": ("step_00000002/metadata.json", "corrupt checkpoint metadata"),
    "truncated": (".distcp", "truncated"),
    "flipped": (".distcp", "CRC32 differs"),
    "missing_rng": ("rng/rank_00000.json", "missing from the checkpoint"),
    "other_sharding": ("step_00000002", "optimizer state saved in the 'fully_reshardable' "
                                        "form; this version reads only 'owned_boxes'"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_checkpoint_gives_one_line_naming_the_file(results, name):
    message = results["1rank"]["errors"][name]
    where, what = DAMAGE[name]
    assert message is not None, f"{name}: loaded without error"
    assert "\n" not in message and where in message and what in message, message
    assert f"bad/{name}/step_00000002" in message, message


@pytest.mark.parametrize("name,expected", [
    ("pickle_metadata", f"{io.open.__module__}.open is not allowed in DCP metadata"),
    ("pickle_common", f"dist/common.pt: refused to unpickle {io.open.__module__}.open"),
    ("pickle_sharded_object", f"refused to unpickle {io.open.__module__}.open"),
])
def test_planted_pickle_is_refused_not_run(results, name, expected):
    errors = results["1rank"]["errors"]
    assert errors[name] is not None and expected in errors[name], errors[name]
    assert not errors["payload_ran"]
    assert not os.path.exists(os.path.join(results["out"], "pickle_payload_ran"))


# --------------------------------------------------------------------------------------------
# Filesystem-only units (no launch)
def _fake(root, name: str, marker: object = None) -> str:
    path = os.path.join(root, name)
    os.makedirs(path)
    if marker is not None:
        with open(os.path.join(path, ck.MARKER), "w") as f:
            f.write(marker if isinstance(marker, str) else json.dumps(marker))
    return path


def test_latest_checkpoint_ignores_temporary_incomplete_and_unreadable(tmp_path):
    good = {"format": ck.FORMAT}
    assert ck.latest_checkpoint(str(tmp_path / "missing")) is None
    _fake(tmp_path, "step_00000003", good)
    _fake(tmp_path, "step_00000004", good)
    _fake(tmp_path, "step_00000005")  # no marker: unfinished
    _fake(tmp_path, "step_00000006", "{truncated")  # unreadable marker
    _fake(tmp_path, ".tmp_step_00000007", good)
    _fake(tmp_path, "notes")
    assert ck.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_00000004")
    assert ck.resolve_checkpoint(str(tmp_path)) == str(tmp_path / "step_00000004")
    with pytest.raises(ck.CheckpointError, match="notes: holds no complete checkpoint"):
        ck.resolve_checkpoint(str(tmp_path / "notes"))


def test_prune_keeps_the_newest_and_drops_temporaries(tmp_path):
    good = {"format": ck.FORMAT}
    for step in (1, 2, 3, 10):
        _fake(tmp_path, f"step_{step:08d}", good)
    _fake(tmp_path, "step_00000011")  # incomplete: not counted, not deleted by pruning
    _fake(tmp_path, ".tmp_step_00000012")
    _fake(tmp_path, ".trash_step_00000000", good)  # a crash's leftover: removed too
    committer = ck.Committer()
    trash = committer.prune(str(tmp_path), keep=2, newest=str(tmp_path / "step_00000010"))
    # set aside at once (renamed: no longer a checkpoint), deleted by remove()
    assert ck.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_00000010")
    assert sorted(os.path.basename(t) for t in trash) == [
        ".trash_step_00000000", ".trash_step_00000001", ".trash_step_00000002",
        ".trash_tmp_step_00000012"]
    committer.remove(trash)
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000010", "step_00000011"]
    assert committer.prune(str(tmp_path), keep=0, newest=str(tmp_path / "step_00000010")) == []
    assert len(os.listdir(tmp_path)) == 3  # 0: keep all


def test_validate_reports_the_missing_marker(tmp_path):
    path = _fake(tmp_path, "step_00000001")
    with pytest.raises(ck.CheckpointError, match=r"step_00000001: incomplete checkpoint"):
        ck.validate_checkpoint(path)


class _Evil:
    def __init__(self, mark: str) -> None:
        self.mark = mark

    def __reduce__(self):
        return (open, (self.mark, "w"))


def test_dcp_metadata_reader_refuses_unlisted_globals(tmp_path):
    mark, path = str(tmp_path / "ran"), str(tmp_path / ".metadata")
    with open(path, "wb") as f:
        pickle.dump(_Evil(mark), f)
    with pytest.raises(ck.CheckpointError, match="io.open is not allowed"):
        ck.read_dcp_metadata(path)
    assert not os.path.exists(mark)


def test_checksums_taken_while_writing_equal_the_files_and_zip_crcs_stay_on(tmp_path):
    """The writer's manifest (size and CRC32 folded into the stream as DCP writes) equals a
    read-back of every file; torch.save's zip CRC32 is off only inside the writer."""
    import warnings

    from torch.distributed.checkpoint import load, save
    from torch.utils.serialization import config

    from k2mcore.checkpoint.format import file_entry
    from k2mcore.checkpoint.writer import checksumming_writer

    writer = checksumming_writer(str(tmp_path))
    state = {"w": torch.randn(300, 70), "b": torch.arange(1000), "view": torch.randn(50)[10:30]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed ... assuming a single process"
        save(state, storage_writer=writer)
    on_disk = {f: file_entry(str(tmp_path / f)) for f in os.listdir(tmp_path)}
    assert writer.checksums == on_disk and ".metadata" in on_disk, (writer.checksums, on_disk)
    assert config.save.compute_crc32
    back = {k: torch.zeros_like(v) for k, v in state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load(back, checkpoint_id=str(tmp_path))
    assert all(torch.equal(back[k], v) for k, v in state.items())


def _stream_roundtrip(path, direct=True, seed=0):
    """Writes of every size around the staging chunk and the O_DIRECT block, with flushes
    (torch.save's, which write nothing): the file and the folded size and CRC32 equal what was
    written."""
    import random
    import zlib

    from k2mcore.checkpoint.writer import ALIGN, CHUNK, ChecksummingStream

    rng = random.Random(seed)
    stream = ChecksummingStream(str(path), sync=True, direct=direct)
    data = bytearray()
    for size in [1, ALIGN - 1, ALIGN, ALIGN + 1, CHUNK - 3, CHUNK, 2 * CHUNK + 5, 17, 0, 100]:
        chunk = rng.randbytes(size)
        assert stream.write(memoryview(chunk)) == size
        data += chunk
        if rng.random() < 0.5:
            stream.flush()
    stream.close()
    assert path.read_bytes() == bytes(data)
    assert (stream.size, stream.crc) == (len(data), zlib.crc32(data))
    return stream


def test_direct_stream_writes_exactly_the_bytes_and_their_checksum(tmp_path):
    assert _stream_roundtrip(tmp_path / "direct").direct  # this ext4 takes O_DIRECT
    assert not _stream_roundtrip(tmp_path / "buffered", direct=False).direct


def test_direct_stream_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    """A filesystem that refuses O_DIRECT at open, or refuses a write's alignment, gets the
    same bytes through buffered writes."""
    import errno

    real_open, real_write = os.open, os.pwrite

    def no_direct_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct_open)
    assert not _stream_roundtrip(tmp_path / "at-open").direct
    monkeypatch.setattr(os, "open", real_open)

    refused = []

    def refusing_write(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_write)
    assert not _stream_roundtrip(tmp_path / "at-write").direct and 1 <= len(refused) <= 2


def test_direct_stream_raises_the_writing_threads_error(tmp_path, monkeypatch):
    """A write that fails in the thread writing out a staged chunk (a full disk) is raised in
    the caller, by the write or close that follows, and the file is closed."""
    import errno

    from k2mcore.checkpoint.writer import CHUNK, ChecksummingStream

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    stream = ChecksummingStream(str(tmp_path / "f"), sync=True)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(4):
            stream.write(bytes(CHUNK))
        stream.close()
    stream.abort()
    assert stream.closed


def test_gc_pause_holds_the_collector_off_and_restores_what_was_there():
    """Saves hold the cyclic GC off until their commit; a collector the caller had disabled
    stays disabled, and a second pause (an async save's, then its commit's) changes nothing."""
    import gc

    from k2mcore.checkpoint.pending import GcPause, gc_paused

    assert gc.isenabled()
    pause = GcPause()
    pause.pause()
    pause.pause()
    assert not gc.isenabled()
    pause.resume()
    assert gc.isenabled()
    pause.resume()  # a resume with nothing paused leaves it as it is
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a failed load")
    assert gc.isenabled()
