"""Pydantic configs for the model, the training run and the synthetic data, validated on load."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STREAM_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")


C = TypeVar("C", bound=BaseModel)


class SparcError(Exception):
    """Base of every error caused by the user's input (files, configs, arguments); the CLI prints these."""


class ConfigError(SparcError, ValueError):
    """A config file or value that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Strict):
    """Every model setting but the streams: the one place their defaults live (training nests it)."""

    n_latents: int = Field(4096, ge=2)  # width of the shared latent space
    k: int = Field(32, ge=1)  # at most k active latents per sample
    topk: Literal["global", "local"] = "global"  # shared selection (SPARC) or per-stream (baseline)
    auxk: int = Field(256, ge=0)  # dead latents used by the AuxK loss per stream; 0 disables it
    input_norm: Literal["l2", "scale", "none"] = "scale"  # per-stream input normalisation
    min_rel_activation: float = Field(0.2, ge=0, lt=1)  # drop activations below this x the row's max (until calibrated)
    sparse_kernels: bool = True  # O(k*d) gather decoding; False uses dense matmuls (reference)
    private_latents: int = Field(256, ge=0)  # per-stream residual dictionary, never in the shared code; 0: none
    private_k: int = Field(16, ge=1)  # active private latents per sample and stream

    @model_validator(mode="before")
    @classmethod
    def _clamp_auxk(cls, data: Any) -> Any:
        # auxk is an upper bound: a dictionary smaller than the default 256 uses all its latents
        if isinstance(data, dict) and isinstance(data.get("n_latents"), int) and data["n_latents"] >= 2:
            auxk = data.get("auxk", 256)
            if isinstance(auxk, int) and auxk > data["n_latents"]:
                data = data | {"auxk": data["n_latents"]}
        return data

    @model_validator(mode="after")
    def _check_k(self) -> ModelSettings:
        if self.k > self.n_latents:
            raise ValueError(f"k={self.k} is larger than n_latents={self.n_latents}")
        if self.private_latents and self.private_k > self.private_latents:
            raise ValueError(f"private_k={self.private_k} is larger than private_latents={self.private_latents}")
        return self


class SparcConfig(ModelSettings):
    """Shape of a SPARC model: its streams and the model settings."""

    streams: dict[str, int]  # stream name -> input dim, in a fixed order

    @field_validator("streams")
    @classmethod
    def _check_streams(cls, v: dict[str, int]) -> dict[str, int]:
        if len(v) < 2:
            raise ValueError(f"need at least 2 streams, got {len(v)}: {list(v)}")
        for name, dim in v.items():
            if not STREAM_NAME.match(name):
                raise ValueError(f"stream name {name!r} must match {STREAM_NAME.pattern}")
            if dim < 1:
                raise ValueError(f"stream {name!r} has dim {dim}; dims must be >= 1")
        return v


RENAMED_TRAIN_KEYS = {"solo_select_prob": "alone_select_prob"}  # earlier spelling -> the name now


def _renamed_keys(data: dict[str, Any], renamed: dict[str, str]) -> dict[str, Any]:
    """Config files written with a setting's earlier name still load (with a DeprecationWarning)."""
    for old, new in renamed.items():
        if old in data:
            warnings.warn(f"the setting {old!r} is now called {new!r}", DeprecationWarning, stacklevel=4)
            if new in data and data[new] != data[old]:
                raise ValueError(f"{old!r} (the earlier name of {new!r}) and {new!r} given with different values")
            data = {(new if k == old else k): v for k, v in data.items() if not (k == old and new in data)}
    return data


