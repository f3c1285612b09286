"""`hypo bench`: the floor and ratio arithmetic, the machine probes, and (slow) the whole command on the
tiny model."""

import json

import pytest

from hypo.bench.probes import measure_copy_bandwidth, measure_matmul, measure_read_bandwidth
from hypo.bench.results import hypo_floor_seconds, ratios
from hypo.bench.settings import BenchSettings
from hypo.bench.variants import variants
from hypo.cli.main import main

MACHINE = {"params": 1e8, "param_bytes": 4e8, "matmul_flops": 2e11, "copy_bytes_per_second": 1e10,
           "decode_step_seconds": 0.08, "decode_step_floor_seconds": 0.04, "forward_backward_flops": 1.4e11}


def test_hypo_floor_counts_eight_flops_per_param_and_token_plus_one_weight_read_per_decoding_step():
    hypo = {"tokens_per_step": 1000, "decode_steps": 64}
    # 8 * 1e8 * 1000 / 2e11 = 4 s of matmul, 64 * 0.04 = 2.56 s of weight reads
    assert hypo_floor_seconds(hypo, MACHINE) == pytest.approx(4.0 + 2.56)


def test_a_decoding_step_of_many_rows_is_floored_by_its_compute():
    hypo = {"tokens_per_step": 1000, "decode_steps": 64, "samples_per_call": 80}
    # per decoding step max(0.04 s of weight reads, 2 * 1e8 * 80 / 2e11 = 0.08 s of matmul) = 0.08 s
    assert hypo_floor_seconds(hypo, MACHINE) == pytest.approx(4.0 + 64 * 0.08)


def _results():
    return {
        "machine": MACHINE,
        "dpo": {"time/step": 3.0, "peak_rss_gb": 4.0},
        "hypo": {"time/step": 9.0, "time/generation": 1.8, "peak_rss_gb": 4.4, "tokens_per_step": 1000,
                 "decode_steps": 64},
        "hypo-prompts2": {"time/step": 6.0},
        "trl-dpo": {"time/step": 5.0},
        "trl-rloo": {"time/step": 10.0},
    }


def test_ratios_against_trl_floor_and_memory():
    results = _results()
    r = ratios(results)
    assert r["dpo_vs_trl_dpo"] == pytest.approx(0.6)
    assert r["hypo_vs_trl_dpo_plus_rloo"] == pytest.approx(9.0 / 15.0)
    assert r["hypo_vs_floor"] == pytest.approx(9.0 / 6.56)
    assert r["decode_step_vs_floor"] == pytest.approx(2.0)
    assert r["forward_backward_vs_matmul"] == pytest.approx(0.7)
    assert r["hypo_vs_dpo_peak_memory"] == pytest.approx(1.1)
    assert r["hypo_vs_dpo_step"] == pytest.approx(3.0) and r["hypo-prompts2_vs_dpo_step"] == pytest.approx(2.0)
    assert r["hypo_generation_share"] == pytest.approx(0.2)
    del results["trl-rloo"]
    assert "hypo_vs_trl_dpo_plus_rloo" not in ratios(results)
    results.update({"hypo-sample-per-micro-step": {"time/step": 13.5}, "hypo-vllm-server": {"time/step": 8.0},
                    "hypo-vllm-server-no-overlap": {"time/step": 10.0}})
    r = ratios(results)
    assert r["hypo_sample_per_micro_step_vs_hypo"] == pytest.approx(1.5)
    assert r["hypo_vllm_server_no_overlap_vs_overlap"] == pytest.approx(1.25)


def test_the_markdown_lists_each_ratio_once_and_the_sampling_cost_by_batch():
    from hypo.bench.results import markdown

    results = _results()
    results["machine"] = {**MACHINE, "decode_batch": 8, "forward_backward_tokens": 1024, "forward_backward_seconds": 5.0}
    results["sampling-by-batch"] = {
        "by_batch": [{"samples": 8, "seconds": 4.8, "seconds_per_sample": 0.6, "decode_steps": 64,
                      "seconds_per_decode_step": 0.075}],
        "prompt_prefilled_k_times": [{"samples": 8, "seconds": 5.0, "seconds_per_sample": 0.625, "decode_steps": 64,
                                      "seconds_per_decode_step": 0.078}]}
    computed = ratios(results)
    text = markdown(results, computed, BenchSettings())
    for name in computed:
        assert text.count(f"| {name} |") == 1, name
    assert "| 8 | once | 4.80 | 600 | 64 | 75 |" in text and "| 8 | k times | 5.00 | 625 | 64 | 78 |" in text
    assert "| sampling-by-batch |" not in text  # not a training variant


