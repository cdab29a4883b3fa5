"""The benchmark scripts' --quick modes run end to end on a tiny teacher and report what their docs promise.

Each script runs in a subprocess, as a user would run it; the numbers are not checked (they are
timings on a tiny model), only that the script finishes and that its results hold together.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_distill_support import write_corpus, write_teacher
from tiny_models import tiny_model

from ssmify.export.engines.envs import VLLM

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    write_teacher(root / "teacher")
    write_corpus(root / "train.txt", 60, seed=0)
    write_corpus(root / "held.txt", 8, seed=1)
    return root


def run_script(name: str, *args: str, cwd: Path = REPO) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(BENCH / name), "--quick", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_init_ablation_scores_every_stage_of_four_students_at_one_token_budget(workspace: Path):
    out = workspace / "ablation"
    stdout = run_script(
        "init_ablation.py",
        *("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt")),
        *("--heldout", str(workspace / "held.txt"), "--out", str(out)),
    )
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]["50pct-attention"]
    assert sorted(runs) == sorted(
        f"{v}/seed0" for v in ("seeded+mohawk", "seeded+kd", "random+mohawk", "random+kd")
    )
    for key, run in runs.items():
        stages = [s["stage"] for s in run["scores"]]
        expected = ["converted", "matrix", "hidden", "logits"] if "mohawk" in key else ["converted", "logits"]
        assert stages == expected, key
        assert sum(s["tokens"] for s in run["scores"]) == results["tokens_per_student"], key
        for score in run["scores"]:
            assert math.isfinite(score["perplexity"]) and score["perplexity"] > 1
            assert score["kl"] >= 0 and 0 <= score["top1"] <= 1
            assert score["teacher_perplexity"] == pytest.approx(results["teacher_perplexity"])
    # seeded and random students start from different mixers, each shared by its two recipes
    converted = {key: run["scores"][0]["perplexity"] for key, run in runs.items()}
    assert converted["seeded+mohawk/seed0"] == converted["seeded+kd/seed0"]
    assert converted["random+mohawk/seed0"] == converted["random+kd/seed0"]
    assert converted["seeded+mohawk/seed0"] != converted["random+mohawk/seed0"]
    assert "final numbers over seeds" in stdout
    assert not list((out / "50pct-attention" / "seed0").glob("*/model.safetensors"))  # students deleted


def test_decode_measures_all_three_models_and_the_ssm_state_stays_constant(workspace: Path):
    report = workspace / "decode.json"
    stdout = run_script(
        "decode.py",
        *("--teacher", str(workspace / "teacher"), "--threads", "1", "--json", str(report)),
        *("--static-teacher", "--plan", "mixed=1:0,3:all", "gdn=1:0,3:all@gated_deltanet"),
    )
    result = json.loads(report.read_text())
    points = result["points"]
    assert result["plans"] == {"mixed": "mamba2", "gdn": "gated_deltanet"}
    names = ("teacher", "mixed", "gdn")
    growth = {n: points[1][n]["state_bytes"] - points[0][n]["state_bytes"] for n in names}
    assert growth["mixed"] * 8 == growth["teacher"] * 3  # its KV cache: 3 of the teacher's 8 KV heads
    assert growth["gdn"] == growth["mixed"]  # the same kept KV groups, whichever mixer
    assert points[1]["mixed_decode_speedup"] > 0 and "students of --plan" in stdout
    assert points[1]["gdn_decode_speedup"] > 0
    assert [p["length"] for p in points] == [32, 64]
    for point in points:
        for name in ("teacher", "ssm", "hybrid"):
            measured = point[name]
            assert measured["decode_tokens_per_s"] > 0 and measured["prefill_s"] > 0
            assert measured["state_bytes"] > 0
        assert point["ssm_decode_speedup"] == pytest.approx(
            point["ssm"]["decode_tokens_per_s"] / point["teacher"]["decode_tokens_per_s"]
        )
    ssm_states = [p["ssm"]["state_bytes"] for p in points]
    teacher_states = [p["teacher"]["state_bytes"] for p in points]
    hybrid_states = [p["hybrid"]["state_bytes"] for p in points]
    assert ssm_states[0] == ssm_states[1]
    assert teacher_states[1] == 2 * teacher_states[0]  # the KV cache grows linearly with the context
    assert ssm_states[0] < hybrid_states[0] < teacher_states[0]
    assert "pure-SSM decoding state constant across contexts: yes" in stdout
    for point in points:  # the teacher with a preallocated StaticCache, measured beside the others
        static = point["teacher_static"]
        assert static["decode_tokens_per_s"] > 0 and static["state_bytes"] >= point["teacher"]["state_bytes"]
        assert point["ssm_decode_speedup_vs_static"] == pytest.approx(
            point["ssm"]["decode_tokens_per_s"] / static["decode_tokens_per_s"]
        )
    assert "SSM/static teacher" in stdout


def test_distill_throughput_times_each_stage_loop_against_its_raw_steps(workspace: Path):
    report = workspace / "throughput.json"
    stdout = run_script(
        "distill_throughput.py",
        *("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt")),
        *("--heldout", str(workspace / "held.txt"), "--out", str(workspace / "throughput")),
        *("--threads", "1", "--json", str(report)),
    )
    stages = json.loads(report.read_text())["stages"]
    assert [s["stage"] for s in stages] == ["1-matrix", "2-hidden", "3-logits"]
    for stage in stages:
        assert stage["steps"] == 2
        assert stage["loop_tokens_per_s"] > 0 and stage["raw_tokens_per_s"] > 0
        assert stage["overhead"] == pytest.approx(1 - stage["loop_tokens_per_s"] / stage["raw_tokens_per_s"])
        assert sum(stage["loop_parts"].values()) == pytest.approx(stage["loop_seconds"])
        assert stage["loop_parts"]["checkpoints"] > 0  # --quick checkpoints every step
        assert stage["raw_seconds"] == pytest.approx(sum(stage["raw_parts"].values()))
        validation = stage["loop_parts"]["validation"]
        assert validation > 0  # before and after every stage
        assert stage["overhead_without_validation"] == pytest.approx(
            1 - stage["raw_seconds"] / (stage["loop_seconds"] - validation)
        )
    assert "target (overhead <= 15%, validation excluded) 3-logits" in stdout


def test_mixer_benchmark_reports_every_method_at_every_length(tmp_path: Path):
    report = tmp_path / "mixer.json"
    run_script("mixer.py", "--threads", "1", "--json", str(report))
    rows = json.loads(report.read_text())
    assert [r["length"] for r in rows] == [64, 128]
    for row in rows:
        for method in ("chunked", "sequential", "gated_deltanet", "sdpa"):
            assert row[f"{method}_seconds"] > 0
        assert row["sdpa_over_chunked"] == pytest.approx(row["sdpa_seconds"] / row["chunked_seconds"])
        assert row["gated_deltanet_over_chunked"] == pytest.approx(
            row["gated_deltanet_seconds"] / row["chunked_seconds"]
        )


def test_mixer_peers_time_ssmify_and_transformers_mamba2_scans_forward_and_backward(tmp_path: Path):
    report = tmp_path / "peers.json"
    stdout = run_script("mixer.py", "--peers", "--threads", "1", "--json", str(report))
    rows = json.loads(report.read_text())
    assert [r["length"] for r in rows] == [64, 128]
    for row in rows:
        for name in ("ssmify", "transformers"):
            assert row[name]["forward_seconds"] > 0 and row[name]["seconds"] > 0
        assert row["forward_ratio"] == pytest.approx(
            row["transformers"]["forward_seconds"] / row["ssmify"]["forward_seconds"]
        )
        assert row["forward_backward_ratio"] == pytest.approx(
            row["transformers"]["seconds"] / row["ssmify"]["seconds"]
        )
    assert "hf/ssmify f+b" in stdout


def test_decode_by_batch_times_four_models_at_each_batch_and_context(workspace: Path):
    report = workspace / "decode_batches.json"
    stdout = run_script(
        "decode.py",
        *("--teacher", str(workspace / "teacher"), "--threads", "1", "--json", str(report)),
        *("--batches", "1", "3", "--max-batch-context", "32"),
    )
    points = json.loads(report.read_text())["points"]
    assert [p["length"] for p in points] == [32, 64]
    for point in points:
        batches = (1, 3) if point["length"] == 32 else (1,)  # batch 3 only up to --max-batch-context
        for name in ("teacher", "teacher_static", "ssm", "hybrid"):
            assert point[name]["prefill_s"] > 0
            assert sorted(k for k in point[name] if k.endswith("tokens_per_s")) == sorted(
                f"batch{b}_tokens_per_s" for b in batches
            )
        for b in batches:
            assert point[f"ssm_over_teacher_static_batch{b}"] == pytest.approx(
                point["ssm"][f"batch{b}_tokens_per_s"] / point["teacher_static"][f"batch{b}_tokens_per_s"]
            )
    assert "SSM/static" in stdout


def test_decode_by_batch_widens_every_kind_of_cache_without_changing_the_next_token(workspace: Path):
    sys.path.insert(0, str(BENCH))
    try:
        from decode import widened
    finally:
        sys.path.remove(str(BENCH))
    from transformers import AutoModelForCausalLM, StaticCache

    import ssmify

    teacher = AutoModelForCausalLM.from_pretrained(workspace / "teacher").eval()
    student = ssmify.convert(teacher, keep_attention=0.5)
    ids = torch.randint(3, 60, (1, 20))
    for model, cache in ((teacher, StaticCache(teacher.config, max_cache_len=24)), (student, None)):
        with torch.no_grad():
            out = model(ids, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            alone = model(token, cache=widened(out.cache, 1), use_cache=True).logits[:, -1]
            together = model(token.repeat(3, 1), cache=widened(out.cache, 3), use_cache=True).logits[:, -1]
        torch.testing.assert_close(together, alone.expand(3, -1), rtol=1e-5, atol=1e-5)


def test_prefill_memory_measures_teacher_and_pure_ssm_in_fresh_processes(workspace: Path):
    report = workspace / "prefill_memory.json"
    stdout = run_script("prefill_memory.py", "--teacher", str(workspace / "teacher"), "--json", str(report))
    points = json.loads(report.read_text())
    assert [p["length"] for p in points] == [160]
    for point in points:
        for name in ("teacher", "ssm", "ssm_whole"):
            assert point[name]["peak_bytes"] > 0 and point[name]["prefill_s"] > 0
        assert point["ssm_over_teacher"] == pytest.approx(
            point["ssm"]["peak_bytes"] / point["teacher"]["peak_bytes"]
        )
    assert "chunked/teacher" in stdout


def test_retrieval_bench_scores_a_student_against_the_teacher_on_the_same_samples(workspace: Path):
    out = workspace / "retrieval"
    stdout = run_script(
        "retrieval.py",
        *("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt")),
        *("--heldout", str(workspace / "held.txt"), "--out", str(out), "--plans", "0.5", "--heads", "3"),
        *("--head-plans", "3:1,1:0"),
    )
    results = json.loads((out / "results.json").read_text())
    heads_name, hand_name, name = results["runs"]
    run, heads, hand = results["runs"][name], results["runs"][heads_name], results["runs"][hand_name]
    assert hand_name.startswith("heads2/hand-") and hand["choice"] == "by hand"
    assert sorted(hand["attention_heads"]) == [[1, 0], [3, 1]] and hand["kv_heads"] == 2
    assert math.isfinite(hand["perplexity"]) and "[[1, 0], [3, 1]]" in stdout
    assert name == "50pct/retrieval/synthetic50/seed0" and run["choice"] == "retrieval"
    assert len(run["attention_layers"]) == 2 and run["synthetic"] == 0.5
    assert run["kv_heads"] == 4  # 2 layers x 2 KV heads
    assert heads_name == "heads3/circuit/synthetic50/seed0" and heads["kv_heads"] == 3
    assert len(heads["attention_heads"]) == 3 and len(heads["head_scores"]) == 4
    assert heads["training_tokens"] == run["training_tokens"]
    assert math.isfinite(heads["perplexity"]) and heads_name in stdout and "KV MiB@2k" in stdout
    assert set(run["retrieval"]) == {"induction", "passkey"} and set(results["teacher_retrieval"]) == {
        "induction",
        "passkey",
    }
    assert math.isfinite(run["perplexity"]) and run["perplexity"] > 1
    assert name in stdout and "overall" in stdout
    assert not list(out.rglob("*.safetensors"))  # student folders are removed once scored


def test_a_bench_ends_an_input_error_in_one_line_not_a_traceback(workspace: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt"))
    args += ("--heldout", str(workspace / "held.txt"), "--out", str(workspace / "retrieval-bad"), "--plans")
    result = subprocess.run(
        [sys.executable, str(BENCH / "retrieval.py"), "--quick", *args, "--head-plans", "99:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("retrieval.py: error: ") and "99" in last


def test_retrieval_bench_resumes_a_killed_student_instead_of_training_it_again(workspace: Path):
    out = workspace / "retrieval-resume"
    args = ("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt"))
    args += ("--heldout", str(workspace / "held.txt"), "--out", str(out), "--plans", "0.5", "--keep-students")
    run_script("retrieval.py", *args)
    results = json.loads((out / "results.json").read_text())
    (name,) = results["runs"]
    first = results["runs"][name]
    # A kill during the last stage: the student is not scored and its last stage has no final weights.
    del results["runs"][name]
    (out / "results.json").write_text(json.dumps(results))
    run_dir = out / name
    last = sorted(p for p in run_dir.iterdir() if p.name[0].isdigit())[-1]
    shutil.rmtree(last)
    done = {
        p: p.stat().st_mtime_ns for p in run_dir.rglob("model.safetensors") if "checkpoints" not in p.parts
    }
    assert len(done) >= 2  # the converted student and at least one finished stage
    stdout = run_script("retrieval.py", *args)
    assert f"[{name}] resuming from" in stdout
    assert {p: p.stat().st_mtime_ns for p in done} == done  # neither converted nor trained again
    assert (last / "model.safetensors").is_file()
    rerun = json.loads((out / "results.json").read_text())["runs"][name]
    assert math.isfinite(rerun["perplexity"]) and rerun["attention_layers"] == first["attention_layers"]


def test_retrieval_bench_converts_with_the_recipes_mixer(workspace: Path):
    out = workspace / "retrieval-mixer"
    recipe = yaml.safe_load((REPO / "recipes" / "smollm2-demo.yaml").read_text())
    recipe["student"] = {"mixer": "gated_deltanet"}
    (workspace / "gdn.yaml").write_text(yaml.safe_dump(recipe))
    run_script(
        "retrieval.py",
        *("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt")),
        *(
            "--heldout",
            str(workspace / "held.txt"),
            "--out",
            str(out),
            "--recipe",
            str(workspace / "gdn.yaml"),
        ),
        *("--plans", "--head-plans", "3:1", "--keep-students"),
    )
    results = json.loads((out / "results.json").read_text())
    (name,) = results["runs"]
    assert results["mixer"] == "gated_deltanet"
    configs = sorted((out / name).glob("*/config.json"))  # the converted student and every stage's
    assert len(configs) == 1 + len(recipe["stages"])
    assert {json.loads(c.read_text())["ssmify"]["mixer"] for c in configs} == {"gated_deltanet"}


def test_lora_bench_compares_full_fine_tuning_with_two_ranks_from_one_start(workspace: Path):
    out = workspace / "lora"
    stdout = run_script(
        "lora.py",
        *("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt")),
        *("--heldout", str(workspace / "held.txt"), "--out", str(out), "--report", str(out / "report")),
    )
    results = json.loads((out / "report.json").read_text())
    assert results == json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert list(runs) == ["full", "lora-r8", "lora-r32"]
    assert {run["training_tokens"] for run in runs.values()} == {results["tokens"]}
    full, r8, r32 = (runs[name]["trainable_parameters"] for name in runs)
    assert 0 < r8 < r32 and r8 < full
    for run in [results["start"], *runs.values()]:
        assert math.isfinite(run["perplexity_ratio"]) and run["perplexity_ratio"] > 0
        assert set(run["retention_by_length"]) == {"128"}
    for run in runs.values():
        assert run["peak_rss_mib"] > 100 and run["tokens_per_s"] > 0
        assert run["state_mib"] == pytest.approx(run["trainable_parameters"] * 12 / 2**20, abs=0.05)
    table = (out / "report.txt").read_text()
    assert table.strip() in stdout
    for name, run in runs.items():
        assert f"{name:<9} | {run['trainable_parameters']:>11,} | {run['perplexity_ratio']:>6.3f}" in table
    assert not list(out.rglob("1-logits"))  # each config's student is removed once scored


def test_mixers_quality_trains_both_mixers_on_the_same_layers_and_tokens(workspace: Path):
    out = workspace / "mixers_quality"
    stdout = run_script(
        "mixers_quality.py",
        *("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt")),
        *("--heldout", str(workspace / "held.txt"), "--out", str(out)),
    )
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert sorted(runs) == sorted(f"{p}pct/{m}" for p in (0, 50) for m in ("mamba2", "gated_deltanet"))
    for plan in (0, 50):
        mamba2, gdn = runs[f"{plan}pct/mamba2"], runs[f"{plan}pct/gated_deltanet"]
        assert mamba2["attention_layers"] == gdn["attention_layers"]
        assert len(gdn["attention_layers"]) == (0 if plan == 0 else 2)
        assert mamba2["training_tokens"] == gdn["training_tokens"] == sum(results["stage_tokens"].values())
        # seeded at head_dim x head_dim per head, both mixers hold the same state
        assert mamba2["state_bytes_per_layer"] == gdn["state_bytes_per_layer"] > 0
    for name, run in runs.items():
        assert list(run["stages"]) == ["1-matrix", "2-hidden", "3-logits"], name
        assert run["perplexity_ratio"] == pytest.approx(run["perplexity"] / results["teacher_perplexity"])
        assert run["train_tokens_per_s"] > 0 and run["decode_tokens_per_s"] > 0
        assert set(run["retention"]["by_task"]) == {"induction", "passkey"}
        assert name in stdout
    assert "decode tok/s@64" in stdout
    assert not list(out.rglob("*.safetensors"))  # student folders are removed once scored
    assert all(
        run["parameters_ratio"] == run["parameters"] / results["teacher_parameters"] for run in runs.values()
    )


def test_mixers_quality_variants_convert_lean_students_with_fewer_parameters(workspace: Path):
    """kv width under GQA (4 query heads, 2 key/value heads) and a bias-free mean gate: fewer parameters."""
    out = workspace / "mixers_quality_variants"
    stdout = run_script(
        "mixers_quality.py",
        *("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt")),
        *("--heldout", str(workspace / "held.txt"), "--out", str(out)),
        *("--plans", "0.5", "--mixers", "mamba2", "--variants", "full/z", "kv/mean", "--keep-students"),
    )
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(runs) == ["50pct/mamba2", "50pct/mamba2-kv-mean"]
    full, lean = runs["50pct/mamba2"], runs["50pct/mamba2-kv-mean"]
    assert (lean["mixer_width"], lean["gate"]) == ("kv", "mean")
    assert (
        lean["parameters"] < full["parameters"] and lean["parameters_ratio"] < full["parameters_ratio"] < 1.5
    )
    assert "50pct/mamba2-kv-mean" in stdout and "params x" in stdout
    config = json.loads((out / "50pct/mamba2-kv-mean/convert/config.json").read_text())
    assert config["ssmify"]["provenance"]["gate"] == "mean"


def test_mixers_quality_rejects_a_bad_variant(workspace: Path):
    result = subprocess.run(
        [sys.executable, str(BENCH / "mixers_quality.py"), "--quick", "--variants", "kv/sigmoid"],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "'kv/sigmoid' is not WIDTH/GATE" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.engines
@pytest.mark.skipif(not VLLM.ready(), reason=f"no vLLM venv at {VLLM.path}: `make engines` builds it")
def test_serve_times_the_teacher_and_its_exported_pure_ssm_in_vllm(tmp_path: Path):
    """A tiny teacher (head_dim 32, which vLLM's CPU attention has) and its pure SSM, batch 1 and 2."""
    tiny_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2).save_pretrained(
        tmp_path / "teacher"
    )
    result = subprocess.run(
        [sys.executable, str(BENCH / "serve.py"), "--quick", "--teacher", str(tmp_path / "teacher")]
        + ["--out", str(tmp_path / "out"), "--batches", "1", "2", "--repeats", "1"],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "serve.json").read_text())["results"]
    assert [(r["engine"], r["model"]) for r in results] == [("vllm", "teacher"), ("vllm", "pure SSM")]
    for timing in results:
        assert [(row["batch"], row["length"]) for row in timing["rows"]] == [(1, 128), (2, 128)]
        assert all(row["decode_tok_s"] > 0 and row["ttft_s"] > 0 for row in timing["rows"])
    assert "| vllm | f32 | pure SSM | 128 | 2 |" in result.stdout