class TrainConfig(_Strict):
    """One training run: data, the model settings (nested, as sparsify does), optimisation, logging.

    Model settings may also be given flat (``n_latents: 8192`` beside ``steps``), as flags and old
    config files do; they are moved into ``model``.
    """

    features: dict[str, str] = {}  # stream name -> feature file (.npy, .safetensors, .h5[:dataset])
    labels: str | None = None  # optional per-sample concept labels (.npy), for label-weighted Jaccard
    out: str = "runs/sparc"  # checkpoint directory
    model: ModelSettings = ModelSettings()
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)  # linear LR warm-up
    cross_coef: float = Field(1.0, ge=0)  # lambda: weight of cross-reconstruction
    auxk_coef: float = Field(1 / 32, ge=0)
    alone_select_prob: float = Field(0.5, ge=0, le=1)  # share of samples whose indices come from one stream alone
    align_coef: float = Field(1.0, ge=0)  # weight of the one-stream code agreement loss
    align_ramp: float = Field(0.3, ge=0, le=1)  # share of steps over which align_coef ramps up from 0
    # streams the alignment pulls the others towards and never moves (e.g. the image streams, so that what a
    # vision tower's latents read stays grounded in its pixels); empty: every stream towards their mean
    align_anchor: list[str] = []
    dead_after: int = Field(10_000, ge=1)  # samples without firing before a latent counts as dead
    # samples dead (in every stream) before the encoder row is re-initialised; None: never, AuxK alone keeps
    # dead latents learning, as in the paper. Revival is gated (revive_min_survival) and ends at revive_until:
    # ungated revival to the last step churns the codes of features with few concepts
    revive_after: int | None = Field(20_000, ge=1)
    # revival stops for the rest of the run once fewer than this share of a round of re-initialised latents
    # is alive (fired within dead_after samples) revive_after samples after its revival: latents that die
    # again only churn the codes. 0: revival never stops
    revive_min_survival: float = Field(0.5, ge=0, le=1)
    # revival only in this first share of the steps: a latent re-initialised later has no time to learn its
    # concept in every stream before the end, and enters the final codes half-trained
    revive_until: float = Field(0.8, gt=0, le=1)
    calibrate_rounds: int = Field(3, ge=0)  # at the end, per-stream latent thresholds from paired rows; 0: keep the floor
    prune_unused: bool = True  # at the end, drop latents that (almost) never fire on the training data (reported)
    prune_below: float = Field(0.05, ge=0, lt=1)  # ... firing in every stream less than this x the mean latent's rate
    block_size: int = Field(4096, ge=1)  # rows per contiguous block for block-shuffled reading
    shuffle_blocks: int = Field(8, ge=1)  # blocks mixed together in one shuffle window
    val_rows: int = Field(2048, ge=0)  # rows held out from the end of the data for validation
    eval_every: int = Field(250, ge=1)
    save_every: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    device: str = "auto"  # auto: CUDA when present, else CPU
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _nest_model_settings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _renamed_keys(data, RENAMED_TRAIN_KEYS)
        flat = {k: data[k] for k in ModelSettings.model_fields if k in data}
        if not flat:
            return data
        data = {k: v for k, v in data.items() if k not in flat}
        nested = data.get("model", {})
        if isinstance(nested, ModelSettings):
            nested = nested.model_dump()
        if not isinstance(nested, dict):
            return data | {"model": nested}  # let validation name the bad type
        both = [k for k in flat if k in nested and nested[k] != flat[k]]
        if both:
            raise ValueError(f"{both} given both flat and under model: with different values")
        data["model"] = nested | flat
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.revive_after is not None and self.revive_after < self.dead_after:
            raise ValueError("revive_after must be >= dead_after")
        return self

    def model_config_for(self, dims: dict[str, int]) -> SparcConfig:
        """The model config this run trains, given each stream's input dim."""
        return SparcConfig(streams=dims, **self.model.model_dump())


class SynthConfig(_Strict):
    """Planted-concept data: what is generated and how hard it is (one "world")."""

    streams: dict[str, int] = {"dino": 1024, "clip_img": 768, "clip_txt": 768}
    unit_norm: list[str] = ["clip_img", "clip_txt"]  # CLIP-like streams get unit-norm rows
    n_train: int = Field(50_000, ge=1)
    n_eval: int = Field(5_000, ge=0)
    n_concepts: int = Field(512, ge=2)
    concepts_per_sample: float = Field(8.0, gt=0)  # mean of the Poisson number of drawn concepts (at least 1)
    max_concepts_per_sample: int | None = Field(None, ge=1)  # cap on drawn concepts (None: 4 x the mean + 4)
    zipf_exponent: float = Field(0.8, ge=0)  # concept popularity: frequency of the r-th concept ~ r^-exponent
    shared_fraction: float = Field(0.85, ge=0, le=1)  # concepts visible to every stream (rest: random subsets)
    visibility: dict[str, float] = {}  # "dino+clip_img" -> share of concepts seen by exactly those streams
    hierarchy: float = Field(0.0, ge=0, le=1)  # share of concepts that are children of another concept
    child_similarity: float = Field(0.6, ge=0, lt=1)  # cosine between a child's direction and its parent's
    tower_correlation: float = Field(0.0, ge=0, lt=1)  # share of direction that towers[1:] take from towers[0]
    towers: list[str] = ["clip_img", "clip_txt"]  # streams of one model (CLIP image/text): correlated directions
    nuisance_dims: int = Field(0, ge=0)  # per-stream subspace of unpaired variation (style, viewpoint)
    nuisance_scale: float = Field(0.5, ge=0)  # nuisance norm relative to the signal norm
    magnitudes: Literal["shared", "per_stream"] = "shared"  # one amount per concept and sample, or one per stream
    noise: float = Field(0.05, ge=0)  # noise norm relative to the signal norm
    modality_gap: float = Field(0.5, ge=0)  # per-stream offset norm relative to the signal norm
    raw_scale: float = Field(30.0, gt=0)  # mean row norm of streams that are not unit-norm
    seed: int = 0

    @model_validator(mode="after")
    def _check_world(self) -> SynthConfig:
        for group, share in self.visibility.items():
            names = group.split("+")
            unknown = [n for n in names if n not in self.streams]
            if unknown:
                raise ValueError(
                    f"visibility group {group!r} names unknown stream(s) {unknown}; streams are {list(self.streams)}"
                )
            if len(set(names)) != len(names) or len(names) >= len(self.streams):
                raise ValueError(f"visibility group {group!r} must be a proper subset of the streams, each named once")
            if not 0 <= share <= 1:
                raise ValueError(f"visibility share of {group!r} must be in [0, 1], got {share}")
        if sum(self.visibility.values()) > 1:
            raise ValueError(f"visibility shares add up to {sum(self.visibility.values()):.3f} > 1")
        if self.tower_correlation > 0:
            missing = [t for t in self.towers if t not in self.streams]
            if missing or len(self.towers) < 2:
                raise ValueError(f"towers {self.towers} must name at least 2 of the streams {list(self.streams)}")
            dims = {self.streams[t] for t in self.towers}
            if len(dims) != 1:
                raise ValueError(f"correlated towers must have one dim, got { {t: self.streams[t] for t in self.towers} }")
        if self.nuisance_dims and self.nuisance_dims >= min(self.streams.values()):
            raise ValueError(f"nuisance_dims={self.nuisance_dims} must be smaller than every stream's dim")
        return self


class ClipConfig(_Strict):
    """An open_clip model from local weights: its image tower feeds one stream, its text tower another."""

    model: str = "ViT-L-14"  # open_clip model name, or a model-config .json (ignored when weights is a directory)
    weights: str | None = None  # checkpoint file (.safetensors/.bin/.pt), or a directory with open_clip_config.json
    image_stream: str | None = "clip_img"  # stream fed by the image tower; None skips it
    text_stream: str | None = "clip_txt"  # stream fed by the text tower; None skips it


