"""The cache identity, typed: what makes a cache this cache, and every fact train reads from it.

`identity.json` (written first by precompute) and the manifest's `identity` section hold the same
JSON object. `CacheIdentity.from_dict` validates it once, listing every problem, and exposes the
sections readers rely on as frozen dataclasses:

| section | class | what |
|---|---|---|
| encoder | `Encoder` | model, revision, variant, VAE override, module and tokenizer fingerprints |
| latent | `Latent` | channels, scaling and shift factors, VAE factor, `mean_std` or `mean` |
| text | `Text` | token length, prompt and pooled widths |
| geometry | `Geometry` | resolution, crop policy, aspect buckets, size filters |
| dtypes | `Dtypes` | storage dtype; the VAE's and text encoders' compute dtypes |
| condition | `Condition` | dataset-provided or computed (method, version, params), soft maps |

The other sections (source, views, compute, input limits, ...) decide which bytes precompute
writes but are not read by train; they are kept, compared and written as they are. `to_dict()`
gives back exactly the object that was validated, so identities compare and serialise
byte-identically, whatever code built them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from . import limits, schema
from .errors import ManifestError

if TYPE_CHECKING:
    import torch

REQUIRED_SECTIONS = ("encoder", "latent", "text", "geometry", "dtypes")
# Sections kept as stored (see above); each is an object when present.
OTHER_SECTIONS = ("captions", "compute", "input_limits", "inputs", "source", "views")
CROPS = ("center", "random")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Encoder:
    model: str
    revision: str | None
    variant: str | None
    vae: str | None  # precompute's --vae, when the latents were not encoded by MODEL's VAE
    fingerprints: Mapping[str, str]  # "vae", "text_encoder", "tokenizer_2", ... -> sha256 hex

    def fingerprint(self, name: str) -> str | None:
        return self.fingerprints.get(name)

    @classmethod
    def from_dict(cls, enc: Mapping[str, Any]) -> "Encoder":
        """The `encoder` section (already checked by `_encoder_problems`): `<name>_fingerprint`
        keys become `fingerprints[name]`; a null fingerprint is one the cache did not record."""
        return cls(model=enc.get("model"), revision=enc.get("revision"), variant=enc.get("variant"),
                   vae=enc.get("vae"),
                   fingerprints={k[: -len("_fingerprint")]: v for k, v in enc.items()
                                 if k.endswith("_fingerprint") and v})


@dataclass(frozen=True)
class Latent:
    channels: int
    scaling_factor: float
    shift_factor: float | None
    vae_scale_factor: int  # pixels per latent cell
    store: str  # "mean_std" (the posterior: train draws mean + std * eps) or "mean"

    @property
    def has_std(self) -> bool:
        return self.store == "mean_std"


@dataclass(frozen=True)
class Text:
    max_length: int
    prompt_dim: int
    pooled_dim: int


@dataclass(frozen=True)
class Geometry:
    resolution: int
    crop: str
    buckets: tuple[tuple[int, int], ...] | None  # (h, w) in pixels, or None: square `resolution`
    min_size: int | None = None
    max_aspect: float | None = None

    def sizes(self) -> list[tuple[int, int]]:
        """Every (h, w) a sample may have, in pixels: the buckets, or the one square size."""
        return list(self.buckets) if self.buckets else [(self.resolution, self.resolution)]


@dataclass(frozen=True)
class Dtypes:
    storage: str  # "bf16" | "fp16" | "fp32": the dtype of every stored tensor
    vae: str | None = None
    text: str | None = None

    @property
    def storage_dtype(self) -> torch.dtype:
        return schema.dtype_of(self.storage)


@dataclass(frozen=True)
class Condition:
    method: str = "dataset"  # "dataset": the conditioning images came with the data
    version: int | None = None
    params: Mapping[str, Any] | None = None
    soft: bool = False  # soft maps stored; train binarises them at a random threshold

    @property
    def edge_like(self) -> bool:
        return self.method in ("canny", "sketch")


@dataclass(frozen=True, eq=False)
class CacheIdentity:
    encoder: Encoder
    latent: Latent
    text: Text
    geometry: Geometry
    dtypes: Dtypes
    condition: Condition
    _data: Mapping[str, Any]  # the validated JSON object, exactly as stored

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheIdentity) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def to_dict(self) -> dict:
        return copy.deepcopy(dict(self._data))

    def to_json(self) -> str:
        return json.dumps(self._data, sort_keys=True)

    def section(self, name: str) -> Any:
        """Any section as stored (a copy), e.g. "views" or "source"; None when absent."""
        return copy.deepcopy(self._data.get(name))

    @classmethod
    def from_dict(cls, d: Any, where: str = schema.IDENTITY_FILE) -> "CacheIdentity":
        """Validate `d` (the JSON object) and type it; a ManifestError lists every problem."""
        if not isinstance(d, Mapping):
            raise ManifestError(f"{where}: the identity must be a JSON object, got {type(d).__name__}")
        data = json.loads(json.dumps(d))  # tuples -> lists: what reading it back would give
        p = [f"missing section {k!r}" for k in REQUIRED_SECTIONS if not isinstance(data.get(k), dict)]
        p += [f"{k} must be an object, got {type(data[k]).__name__}" for k in REQUIRED_SECTIONS
              if k in data and not isinstance(data[k], dict)]
        if p:
            raise ManifestError(f"{where}: " + "; ".join(p))
        p += _latent_problems(data["latent"]) + _text_problems(data["text"]) + _geometry_problems(data["geometry"])
        p += _dtype_problems(data["dtypes"]) + _encoder_problems(data["encoder"])
        p += _condition_problems(data.get("condition"))
        p += [f"{k} must be an object, got {type(data[k]).__name__}" for k in OTHER_SECTIONS
              if data.get(k) is not None and not isinstance(data[k], dict)]
        if p:
            raise ManifestError(f"{where}: " + "; ".join(p))
        enc, lat, txt, geo, dt = (data[k] for k in REQUIRED_SECTIONS)
        cond = data.get("condition") or {}
        return cls(
            encoder=Encoder.from_dict(enc),
            latent=Latent(channels=lat["channels"], scaling_factor=float(lat["scaling_factor"]),
                          shift_factor=None if lat["shift_factor"] is None else float(lat["shift_factor"]),
                          vae_scale_factor=lat["vae_scale_factor"], store=lat["store"]),
            text=Text(max_length=txt["max_length"], prompt_dim=txt["prompt_dim"], pooled_dim=txt["pooled_dim"]),
            geometry=Geometry(resolution=geo["resolution"], crop=geo["crop"],
                              buckets=tuple(tuple(b) for b in geo["buckets"]) if geo["buckets"] else None,
                              min_size=geo.get("min_size"), max_aspect=geo.get("max_aspect")),
            dtypes=Dtypes(storage=dt["storage"], vae=dt.get("vae"), text=dt.get("text")),
            condition=Condition(method=cond.get("method", "dataset"), version=cond.get("version"),
                                params=cond.get("params") or {}, soft=bool(cond.get("soft", False))),
            _data=data,
        )


def _missing(section: str, d: dict, fields: tuple[str, ...]) -> list[str]:
    missing = [k for k in fields if k not in d]
    return [f"{section}: missing {missing}"] if missing else []


def _latent_problems(lat: dict) -> list[str]:
    p = _missing("latent", lat, ("channels", "scaling_factor", "shift_factor", "vae_scale_factor", "store"))
    if "channels" in lat and (not _is_int(lat["channels"]) or lat["channels"] < 1):
        p.append(f"latent.channels must be an integer >= 1, got {lat['channels']!r}")
    if "scaling_factor" in lat and not _is_number(lat["scaling_factor"]):
        p.append(f"latent.scaling_factor must be a number, got {lat['scaling_factor']!r}")
    if lat.get("shift_factor") is not None and not _is_number(lat["shift_factor"]):
        p.append(f"latent.shift_factor must be a number or null, got {lat['shift_factor']!r}")
    if "vae_scale_factor" in lat and (not _is_int(lat["vae_scale_factor"]) or lat["vae_scale_factor"] < 1):
        p.append(f"latent.vae_scale_factor must be an integer >= 1, got {lat['vae_scale_factor']!r}")
    if "store" in lat and lat["store"] not in schema.LATENT_STORES:
        p.append(f"latent.store must be one of {list(schema.LATENT_STORES)}, got {lat['store']!r}")
    return p


def _text_problems(txt: dict) -> list[str]:
    fields = ("max_length", "prompt_dim", "pooled_dim")
    p = _missing("text", txt, fields)
    for k in fields:
        if k in txt and (not _is_int(txt[k]) or txt[k] < 1):
            p.append(f"text.{k} must be an integer >= 1, got {txt[k]!r}")
    return p


def _geometry_problems(geo: dict) -> list[str]:
    p = _missing("geometry", geo, ("resolution", "crop", "buckets"))
    if "resolution" in geo and (not _is_int(geo["resolution"]) or geo["resolution"] < 1):
        p.append(f"geometry.resolution must be an integer >= 1, got {geo['resolution']!r}")
    if "crop" in geo and geo["crop"] not in CROPS:
        p.append(f"geometry.crop must be one of {list(CROPS)}, got {geo['crop']!r}")
    buckets = geo.get("buckets")
    if buckets is not None and not (
        isinstance(buckets, list)
        and all(isinstance(b, list) and len(b) == 2 and all(_is_int(x) and x > 0 for x in b) for b in buckets)
    ):
        p.append(f"geometry.buckets must be null or a list of [h, w], got {buckets!r}")
    sizes = ([[geo["resolution"]] * 2] if _is_int(geo.get("resolution")) and geo["resolution"] > 0 else [])
    if isinstance(buckets, list):
        sizes += [b for b in buckets if isinstance(b, list) and len(b) == 2 and all(_is_int(x) for x in b)]
    cap, too_big = limits.oversized_images(sizes)
    if too_big:
        p.append(f"geometry declares image sizes {too_big} (h, w) over {cap} pixels (SHARDS_MAX_IMAGE_PIXELS): "
                 "damaged or hostile; raise SHARDS_MAX_IMAGE_PIXELS if it is genuine")
    if geo.get("min_size") is not None and (not _is_int(geo["min_size"]) or geo["min_size"] < 0):
        p.append(f"geometry.min_size must be null or an integer >= 0, got {geo['min_size']!r}")
    if geo.get("max_aspect") is not None and (not _is_number(geo["max_aspect"]) or geo["max_aspect"] < 0):
        p.append(f"geometry.max_aspect must be null or a number >= 0, got {geo['max_aspect']!r}")
    return p


def _dtype_problems(dt: dict) -> list[str]:
    if dt.get("storage") not in schema.DTYPES:
        return [f"dtypes.storage must be one of {list(schema.DTYPES)}, got {dt.get('storage')!r}"]
    return []


def _encoder_problems(enc: dict) -> list[str]:
    p = []
    if not isinstance(enc.get("model"), str):
        p.append(f"encoder.model must be a string, got {enc.get('model')!r}")
    for k in ("revision", "variant", "vae"):
        if enc.get(k) is not None and not isinstance(enc[k], str):
            p.append(f"encoder.{k} must be a string or null, got {enc[k]!r}")
    for k, v in enc.items():
        if k.endswith("_fingerprint") and v is not None and not isinstance(v, str):
            p.append(f"encoder.{k} must be a string or null, got {v!r}")
    return p


def _condition_problems(cond: Any) -> list[str]:
    if cond is None:
        return []
    if not isinstance(cond, dict):
        return [f"condition must be an object, got {type(cond).__name__}"]
    p = []
    if not isinstance(cond.get("method", "dataset"), str):
        p.append(f"condition.method must be a string, got {cond.get('method')!r}")
    if cond.get("params") is not None and not isinstance(cond["params"], dict):
        p.append(f"condition.params must be an object, got {cond['params']!r}")
    if not isinstance(cond.get("soft", False), bool):
        p.append(f"condition.soft must be true or false, got {cond.get('soft')!r}")
    return p
