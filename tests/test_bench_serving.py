"""The serving benchmark's bookkeeping: static-batching timelines rebuilt from batch
durations, and baselines timed in parts merged into one run."""
import pytest
import torch

from minideploy.bench.serving import Request, merge_runs, run_hf_static, static_timeline

WORK = [Request([1], 4, 0.0), Request([1], 2, 0.0), Request([1], 3, 5.0)]


def test_static_timeline_rebuilds_finish_times_from_batch_durations():
    run = static_timeline(WORK, {"batch_size": 2, "batch_seconds": [2.0, 1.0]})
    # batch 1 (arrived at 0) ends at 2; batch 2 starts when its request arrives at 5, ends at 6
    assert run["seconds"] == pytest.approx(6.0)
    assert run["output_tokens_per_s"] == pytest.approx(9 / 6)
    assert run["e2e_s"]["p50"] == pytest.approx(2.0)  # latencies 2, 2 and 1
    assert run["ttft_s"] == run["e2e_s"]  # static batching returns every token at the end


def test_a_baseline_timed_in_parts_is_summarized_once_complete():
    first = static_timeline(WORK, {"batch_size": 2, "batch_seconds": [2.0, None]})
    assert "output_tokens_per_s" not in first  # half a timeline has no throughput
    merged = merge_runs([first], [{"batch_size": 2, "batch_seconds": [None, 1.0]}], "batch_size")
    assert merged[0]["batch_seconds"] == [2.0, 1.0]
    assert static_timeline(WORK, merged[0])["seconds"] == pytest.approx(6.0)


def test_a_new_engine_run_replaces_the_old_one_of_the_same_batch_size():
    old = [{"max_batch_size": 4, "tok": 1}, {"max_batch_size": 8, "tok": 2}]
    merged = merge_runs(old, [{"max_batch_size": 4, "tok": 3}, {"max_batch_size": 16, "tok": 4}], "max_batch_size")
    assert merged == [{"max_batch_size": 4, "tok": 3}, {"max_batch_size": 8, "tok": 2},
                      {"max_batch_size": 16, "tok": 4}]


class RecordingModel:
    """Stands in for a transformers model: records the shape of every generate call."""

    def __init__(self):
        self.calls = []

    def generate(self, ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append((tuple(ids.shape), max_new_tokens))


def test_the_static_baseline_warms_up_on_its_first_batch_untimed():
    work = [Request([1, 2, 3], 4, 0.0), Request([1], 2, 0.0), Request([5, 6], 3, 0.0)]
    hf = RecordingModel()
    run = run_hf_static(hf, work, batch_size=2, device=torch.device("cpu"), which=slice(1, 2))
    # the warm-up is batch 1 (2 prompts, left-padded to 3, 4 new tokens); then only batch 2 is timed
    assert hf.calls == [((2, 3), 4), ((1, 2), 3)]
    assert run["batch_seconds"][0] is None and run["batch_seconds"][1] >= 0


class OutOfMemoryModel(RecordingModel):
    """Runs out of memory on batches wider than one prompt, as a GPU does on a padded
    batch whose KV cache does not fit."""

    def generate(self, ids, attention_mask, max_new_tokens, **kwargs):
        if ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        super().generate(ids, attention_mask, max_new_tokens, **kwargs)


def test_a_static_batch_size_that_does_not_fit_is_recorded_not_fatal():
    work = [Request([1, 2, 3], 4, 0.0), Request([1], 2, 0.0), Request([5, 6], 3, 0.0)]
    run = run_hf_static(OutOfMemoryModel(), work, batch_size=2, device=torch.device("cpu"))
    assert run == {"batch_size": 2, "out_of_memory": "CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert static_timeline(work, run) == run  # no throughput for it
    fits = run_hf_static(OutOfMemoryModel(), work, batch_size=1, device=torch.device("cpu"))
    merged = merge_runs([fits], [run], "batch_size")
    assert [r["batch_size"] for r in merged] == [1, 2]
    assert "output_tokens_per_s" in static_timeline(work, merged[0])
    # a later run that fits replaces the record of one that did not
    assert merge_runs([run], [{"batch_size": 2, "batch_seconds": [1.0, 1.0]}], "batch_size")[0]["batch_seconds"] == [1.0, 1.0]
