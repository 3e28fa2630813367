"""Encode every image once (VAE posterior mean -> transformer-space latents) and every unique prompt once (SD3's three
text encoders) into safetensors shards plus ``index.json``; training and probing then never touch the VAE or text
encoders.

    python -m training.cache --json train.json --val-json val.json --base SD35_DIR --out CACHE_DIR \
        [--area 1048576] [--max-sequence-length 256] [--image-root DIR] [--on-bad-image skip]

Every flag is a field of `CacheFlags` (type, bounds, help); `build_cache` takes the same values as arguments.

Aspect-ratio buckets (`training.buckets`): each image is resized to the bucket nearest its aspect ratio among the
buckets of about ``--area`` pixels, sides multiples of 16. The default area is the largest whose buckets the base's
position embedding takes, at most 1024² (SD3.5-L's training size; the tiny test base takes at most 71,808); a larger
area is refused, naming the largest valid one, before any model is loaded. Each image keeps its own bucket, so the two
images of a pair may differ in size; the index records every image's bucket, and the area is one of the cache's
settings (a reward checkpoint records it, and `bench.accuracy` encodes with it, so its latents equal the cache's).

Each image file is read once, as a regular file (a FIFO is refused, never opened for reading), hashed (sha256, stored
in the index) and decoded from those bytes. The digests make the cache's fingerprint cover the images' contents, so a
trainer resuming on a cache rebuilt from changed images refuses to, and a pair whose two paths hold the same bytes (a
hard link, a copy) is refused as comparing an image with itself.

Validation files go under ``--val-json``: the confidence filter applies to the training files only, since the trainer
scores every held-out pair. Mixing weights (``train.json:0.5``) do not change what is cached: every pair of a file
that passes the filters is, so whatever subset the trainer's seed draws is there. With ``--on-bad-image skip`` the
index also records every image that is missing or does not decode, with the reason: the trainer and the probe read
that instead of decoding every image again at start-up.

Resumable: the plan (which item goes to which shard) is a pure function of the inputs and is written first; each shard
is written to a temp file and ``os.replace``d into place, so a shard file that exists is complete, and a rerun after
an interruption skips those and encodes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from safetensors.torch import save_file
from tqdm.auto import tqdm

from engine.config import BackboneConfig
from engine.io.atomic import atomic_write, atomic_write_text
from engine.io.files import FileInputError, inside, is_regular_file, read_json
from engine.schema import Schema, flag_name, invalid, load_file, parse_cli, validate
from training.buckets import BUCKET_MULTIPLE, aspect_buckets, largest_area, max_image_side, nearest_bucket
from training.data import (
    DataRules,
    ImageFile,
    PreferencePair,
    inspect_image,
    load_pairs,
    parse_sources,
    read_file,
    read_image,
)
from training.files import open_safetensors

CACHE_FORMAT = "dit-reward-cache/3"  # index.json: settings, shards, each image's aspect bucket and digest, bad images
INDEX = "index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_AREA = 1024 * 1024  # px: SD3.5-L's training resolution; the default area is this or the base's largest
MAX_T5_TOKENS = 512  # SD3's T5 encoder was trained on at most 512 tokens (diffusers refuses more)
PROG = "python -m training.cache"

Name = Annotated[str, Field(min_length=1)]
Pair = Annotated[list[str], Field(min_length=2, max_length=2)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


# ------------------------------------------------------------------------------------------------------ schemas


class CacheFlags(DataRules):
    """The cache's inputs: the command line's flags and `build_cache`'s arguments (and `DataRules`: the path rule,
    the confidence filter for the training files, the bad-image policy)."""

    train_json: Annotated[list[Name], Field(min_length=1)] = Field(
        description="HPSv3-format training files (file.json:w as well)", json_schema_extra={"cli": {"short": "--json"}}
    )
    val_json: list[Name] = Field(
        default_factory=list, description="held-out HPSv3-format files: every pair is cached (no confidence filter)"
    )
    base: Name = Field(description="local SD3/SD3.5 diffusers directory (VAE + text encoders)")
    out: Name = Field(description="cache directory (created; rerun with the same arguments resumes)")
    max_sequence_length: int = Field(
        256, ge=1, le=MAX_T5_TOKENS, description="T5 tokens (SD3: 256, Flow-GRPO: 128; SD3's T5 takes at most 512)"
    )
    shard_size: int = Field(
        256, ge=1, le=4096, description="items per safetensors shard (held in memory until written: 4096 latents at "
        "1024² are 4 GiB)"
    )  # fmt: skip
    area: int | None = Field(
        None, ge=BUCKET_MULTIPLE**2, description="pixel area of the aspect-ratio buckets (default: the largest the "
        "base's position embedding takes, at most 1024²)"
    )  # fmt: skip
    dtype: Literal[tuple(DTYPES)] = Field("fp32", description="latents and embeddings as stored")  # type: ignore[valid-type]
    device: str | None = Field(None, description="default: cuda if available")
    batch_size: int = Field(16, ge=1, le=1024, description="images/prompts per encoder call")

    @model_validator(mode="after")
    def _fits_the_base(self, info: ValidationInfo) -> CacheFlags:
        backbone: BackboneConfig | None = (info.context or {}).get("backbone")
        if backbone is not None and self.area is not None:
            side = max_image_side(backbone)
            limit = largest_area(side)
            if self.area > limit:
                raise invalid(
                    "area", self.area, f"at most {limit}, the largest area whose buckets (up to 4:1) fit the base's "
                    f"position embedding of {side} px per side"
                )  # fmt: skip
        return self


class CacheSettings(Schema):
    """How the cache was encoded (a reward checkpoint records it: bench.accuracy encodes the same way)."""

    base: Name
    max_sequence_length: int = Field(ge=1, le=MAX_T5_TOKENS)
    area: int = Field(ge=BUCKET_MULTIPLE**2)
    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]


class Shard(Schema):
    file: Annotated[str, Field(pattern=r"^(images|prompts)-\d{5}\.safetensors$")]
    kind: Literal["images", "prompts"]
    items: Annotated[list[str], Field(min_length=1)]


class CacheIndex(Schema):
    """``index.json``: the settings, the plan (which item is in which shard, at which row), every image's aspect
    bucket (height, width) and sha256, and the images the cache could not read, with the reason."""

    format: str
    fingerprint: Sha256
    settings: CacheSettings
    shards: list[Shard]
    images: dict[str, Pair]
    prompts: dict[str, Pair]
    buckets: dict[str, Annotated[list[Annotated[int, Field(ge=BUCKET_MULTIPLE)]], Field(min_length=2, max_length=2)]]
    digests: dict[str, Sha256]
    bad_images: dict[str, Pair] = Field(default_factory=dict)

    @field_validator("format")
    @classmethod
    def _this_format(cls, value: str) -> str:
        if value != CACHE_FORMAT:
            raise ValueError(f"{CACHE_FORMAT!r} (a cache of another version: rebuild it with {PROG})")
        return value

    @model_validator(mode="after")
    def _plan_is_whole(self) -> CacheIndex:
        rows = {(s.kind, s.file): len(s.items) for s in self.shards}
        for kind in ("images", "prompts"):
            for item, (file, row) in getattr(self, kind).items():
                if not row.isdigit() or int(row) >= rows.get((kind, file), 0):
                    raise invalid(f"{kind}[{item[:60]!r}]", [file, row], f"a row of one of the {kind} shards")
        for item in self.images:
            if item not in self.buckets or item not in self.digests:
                raise invalid("images", item, "an image with a bucket and a digest")
        return self


# ------------------------------------------------------------------------------------------------------ encoding


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values()) + 64 * len(tensors)  # + the JSON header
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)), nbytes)  # a shard on disk is whole or absent


def image_bucket(height: int, width: int, area: int) -> tuple[int, int]:
    """(height, width) in pixels of the bucket an image of `height` x `width` pixels is resized to at `area`."""
    return nearest_bucket(height, width, aspect_buckets(area))


def load_bucketed(encoder: Any, path: Path, area: int) -> torch.Tensor:
    """One image file -> ``[3, h, w]`` in [0, 1] at its aspect bucket (decoded as the pixel front end decodes,
    resized with its interpolation, checked against the backbone's size limit by `encoder.load`)."""
    from engine.pixel import load_images, resize_pixels

    with read_image(path) as image:
        (pixels,) = load_images([image], size_multiple=1)  # decode and convert only, at the file's own size
    pixels = resize_pixels(pixels, image_bucket(*pixels.shape[-2:], area))
    return encoder.load([pixels])[0]  # a bucket is a multiple of 16 px: not resampled again


def encode_image_files(
    front: Any, paths: Sequence[Path], area: int = DEFAULT_AREA, names: Mapping[Path, str] | None = None
) -> list[torch.Tensor]:
    """Image files -> one latent ``[C, h/8, w/8]`` per path at its aspect bucket (transformer space, the front end's
    dtype), in order. The one image path of the project: the cache and `bench.accuracy` both call it, so their
    latents agree. An image that fails to load is a ValueError naming the file and, from `names` (path -> "file
    record i"), its record."""
    encoder = front.image_encoder
    pixels = []
    for path in paths:
        try:
            pixels.append(load_bucketed(encoder, path, area))
        except (ValueError, TypeError, OSError) as e:
            record = f" ({names[path]})" if names and path in names else ""
            raise ValueError(f"image {path}{record}: {e}".replace("images[0]", "the image")) from e
    out: list[torch.Tensor | None] = [None] * len(paths)
    for index, latents in encoder.encode_loaded(pixels, progress=False):
        for i, latent in zip(index.tolist(), latents, strict=True):
            out[i] = latent
    return out  # type: ignore[return-value]


def _plan(pairs: Sequence[PreferencePair], shard_size: int, area: int, found: Mapping[str, ImageFile]) -> dict:
    images = sorted({str(p.winner) for p in pairs} | {str(p.loser) for p in pairs})
    prompts = sorted({p.prompt for p in pairs})
    buckets = {image: list(image_bucket(*found[image].size, area)) for image in images}
    shards, index = [], {"images": {}, "prompts": {}, "buckets": buckets}
    for kind, items in (("images", images), ("prompts", prompts)):
        for n, start in enumerate(range(0, len(items), shard_size)):
            name = f"{kind}-{n:05d}.safetensors"
            chunk = items[start : start + shard_size]
            shards.append({"file": name, "kind": kind, "items": chunk})
            index[kind].update({item: [name, str(row)] for row, item in enumerate(chunk)})
    return {"shards": shards, **index, "digests": {image: found[image].digest for image in images}}


def _shard_keys(shard: Shard | Mapping[str, Any]) -> set[str]:
    kind, items = (shard.kind, shard.items) if isinstance(shard, Shard) else (shard["kind"], shard["items"])
    if kind == "images":
        return {str(row) for row in range(len(items))}
    return {f"{row}.{part}" for row in range(len(items)) for part in ("embeds", "pooled")}


def _shard_complete(path: Path, shard: Mapping[str, Any]) -> bool:
    try:
        return set(open_safetensors(path, "cache shard").keys()) == _shard_keys(shard)
    except FileInputError:  # missing, truncated, foreign, not a regular file: (re-)encode it
        return False


def same_image_error(pair: PreferencePair, digest: str) -> ValueError:
    return ValueError(
        f"{pair.source} record {pair.index}: path1 {pair.winner} and path2 {pair.loser} hold the same image "
        f"(identical bytes, sha256 {digest[:16]}...); a pair compares two images"
    )


def build_cache(
    json_files: Sequence[str | os.PathLike],
    base: str | os.PathLike,
    out: str | os.PathLike,
    max_sequence_length: int = 256,
    shard_size: int = 256,
    confidence_threshold: float | None = 0.95,
    on_bad_image: str = "error",
    area: int | None = None,
    dtype: str = "fp32",
    device: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
    val_json: Sequence[str | os.PathLike] = (),
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> Path:
    """Encode the images and prompts of `json_files` and `val_json` into `out` (see the module docstring). Returns
    `out`. Arguments as `CacheFlags` (the command line's flags); `area` defaults to the largest the base takes, at
    most 1024². Held-out files (`val_json`) skip the confidence filter, as the trainer, the probe and bench.accuracy
    read them: every held-out pair counts."""
    args = {
        "train_json": [os.fspath(f) for f in json_files], "val_json": [os.fspath(f) for f in val_json], "base": base,
        "out": out, "max_sequence_length": max_sequence_length, "shard_size": shard_size,
        "confidence_threshold": confidence_threshold, "on_bad_image": on_bad_image, "area": area, "dtype": dtype,
        "device": device, "batch_size": batch_size, "image_root": image_root, "allow_outside_root": allow_outside_root,
    }  # fmt: skip
    flags = validate(CacheFlags, args, PROG, flag=flag_name)
    # The base's size limit first (its config only), then the data (every image decoded): both before any model loads.
    from engine.io.backbone import base_source

    backbone = base_source(flags.base)[0]
    if flags.area is None:
        args["area"] = min(DEFAULT_AREA, largest_area(max_image_side(backbone)))
    flags = validate(CacheFlags, args, PROG, flag=flag_name, context={"backbone": backbone})
    found: dict[str, ImageFile] = {}  # each image read, hashed and decoded once, however many pairs use it

    def check(path: Path) -> tuple[str, str] | None:
        if str(path) not in found:
            found[str(path)] = inspect_image(path)
        return found[str(path)].problem

    roots = {"image_root": flags.image_root, "allow_outside_root": flags.allow_outside_root, "image_check": check}
    # Every kept pair of each file, whatever its mixing weight: the trainer draws a fractional weight's subset with its
    # own seed, so the cache must hold all the pairs that draw can pick.
    files = [path for path, _ in parse_sources(flags.train_json)]
    pairs, report = load_pairs(files, flags.confidence_threshold, flags.on_bad_image, **roots)
    for path in flags.val_json:
        held_out = read_file(path, None, flags.on_bad_image, report, **roots)
        report.weighted[str(Path(path).resolve())] += len(held_out)
        pairs += held_out
    for pair in pairs:
        if found[str(pair.winner)].digest == found[str(pair.loser)].digest:
            raise same_image_error(pair, found[str(pair.winner)].digest)
    if progress:
        print(report)
    settings = CacheSettings(
        base=str(Path(flags.base).resolve()),
        max_sequence_length=flags.max_sequence_length,
        area=flags.area,
        dtype=flags.dtype,
    ).to_dict()
    plan = _plan(pairs, flags.shard_size, flags.area, found)
    fingerprint = hashlib.sha256(
        json.dumps([settings, plan["shards"], plan["buckets"], plan["digests"]]).encode()
    ).hexdigest()
    out = Path(flags.out)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / INDEX
    if is_regular_file(index_path, "cache index"):
        old = read_json(index_path, "cache index")
        if not isinstance(old, dict) or old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out} holds a cache of other inputs, settings or image contents "
                f"({old.get('settings') if isinstance(old, dict) else 'unreadable'}); pass a new --out directory (or "
                "delete this one)"
            )
    bad = {path: list(f.problem) for path, f in sorted(found.items()) if f.problem is not None}
    index = CacheIndex(format=CACHE_FORMAT, fingerprint=fingerprint, settings=settings, bad_images=bad, **plan)
    atomic_write_text(index_path, json.dumps(index.to_dict()))
    for stale in out.glob(".*.tmp-*"):  # temp files of an interrupted run; never read
        stale.unlink(missing_ok=True)

    todo = [s for s in plan["shards"] if not _shard_complete(out / s["file"], s)]
    if not todo:
        return out
    from engine.pixel import PixelFrontEnd

    front = PixelFrontEnd.from_pretrained(
        flags.base, device=flags.device, dtype=DTYPES[flags.dtype], max_sequence_length=flags.max_sequence_length,
        vae_batch_size=flags.batch_size,
    )  # fmt: skip
    names = {image: f"{p.source} record {p.index}" for p in pairs for image in (p.winner, p.loser)}
    bar = tqdm(total=sum(len(s["items"]) for s in todo), desc="cache", unit="item", disable=not progress)
    for shard in todo:
        items, tensors = shard["items"], {}
        for start in range(0, len(items), flags.batch_size):
            chunk = items[start : start + flags.batch_size]
            if shard["kind"] == "images":
                latents = encode_image_files(front, [Path(p) for p in chunk], flags.area, names)
                for row, latent in enumerate(latents, start):
                    tensors[str(row)] = latent
            else:
                embeds, pooled = front.encode_prompts(chunk, progress=False)
                for row in range(len(chunk)):
                    tensors[f"{start + row}.embeds"], tensors[f"{start + row}.pooled"] = embeds[row], pooled[row]
                front.prompt_encoder.clear_cache()  # each prompt is encoded once; keeping them only costs memory
            bar.update(len(chunk))
        _save_shard(tensors, out / shard["file"])
    bar.close()
    return out


# ------------------------------------------------------------------------------------------------------ reading


class LatentCache:
    """Read side of a cache directory: latents by image path, embeddings by prompt, read lazily from memory-mapped
    shards (a 1M-image cache need not fit in RAM). The index is read through the safe reader and checked by
    `CacheIndex`; every shard it names must lie inside the directory, be a regular file and hold its rows."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not is_regular_file(index_path, "cache index"):
            raise FileNotFoundError(f"{self.directory} is not a training cache ({INDEX} missing): run {PROG} first")
        index = load_file(CacheIndex, index_path, "cache index")
        self.settings: dict[str, Any] = index.settings.to_dict()
        self.fingerprint: str = index.fingerprint  # of the inputs, their contents and the settings
        self.images: dict[str, list[str]] = index.images
        self.prompts: dict[str, list[str]] = index.prompts
        self.buckets: dict[str, tuple[int, int]] = {k: tuple(v) for k, v in index.buckets.items()}
        self.digests: dict[str, str] = index.digests  # sha256 of each image's bytes when the cache read it
        self.bad_images: dict[str, tuple[str, str]] = {k: tuple(v) for k, v in index.bad_images.items()}
        paths = [inside(self.directory, s.file, f"{index_path}: shards[{i}].file") for i, s in enumerate(index.shards)]
        missing = [s.file for s, path in zip(index.shards, paths, strict=True) if not is_regular_file(path, "shard")]
        if missing:
            raise ValueError(
                f"cache {self.directory} is incomplete ({len(missing)} shards missing, e.g. {missing[0]}): rerun "
                f"{PROG} with the same arguments to finish it"
            )
        self._handles: dict[str, Any] = {}
        for shard, path in zip(index.shards, paths, strict=True):
            try:
                handle = open_safetensors(path, "cache shard")
            except FileInputError as e:
                raise ValueError(f"{e}: rerun {PROG} with the same arguments to re-encode it") from None
            if set(handle.keys()) != _shard_keys(shard):
                raise ValueError(
                    f"{path}: cache shard holds other rows than {INDEX} lists: rerun {PROG} with the same arguments "
                    "(or rebuild the cache)"
                )
            self._handles[shard.file] = handle

    def _get_handle(self, name: str) -> Any:
        return self._handles[name]

    def _get(self, name: str, key: str) -> torch.Tensor:
        return self._get_handle(name).get_tensor(key)

    def check(self, pairs: Sequence[PreferencePair]) -> None:
        """ValueError naming the first image or prompt of `pairs` that the cache lacks, or the first pair whose two
        images hold the same bytes."""
        for p in pairs:
            for image in (p.winner, p.loser):
                if str(image) not in self.images:
                    raise ValueError(
                        f"image {image} ({p.source} record {p.index}) is not in cache {self.directory}: "
                        "build the cache from the same JSON files with the same confidence threshold and on_bad_image "
                        "(validation files under --val-json)"
                    )
            if self.digests[str(p.winner)] == self.digests[str(p.loser)]:
                raise same_image_error(p, self.digests[str(p.winner)])
            if p.prompt not in self.prompts:
                raise ValueError(
                    f"prompt {p.prompt[:60]!r} ({p.source} record {p.index}) is not in cache {self.directory}"
                )

    def latent(self, path: str | os.PathLike) -> torch.Tensor:
        """``[C, h, w]`` transformer-space latent of one image."""
        return self._get(*self.images[str(path)])

    def prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [L, joint_dim], pooled [pooled_dim])`` of one prompt."""
        name, row = self.prompts[prompt]
        return self._get(name, f"{row}.embeds"), self._get(name, f"{row}.pooled")

    def image_problem(self, path: Path) -> tuple[str, str] | None:
        """`training.data.image_problem` as the cache found it, without decoding: the recorded reason for an image
        the cache could not read, ``missing_image`` for a file that is not there, else None (an image the cache lacks
        for another reason is `check`'s error)."""
        if str(path) in self.bad_images:
            return self.bad_images[str(path)]
        if str(path) in self.images:
            return None
        try:
            return None if is_regular_file(path, "image") else ("missing_image", "no such file")
        except FileInputError as e:
            return "unreadable_image", str(e)

    def bucket(self, path: str | os.PathLike) -> tuple[int, int]:
        """(height, width) in pixels of the aspect bucket one image was encoded at."""
        return self.buckets[str(path)]

    def pair_key(self, pair: PreferencePair) -> tuple[tuple[int, int], tuple[int, int]]:
        """(winner bucket, loser bucket): what the trainer's bucketed sampler groups pairs by."""
        return self.bucket(pair.winner), self.bucket(pair.loser)

    def latent_shape(self, path: str | os.PathLike) -> tuple[int, ...]:
        """``(C, h, w)`` of one image's latent, from its shard's header (no data read)."""
        name, key = self.images[str(path)]
        return tuple(self._get_handle(name).get_slice(key).get_shape())

    def batch(self, pairs: Sequence[PreferencePair]) -> dict[str, Any]:
        """Tensors of `pairs`: winners and losers as lists of B latents ``[C, h, w]`` (each image at its own bucket,
        for `training.batching`), prompt_embeds ``[B, L, D]``, pooled ``[B, P]`` stacked."""
        embeds, pooled = zip(*(self.prompt(p.prompt) for p in pairs), strict=True)
        return {
            "winners": [self.latent(p.winner) for p in pairs],
            "losers": [self.latent(p.loser) for p in pairs],
            "prompt_embeds": torch.stack(embeds),
            "pooled": torch.stack(pooled),
        }


def main(argv: list[str] | None = None) -> None:
    flags = parse_cli(CacheFlags, argv, PROG, __doc__.split("\n\n")[0])
    values = flags.to_dict()
    out = build_cache(values.pop("train_json"), values.pop("base"), values.pop("out"), **values)
    print(f"cache ready: {out}")


if __name__ == "__main__":
    main()


__all__ = [
    "CacheFlags",
    "CacheIndex",
    "DEFAULT_AREA",
    "LatentCache",
    "build_cache",
    "encode_image_files",
    "image_bucket",
    "load_bucketed",
]