def test_variants_follow_the_settings():
    from hypo.config import HyPOConfig

    assert variants(BenchSettings(fewer_prompts=(2,), trl=False)) == ["machine", "sampling-by-batch", "dpo", "hypo",
                                                                      "hypo-prompts2"]
    assert variants(BenchSettings())[-2:] == ["trl-dpo", "trl-rloo"]
    accumulated = BenchSettings(config=HyPOConfig(gradient_accumulation_steps=4), fewer_prompts=(), trl=False,
                                vllm=True)
    assert variants(accumulated)[2:] == ["dpo", "hypo", "hypo-sample-per-micro-step", "vllm-sampling",
                                         "hypo-vllm-server", "hypo-vllm-server-no-overlap"]


def test_the_workload_is_a_hypo_config_and_travels_to_the_variant_processes():
    from hypo.config import HyPOConfig

    settings = BenchSettings()
    assert settings.config == HyPOConfig(eval_at_end=False)  # the default training run's shape
    settings.config.max_completion_length, settings.fewer_prompts = 16, (3,)
    assert BenchSettings.from_json(settings.to_json()) == settings


def test_targets_follow_the_device():
    from hypo.bench.results import meets_target

    assert meets_target("hypo_vs_trl_dpo_plus_rloo", 0.5, "cpu") == "<= 0.6: met"
    assert meets_target("hypo_vs_trl_dpo_plus_rloo", 0.5, "cuda") == "<= 0.3: NOT met"
    assert meets_target("hypo_vs_dpo_step", 1.9, "cuda") == "<= 2: met"
    assert meets_target("hypo_vs_dpo_step", 2.4, "cpu") == "<= 2.5: met"
    assert meets_target("hypo_generation_share", 0.3, "cpu") == "<= 0.2: NOT met"
    assert meets_target("hypo_sample_per_micro_step_vs_hypo", 1.5, "cpu") == ""


def test_weights_changed_measures_what_bf16_weights_lose(tiny_model_dir, tiny_task):
    import warnings

    from test_train import FAST

    from hypo.bench.probes import weights_changed
    from hypo.config import HyPOConfig

    config = HyPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(tiny_task["pairs"]), judge=None,
                        mixed_precision="bf16", **{**FAST, "learning_rate": 1e-5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        changed = weights_changed(BenchSettings(config=config), steps=4)
    assert changed["changed_fraction_float32_weights"] > 0.99
    assert changed["changed_fraction_bfloat16_weights"] < 0.5


def test_machine_probes_measure_positive_rates():
    assert measure_matmul(n=256, repeats=3) > 1e8
    assert measure_copy_bandwidth(megabytes=16, repeats=3) > 1e8
    assert measure_read_bandwidth(megabytes=16, repeats=3) > 1e8


@pytest.mark.slow
def test_bench_command_on_the_tiny_model(tiny_model_dir, tmp_path):
    output = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--weights_changed", "--model_name_or_path", str(tiny_model_dir),
                 "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert set(report["results"]) == {"machine", "sampling-by-batch", "dpo", "hypo", "hypo-prompts1", "trl-dpo",
                                      "trl-rloo", "weights-changed"}
    assert [e["samples"] for e in report["results"]["sampling-by-batch"]["by_batch"]] == [8, 16, 32, 64]
    for name in ("dpo", "hypo", "trl-dpo", "trl-rloo"):
        assert report["results"][name]["time/step"] > 0 and report["results"][name]["peak_rss_gb"] > 0
    assert report["results"]["hypo"]["decode_steps"] <= 8
    assert report["ratios"]["dpo_vs_trl_dpo"] > 0 and "hypo_vs_trl_dpo_plus_rloo" in report["ratios"]
    assert "| ratio | value | target |" in output.with_suffix(".md").read_text()