def test_lean_parameters_counts_six_students_whose_totals_add_up():
    stdout = run_script("lean_parameters.py", "--json")
    rows = json.loads(stdout[stdout.index("\n[") :])
    assert [(r["mixer"], r["width"], r["gate"]) for r in rows] == [
        ("mamba2", w, g) for w in ("full", "kv") for g in ("z", "mean", "none")
    ] + [("gated_deltanet", "full", "z"), ("gated_deltanet", "kv", "z")]
    for r in rows:  # a pure SSM of 2 layers: each attention swapped for a mixer
        assert r["student"] == r["teacher"] + 2 * (r["mixer_parameters"] - r["attention"])
        assert r["bias"] is (r["gate"] == "z")
    by = {(r["mixer"], r["width"], r["gate"]): r["mixer_parameters"] for r in rows}
    for mixer, gate in [("mamba2", "z"), ("mamba2", "mean"), ("mamba2", "none"), ("gated_deltanet", "z")]:
        assert by[mixer, "kv", gate] < by[mixer, "full", gate]
    for width in ("full", "kv"):
        assert by["mamba2", width, "none"] < by["mamba2", width, "mean"] < by["mamba2", width, "z"]


def test_teacher_cache_bench_trains_from_the_cache_and_online_on_the_same_tokens(workspace: Path):
    report = workspace / "teacher-cache.json"
    stdout = run_script(
        "teacher_cache.py",
        *("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt")),
        *("--heldout", str(workspace / "held.txt"), "--out", str(workspace / "teacher-cache")),
        *("--threads", "1", "--json", str(report)),
    )
    result = json.loads(report.read_text())
    assert result["online"]["tokens"] == result["cached"]["tokens"] == 2048
    assert result["speedup"] == pytest.approx(
        result["cached"]["train_tokens_per_s"] / result["online"]["train_tokens_per_s"]
    )
    assert result["online"]["heldout_kl"] < result["start_heldout_kl"]  # both trained
    assert result["cached"]["heldout_kl"] < result["start_heldout_kl"]
    disk = result["disk"]
    assert sorted(disk) == ["16", "64"]
    assert 0 < disk["16"]["mb_per_million_tokens"] < disk["64"]["mb_per_million_tokens"]
    assert "target (train steps >= 1.8x)" in stdout and "| 64 |" in stdout


