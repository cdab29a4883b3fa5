"""The distillation recipe: a strict pydantic schema, YAML loading and `--set` overrides.

A recipe names a teacher, a student (an existing converted folder or the options to convert one),
the data, and a list of stages. Every key is checked: an unknown or misspelt key, a wrong type or a
value out of range stops the run with one line that names the dotted path, e.g.
`recipe.yaml: stages.0.lrr: unknown key (did you mean lr?)`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ssmify.errors import SsmifyError

STAGE_NAMES = ("matrix", "hidden", "logits")


class StrictModel(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=False)


class HubSource(StrictModel):
    """A dataset on the Hugging Face hub, read through `datasets.load_dataset`."""

    hub: str
    subset: str | None = None
    split: str = "train"
    field: str = "text"
    revision: str | None = None
    streaming: bool = True


# Tags that pick a union's branch; pydantic puts them in an error's location, and the messages drop them.
UNION_TAGS = ("local-files", "hub-dataset", "named-set", "lora-adapter")


def _source_kind(value: Any) -> str:
    return "hub-dataset" if isinstance(value, (dict, HubSource)) else "local-files"


DataSource = Annotated[
    Annotated[str, Tag("local-files")] | Annotated[HubSource, Tag("hub-dataset")],
    Discriminator(_source_kind),
]


SyntheticKind = Literal["induction", "kv", "passkey"]


class SyntheticConfig(StrictModel):
    """Synthetic lookup sequences mixed into the training data (`ssmify.distill.synthetic`)."""

    fraction: float = Field(ge=0, lt=1)
    kinds: list[SyntheticKind] = Field(list(typing.get_args(SyntheticKind)), min_length=1)

    @field_validator("kinds")
    @classmethod
    def _each_kind_once(cls, kinds: list[str]) -> list[str]:
        if len(set(kinds)) < len(kinds):
            raise ValueError("list each kind once")
        return kinds


class DataConfig(StrictModel):
    """Where the text comes from and how it becomes token blocks."""

    train: list[DataSource] = Field(min_length=1)
    validation: list[DataSource] | None = None
    validation_fraction: float = Field(0.02, gt=0, lt=1)
    seq_len: int = Field(256, ge=2)
    field: str = "text"
    documents: Literal["file", "paragraph", "line"] = "paragraph"
    cache_dir: str | None = None
    shuffle_buffer: int = Field(10_000, ge=1)
    synthetic: SyntheticConfig | None = None
    # The fraction of text windows that start with the tokenizer's BOS (their first token replaced), as prompts
    # do at inference; true is 1.0 (every window), false 0.0.
    bos: float = Field(0.0, ge=0, le=1)


CONVERT_OPTIONS = (
    "mixer",
    "mixer_options",
    "keep_attention",
    "attention_layers",
    "layer_choice",
    "init",
    "attention_heads",
    "keep_heads",
    "kv_budget_mib",
    "context",
    "mixer_width",
    "gate",
)


class StudentConfig(StrictModel):
    """Either `path` (an existing converted student folder) or the options `ssmify convert` takes."""

    path: str | None = None
    mixer: Literal["mamba2", "discrete_mamba2", "gated_deltanet"] | None = None
    mixer_options: dict[str, Any] | None = None
    keep_attention: float | None = Field(None, ge=0, le=1)
    attention_layers: list[int] | None = None
    layer_choice: Literal["even", "sensitive", "kl", "retrieval", "auto"] | None = None
    init: Literal["seeded", "random"] | None = None
    attention_heads: str | None = None  # a head-level plan, as `convert --attention-heads 3:0,7:2`
    keep_heads: float | None = Field(None, gt=0)  # as `convert --keep-heads`: a count, or a fraction below 1
    # as `convert --kv-budget-mib M --context N`: as many KV heads as fit in M MiB at N tokens (default 2048)
    kv_budget_mib: float | None = Field(None, gt=0)
    context: int | None = Field(None, ge=1)
    mixer_width: Literal["full", "kv"] | None = None  # None: convert's default, full
    gate: Literal["z", "mean", "none"] | None = None  # None: convert's default, z (mean/none: mamba2 only)

    @model_validator(mode="after")
    def _path_or_convert_options(self) -> StudentConfig:
        options = [k for k in CONVERT_OPTIONS if getattr(self, k) is not None]
        if self.path is not None and options:
            raise ValueError(
                f"give either path or convert options, not both (got path and {', '.join(options)})"
            )
        if self.keep_attention is not None and self.attention_layers is not None:
            raise ValueError("give either keep_attention or attention_layers, not both")
        if self.context is not None and self.kv_budget_mib is None:
            raise ValueError(
                "context is the length at which kv_budget_mib is counted: give kv_budget_mib too"
            )
        if self.gate not in (None, "z") and self.mixer not in (None, "mamba2"):
            raise ValueError(f"gate {self.gate} is mamba2's alone; {self.mixer} takes gate z")
        return self

    def convert_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `ssmify.convert.convert`, only those the recipe sets."""
        return {k: getattr(self, k) for k in CONVERT_OPTIONS if getattr(self, k) is not None}