class DinoConfig(_Strict):
    """A DINOv2 ViT from local weights (official or timm layout) feeding one stream with its CLS token."""

    model: str = "vit_large_patch14_reg4_dinov2"  # timm architecture (ignored when weights is a directory)
    weights: str | None = None  # official .pth, timm .safetensors/.bin, or a timm directory with config.json
    stream: str = "dino"
    model_args: dict[str, Any] = {}  # extra timm constructor arguments, for a custom ViT
    image_size: int = Field(224, ge=14)  # square input side; a multiple of the patch size
    patch_tokens: bool = False  # also keep the patch tokens (float16) for localisation work


class EncodersConfig(_Strict):
    """The feature encoders of a run or a server, and where they run."""

    clip: ClipConfig | None = None
    dino: DinoConfig | None = None
    device: str = "auto"  # auto: CUDA when present, else CPU
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16/fp16 autocast on GPU, fp32 on CPU


class ClusterConfig(_Strict):
    """Where a batch job runs on Ray (``--engine ray``): the cluster and its actor pool."""

    address: str | None = None  # a running cluster ("auto", "ray://host:10001"); none: a local one on this machine
    actors: int | None = Field(None, ge=1)  # pool size; default: one per GPU in the cluster, else one per cpus_per_actor
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float | None = Field(None, ge=0)  # default: 1 when the cluster has GPUs, else 0
    num_cpus: int | None = Field(None, ge=1)  # CPUs of a local cluster (no address); default: every core


class ExtractConfig(_Strict):
    """One feature-extraction run: images + captions in, one paired feature file per stream out."""

    images: str  # image folder; caption-file paths are relative to it
    captions: str  # CSV / JSON Lines (image_path, caption[, id]) or a COCO captions JSON
    out: str  # output directory
    encoders: EncodersConfig = EncodersConfig()
    all_captions: bool = False  # one row per caption (COCO has ~5 per image) instead of the first caption only
    batch_size: int = Field(64, ge=1)
    workers: int = Field(4, ge=0)  # DataLoader processes decoding images
    chunk_size: int = Field(4096, ge=1)  # rows per chunk file; a crash loses at most one chunk
    keep_chunks: bool = False  # keep the chunk files after assembling the final arrays
    progress: bool = True
    engine: Literal["local", "ray"] = "local"  # ray: chunks encoded by an actor pool on a Ray cluster
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _check(self) -> ExtractConfig:
        if self.encoders.clip is None and self.encoders.dino is None:
            raise ValueError("configure at least one encoder (clip and/or dino)")
        return self


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def build_config(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Validate ``data`` as ``cls``; unknown keys and bad values raise a ConfigError naming them."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<root>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(f"{source}: invalid {cls.__name__}:\n" + "\n".join(lines)) from None


# Named planted-concept worlds (sparc synth --preset NAME); sparc_core.worlds.synthetic.PRESETS is this dict.
SYNTH_PRESETS: dict[str, dict] = {
    "demo": {},
    "groups": {  # concepts seen by stream subsets, a CLIP modality gap and nuisance: the hard case
        "n_concepts": 600,
        "concepts_per_sample": 4.0,
        "visibility": {"dino+clip_img": 0.1, "clip_img+clip_txt": 0.1, "dino": 0.1},
        "tower_correlation": 0.5,
        "nuisance_dims": 16,
    },
    "hierarchy": {"n_concepts": 800, "concepts_per_sample": 4.0, "hierarchy": 0.5, "child_similarity": 0.6},
    "many": {"n_concepts": 4000, "concepts_per_sample": 6.0, "zipf_exponent": 1.0},
    "flat": {"n_concepts": 300, "concepts_per_sample": 3.0, "zipf_exponent": 0.0, "shared_fraction": 1.0},
    "dense": {"n_concepts": 1000, "concepts_per_sample": 12.0, "zipf_exponent": 0.6},
    "noisy": {"n_concepts": 500, "concepts_per_sample": 5.0, "noise": 0.3, "magnitudes": "per_stream", "nuisance_dims": 32},
    "gap": {"n_concepts": 500, "concepts_per_sample": 5.0, "modality_gap": 2.0, "tower_correlation": 0.8},
}