def test_stream_resume_bench_times_the_first_step_of_both_resumes(workspace: Path):
    report = workspace / "stream-resume.json"
    stdout = run_script(
        "stream_resume.py",
        *("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt")),
        *("--heldout", str(workspace / "held.txt"), "--out", str(workspace / "stream-resume")),
        *("--threads", "1", "--json", str(report)),
    )
    result = json.loads(report.read_text())
    assert 0 < result["first_step_uninterrupted"] < result["whole_seconds"]
    assert result["first_step_from_position"] > 0 and result["first_step_by_replay"] > 0
    assert "resumed at 90%, saved position" in stdout


def test_activation_checkpointing_bench_runs_each_length_without_and_with(workspace: Path):
    out = workspace / "checkpointing"
    stdout = run_script(
        "activation_checkpointing.py",
        *("--teacher", str(workspace / "teacher"), "--train", str(workspace / "train.txt")),
        *("--heldout", str(workspace / "held.txt"), "--attention-heads", "1:0"),
        *("--out", str(out), "--report", str(out / "report")),
    )
    results = json.loads((out / "report.json").read_text())
    runs = results["lengths"]["64"]
    assert list(runs) == ["off", "on"]
    for run in runs.values():
        assert run["peak_rss_mib"] > 100 and run["train_tokens_per_s"] > 0
    assert runs["on"]["loss_first"] == pytest.approx(runs["off"]["loss_first"], rel=1e-5)  # same first step
    assert (out / "report.txt").read_text().strip() in stdout
    assert not list(out.glob("64-*/1-logits"))
