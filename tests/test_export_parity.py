"""Export exactness in float64 for every target, and the config.json that engines read to pick the class.

Each export is loaded back from its folder and compared with the student in float64, with transformers'
float32 downcasts lifted (`Float64Throughout`): an exact export agrees to float64 rounding. Plain float64
would not do: transformers rounds its norms and scan to float32, which leaves about 1e-7 of the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from test_export import student
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from ssmify.convert import mixer_layers
from ssmify.errors import SsmifyError
from ssmify.export import export
from ssmify.export.base import ExportTarget
from ssmify.export.float64 import Float64Throughout
from ssmify.export.targets import TARGETS

EXACT = 1e-9  # max |logit difference| / largest |logit|, float64
PLANS = {"0%": [], "50%": [0, 2], "100%": [0, 1, 2, 3]}
CASES = [(family, plan, target) for family in ("llama", "qwen2") for plan in PLANS for target in TARGETS]


@torch.no_grad()
def float64_difference(model: PreTrainedModel, folder: Path) -> tuple[float, float]:
    """(max |logit difference|, largest |logit|) of the student and its export loaded from `folder`, in
    float64 throughout, on windows that cross a chunk of the scan. `model` is left in float64. Both are
    cast with `.double()`, which widens the float32 rotary buffers too (`from_pretrained(dtype=float64)`
    keeps them float32, and its rotary angles would round to float32)."""
    exported = AutoModelForCausalLM.from_pretrained(folder).double().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with Float64Throughout():
        expected = model.double()(ids, use_cache=False).logits
        actual = exported(ids, use_cache=False).logits
    return (expected - actual).abs().max().item(), expected.abs().max().item()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, str, str], tuple[Path, float, float]]:
    """Every (family, plan, target) exported: {case: (folder, float64 difference, largest |logit|)}."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for family, plan, target in CASES:
        model = student(family, PLANS[plan])
        folder = export(model, target, root / f"{family}-{plan.rstrip('%')}-{target}")
        out[family, plan, target] = (folder, *float64_difference(model, folder))
    return out


@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_every_target_reproduces_the_student_exactly_in_float64(exports, case):
    folder, difference, scale = exports[case]
    assert difference <= EXACT * scale
    parity = json.loads((folder / "export_report.json").read_text())["parity"]
    assert parity["float64"]["forward"] <= EXACT * parity["logit_scale"]
    assert parity["float64"]["decode"] <= EXACT * parity["logit_scale"]
    assert parity["float32"]["forward"] <= parity["float32"]["limits"]["forward"]


def engine_choice(folder: Path) -> tuple[str, str]:
    """(model class, runner) as vLLM picks them from config.json: `architectures` names the class, and
    without it the model_type's bare base model is resolved, which runs as a pooling (embedding) model."""
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or [MODEL_MAPPING_NAMES[config["model_type"]]]
    model_class = getattr(transformers, architectures[0])
    return model_class.__name__, "generate" if issubclass(model_class, GenerationMixin) else "pooling"


@pytest.mark.parametrize("target", TARGETS)
def test_config_names_the_causal_lm_class_so_engines_generate(exports, target):
    folder = exports["llama", "0%", target][0]
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert engine_choice(folder) == (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], "generate")
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] == TARGETS[target].architecture


def test_engine_choice_without_architectures_is_the_embedding_model_of_the_bug_report(exports, tmp_path):
    folder = exports["llama", "0%", "granitemoehybrid"][0]
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert engine_choice(tmp_path) == ("GraniteMoeHybridModel", "pooling")


@pytest.mark.parametrize("target", TARGETS)
def test_a_pure_ssm_with_a_residual_stream_of_1e4_exports_exactly(tmp_path, target):
    """Large activations make every rounding difference large; float64 must still agree to its rounding."""
    model = student("llama", [])
    with torch.no_grad():
        for i, mixer in mixer_layers(model).items():
            mixer.out_proj.weight.mul_(3000.0 * (-1) ** i)
        residual = model(torch.arange(40)[None], output_hidden_states=True).hidden_states[-2].abs().max()
    assert residual >= 1e4
    folder = export(model, target, tmp_path / "export")
    difference, scale = float64_difference(model, folder)
    assert difference <= EXACT * scale


def test_a_mapping_error_far_below_float32_rounding_is_refused(tmp_path, monkeypatch):
    """One gated-norm gain off by one part in a million: invisible in float32, a bug in float64."""
    make_weights = ExportTarget.build

    def slightly_off(self, spec):
        config, weights = make_weights(self, spec)
        weights["model.layers.0.mamba.norm.weight"] = weights["model.layers.0.mamba.norm.weight"] * (1 + 1e-6)
        return config, weights

    monkeypatch.setattr(ExportTarget, "build", slightly_off)
    with pytest.raises(SsmifyError, match="float64 forward") as refusal:
        export(student("llama", [1]), "bamba", tmp_path / "out")
    assert "float32" not in str(refusal.value)
    assert list(tmp_path.iterdir()) == []