class Schedule(StrictModel):
    """Learning-rate shape over a stage. warmup and decay are fractions of the stage's steps."""

    kind: Literal["constant", "cosine", "wsd"] = "constant"
    warmup: float = Field(0.0, ge=0, lt=1)
    decay: float = Field(0.2, ge=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


MIXER_EXTRAS = "mixer_extras"  # the preset: every converted mixer's parameters outside its Linear layers


class LoraOptions(StrictModel):
    """peft LoRA settings (`ssmify.distill.lora`).

    target_modules: Linear layer names (a name matches a module whose dotted path ends with it), a
    regular expression over whole dotted paths, or "all-linear" (every Linear but the output head).
    modules_to_save: modules trained fully beside the adapters, and the preset `mixer_extras`; left
    out, it is `[mixer_extras]` when a target lies in a mixer and `[]` otherwise.
    """

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, targets: list[str] | str) -> list[str] | str:
        names = [targets] if isinstance(targets, str) else targets
        if not names or not all(name.strip() for name in names):
            raise ValueError("give at least one module name, a regular expression or all-linear")
        if isinstance(targets, str) and targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from None
        return targets

    @field_validator("modules_to_save")
    @classmethod
    def _each_module_once(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and (len(set(names)) < len(names) or not all(n.strip() for n in names)):
            raise ValueError("list each module name once, none empty")
        return names


class LoraTrainable(StrictModel):
    lora: LoraOptions


def _trainable_kind(value: Any) -> str:
    return "lora-adapter" if isinstance(value, (dict, LoraTrainable)) else "named-set"


Trainable = Annotated[
    Annotated[Literal["mixers", "mixers+attention", "attention", "blocks", "all"], Tag("named-set")]
    | Annotated[LoraTrainable, Tag("lora-adapter")],
    Discriminator(_trainable_kind),
]


class LossConfig(StrictModel):
    """The logits stage's loss: KL between teacher and student token distributions, plus optional CE."""

    kind: Literal["forward_kl", "reverse_kl"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0)
    # End-to-end hidden alignment: every layer's output, the student running on its own earlier layers,
    # against the teacher's, as relative L2 error (ssmify.distill.objectives.logits.hidden_loss).
    hidden_weight: float = Field(0.0, ge=0)
    # Kept-head alignment: each kept attention head's output before o_proj, the student end to end,
    # against the teacher's, as relative L2 error (ssmify.distill.objectives.kept_heads).
    head_weight: float = Field(0.0, ge=0)


class Stage(StrictModel):
    """One distillation stage: its objective, token budget, batch, optimizer and schedule."""

    name: Literal["matrix", "hidden", "logits"]
    tokens: int = Field(gt=0)
    micro_batch_size: int = Field(1, ge=1)
    global_batch_tokens: int = Field(gt=0)
    seq_len: int | None = Field(None, ge=2)
    synthetic_fraction: float | None = Field(None, ge=0, lt=1)  # in place of data.synthetic.fraction
    lr: float = Field(gt=0)
    attention_lr: float | None = Field(None, gt=0)  # trainable: mixers+attention; the kept attention's lr
    schedule: Schedule = Schedule()
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    trainable: Trainable = "mixers"
    loss: LossConfig | None = None
    # hidden stage: position 0's weight in each layer's token average (1: a token like any other); see
    # ssmify.distill.objectives.hidden for why a teacher's first position may need more
    first_position_weight: float = Field(1.0, ge=1)
    # hidden and logits stages: recompute each decoder block's activations in the backward pass instead of
    # keeping them (transformers' activation checkpointing): less memory on long sequences, more compute
    activation_checkpointing: bool = False
    teacher_cache: str | None = (
        None  # logits stage: read the teacher's top-K logits from `ssmify teacher-cache`
    )
    eval_every: int | None = Field(None, ge=1)
    eval_tokens: int = Field(8192, ge=1)
    checkpoint_every: int | None = Field(50, ge=1)
    log_every: int = Field(1, ge=1)


TrackerName = Literal["tensorboard", "wandb"]


class TrackingConfig(StrictModel):
    """Experiment tracking: where the stages' loss, lr and validation loss go (`ssmify.distill.tracking`).

    Each stage is one run. project defaults to the name of output_dir; run_name, when given, prefixes each
    stage's run, else the run is the stage folder's name (1-matrix, ...)."""

    report_to: list[TrackerName] = []
    project: str | None = Field(None, min_length=1)
    run_name: str | None = Field(None, min_length=1)
    tags: list[str] = []


class Recipe(StrictModel):
    """A whole distillation run: teacher -> student through the listed stages."""

    teacher: str
    student: StudentConfig
    data: DataConfig
    output_dir: str
    seed: int = 0
    stages: list[Stage] = Field(min_length=1)
    trust_remote_code: bool = False
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    teacher_sharding: Literal["none", "fsdp"] = "none"  # fsdp: the frozen teacher sharded over the processes
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    keep_checkpoints: int = Field(2, ge=1)
    keep_finished_checkpoints: bool = False  # a finished stage's checkpoints resume nothing
    tracking: TrackingConfig = TrackingConfig()
    trackers: list[TrackerName] | None = Field(None, exclude=True)  # the old form of tracking.report_to

    @model_validator(mode="after")
    def _old_trackers_key(self) -> Recipe:
        """`trackers: [...]` still works: it becomes tracking.report_to (check_recipe refuses both at once)."""
        if self.trackers is not None and not self.tracking.report_to:
            self.tracking.report_to = list(self.trackers)
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false


def stage_seq_len(recipe: Recipe, stage: Stage) -> int:
    """The sequence length a stage trains on: its own, else the data section's."""
    return stage.seq_len if stage.seq_len is not None else recipe.data.seq_len


def stage_data(recipe: Recipe, stage: Stage) -> DataConfig:
    """The data section a stage trains on: the recipe's, with the stage's own synthetic_fraction if it sets one.

    A long-context stage may want more lookup sequences than the short ones before it (or none): its
    fraction replaces data.synthetic.fraction, with data.synthetic's kinds (all kinds when it has none)."""
    if stage.synthetic_fraction is None:
        return recipe.data
    synthetic = recipe.data.synthetic or SyntheticConfig(fraction=0.0)
    synthetic = synthetic.model_copy(update={"fraction": stage.synthetic_fraction})
    return recipe.data.model_copy(update={"synthetic": synthetic})


def stage_dir_name(index: int, stage: Stage) -> str:
    """`<n>-<name>` with n counted from 1, e.g. `1-matrix`."""
    return f"{index + 1}-{stage.name}"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `dotted.key=value` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise SsmifyError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SsmifyError(
            f"{path}: not UTF-8 text (bad byte at offset {err.start}); save the recipe as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SsmifyError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise SsmifyError(
            f"{path}: a recipe is a YAML mapping with keys teacher, student, data, output_dir, stages"
        )
    for override in overrides:
        apply_override(raw, override)
    return parse_recipe(raw, source=str(path))


def parse_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as a plain dict; errors name `source` and the dotted path of each bad key."""
    check_no_nul(raw, source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise SsmifyError(f"{source}: {format_validation_error(err, raw)}") from None
    check_recipe(recipe, source)
    return recipe


def check_no_nul(node: Any, source: str, path: str = "") -> None:
    """Refuse a NUL character in any key or text value: no path or name can hold one (os calls raise)."""
    if isinstance(node, str) and "\x00" in node:
        raise SsmifyError(f"{source}: {path or '(top level)'}: the text holds a NUL character (\\0)")
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and "\x00" in key:
            raise SsmifyError(f"{source}: {where!r}: the key holds a NUL character (\\0)")
        check_no_nul(value, source, where)


def check_recipe(recipe: Recipe, source: str = "recipe") -> None:
    """Checks that need more than one field: they say which field to change."""
    if recipe.trackers is not None and recipe.trackers != recipe.tracking.report_to:
        raise SsmifyError(
            f"{source}: trackers: the old form of tracking.report_to; give the trackers only in the tracking block"
        )
    for i, stage in enumerate(recipe.stages):
        where = f"{source}: stages.{i}"
        if stage.tokens < stage.global_batch_tokens:
            raise SsmifyError(
                f"{where}.tokens: {stage.tokens} is smaller than one batch "
                f"(global_batch_tokens {stage.global_batch_tokens})"
            )
        seq_len = stage_seq_len(recipe, stage)
        if stage.global_batch_tokens % seq_len:
            raise SsmifyError(
                f"{where}.global_batch_tokens: {stage.global_batch_tokens} "
                f"is not a multiple of seq_len {seq_len}"
            )
        if stage.loss is not None and stage.name != "logits":
            raise SsmifyError(f"{where}.loss: only the logits stage takes a loss section")
        if stage.teacher_cache is not None and stage.name != "logits":
            raise SsmifyError(f"{where}.teacher_cache: only the logits stage reads a teacher cache")
        if stage.first_position_weight != 1.0 and stage.name != "hidden":
            raise SsmifyError(
                f"{where}.first_position_weight: only the hidden stage weights positions (got it on the "
                f"{stage.name} stage)"
            )
        if stage.activation_checkpointing and stage.name == "matrix":
            raise SsmifyError(
                f"{where}.activation_checkpointing: the matrix stage runs each mixer alone, not the decoder "
                "blocks that checkpointing recomputes; set it on a hidden or logits stage"
            )
        if stage.teacher_cache is not None and stage.loss is not None and stage.loss.kind != "forward_kl":
            raise SsmifyError(
                f"{where}.teacher_cache: a teacher cache holds the teacher's top-K only, which gives "
                "forward_kl; set loss.kind: forward_kl or drop the cache"
            )
        for field, needs in (("hidden_weight", "hidden states"), ("head_weight", "attention head outputs")):
            if stage.teacher_cache is not None and stage.loss is not None and getattr(stage.loss, field) > 0:
                raise SsmifyError(
                    f"{where}.loss.{field}: a teacher cache holds logits only, not the teacher's {needs}; "
                    f"set {field}: 0 or drop the cache"
                )
        if stage.name == "matrix" and isinstance(stage.trainable, LoraTrainable):
            raise SsmifyError(
                f"{where}.trainable.lora: LoRA does not apply to the matrix stage, which fits the mixers' "
                "mixing matrices with their full weights; use trainable: mixers there"
            )
        if stage.name == "matrix" and stage.trainable != "mixers":
            raise SsmifyError(
                f"{where}.trainable: the matrix stage trains the mixers only (got {stage.trainable!r})"
            )
        if stage.attention_lr is not None and stage.trainable != "mixers+attention":
            raise SsmifyError(
                f"{where}.attention_lr: it sets the kept attention's lr, which only trainable: "
                f"mixers+attention trains apart from the mixers (got trainable {stage.trainable!r})"
            )
        if stage.name == "hidden" and stage.trainable in ("all", "mixers+attention", "attention"):
            raise SsmifyError(
                f"{where}.trainable: the hidden stage trains mixers, blocks or LoRA adapters "
                f"(got {stage.trainable!r})"
            )


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.0.c=value` in the raw recipe; the value is read as YAML (1.0e-3, true, [1, 2] keep types)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise SsmifyError(f"--set {override!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise SsmifyError(f"--set {key}: the value {text!r} is not valid YAML") from None
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SsmifyError(f"--set {key}: {here}: no such list index (the list has {len(node)} items)")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
        else:
            raise SsmifyError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section")
        if last:
            node[index] = value
        else:
            if isinstance(node, dict) and node.get(index) is None:
                node[index] = {}
            node = node[index]


def format_validation_error(err: ValidationError, raw: Any) -> str:
    """One line for all of pydantic's errors: `dotted.path: what is wrong` joined by '; '."""
    messages = []
    for item in err.errors():
        path = _input_path(item["loc"], raw)
        dotted = ".".join(str(p) for p in path) or "(top level)"
        messages.append(f"{dotted}: {_describe(item, path)}")
    return "; ".join(dict.fromkeys(messages))


def _input_path(loc: tuple[Any, ...], raw: Any) -> list[Any]:
    """Keep the parts of pydantic's loc that exist in the input; drop union tags and validator names."""
    path: list[Any] = []
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and not _is_tag(part):
            path.append(part)  # a missing key: it is not in the input, but it is the field to name
            node = None
    return path


def _is_tag(part: str) -> bool:
    return part in UNION_TAGS or "[" in part


def _describe(item: dict[str, Any], path: list[Any]) -> str:
    kind = item["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(path[:-1])
        close = difflib.get_close_matches(str(path[-1]), allowed, n=1)
        if close:
            return f"unknown key (did you mean {close[0]}?)"
        return f"unknown key; expected one of: {', '.join(allowed)}" if allowed else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error" and path and path[-1] == "name" and len(path) == 3 and path[0] == "stages":
        return f"unknown stage {item['input']!r}; expected one of: {', '.join(STAGE_NAMES)}"
    if kind == "literal_error":
        return f"{item['msg'].replace('Input should be', 'expected')}, got {item['input']!r}"
    return f"{item['msg']} (got {item['input']!r})" if not isinstance(item["input"], dict) else item["msg"]


def _allowed_keys(path: list[Any]) -> list[str]:
    """The field names of the recipe section at `path` (found by walking the schema's annotations)."""
    models: list[type[BaseModel]] = [Recipe]
    for part in path:
        if isinstance(part, int):
            continue
        next_models: list[type[BaseModel]] = []
        for model in models:
            field = model.model_fields.get(part)
            if field is not None:
                next_models.extend(_models_in(field.annotation))
        models = next_models
    keys: list[str] = []
    for model in models:
        keys.extend(k for k in model.model_fields if k not in keys)
    return keys


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (list, tuple, Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []
