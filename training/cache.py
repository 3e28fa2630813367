"""Encode every image once (VAE posterior mean -> transformer-space latents) and every unique prompt once (SD3's three
text encoders) into safetensors shards plus ``index.json``; training and probing then never touch the VAE or text
encoders.

    python -m training.cache --json train.json --val-json val.json --base SD35_DIR --out CACHE_DIR \
        [--area 1048576] [--max-sequence-length 256] [--image-root DIR] [--on-bad-image skip]

Aspect-ratio buckets (`training.buckets`): each image is resized to the bucket nearest its aspect ratio among the
buckets of about ``--area`` pixels (default 1024², SD3.5-L's training size; the tiny test base works at 64²), sides
multiples of 16. Each image keeps its own bucket, so the two images of a pair may differ in size; the index records
every image's bucket, and the area is one of the cache's settings (a reward checkpoint records it, and
`bench.accuracy` encodes with it, so its latents equal the cache's).

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

import argparse
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from training.buckets import aspect_buckets, nearest_bucket
from training.data import (
    BAD_IMAGE_POLICIES,
    HPSV3_CONFIDENCE,
    PreferencePair,
    add_path_rule_arguments,
    image_problem,
    load_pairs,
    parse_sources,
    read_file,
)
from training.files import atomic_write, atomic_write_text

CACHE_FORMAT = "dit-reward-cache/2"  # index.json: settings, shards, each image's aspect bucket, the bad images
INDEX = "index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_AREA = 1024 * 1024  # px: SD3.5-L's training resolution


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

    (pixels,) = load_images([path], size_multiple=1)  # decode and convert only, at the file's own size
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


def _plan(pairs: Sequence[PreferencePair], shard_size: int, area: int) -> dict[str, Any]:
    images = sorted({str(p.winner) for p in pairs} | {str(p.loser) for p in pairs})
    prompts = sorted({p.prompt for p in pairs})
    buckets = {}
    for image in images:
        with Image.open(image) as opened:  # the header only: every image was decoded by the filter already
            width, height = opened.size
        buckets[image] = list(image_bucket(height, width, area))
    shards, index = [], {"images": {}, "prompts": {}, "buckets": buckets}
    for kind, items in (("images", images), ("prompts", prompts)):
        for n, start in enumerate(range(0, len(items), shard_size)):
            name = f"{kind}-{n:05d}.safetensors"
            chunk = items[start : start + shard_size]
            shards.append({"file": name, "kind": kind, "items": chunk})
            index[kind].update({item: [name, str(row)] for row, item in enumerate(chunk)})
    return {"shards": shards, **index}


def _shard_complete(path: Path, n_keys: int) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return len(list(f.keys())) == n_keys
    except Exception:  # a foreign/corrupt file at a shard name: re-encode it
        return False


def build_cache(
    json_files: Sequence[str | os.PathLike],
    base: str | os.PathLike,
    out: str | os.PathLike,
    max_sequence_length: int = 256,
    shard_size: int = 256,
    confidence_threshold: float | None = HPSV3_CONFIDENCE,
    on_bad_image: str = "error",
    area: int = DEFAULT_AREA,
    dtype: str = "fp32",
    device: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
    val_json: Sequence[str | os.PathLike] = (),
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> Path:
    """Encode the images and prompts of `json_files` and `val_json` into `out` (see the module docstring). Returns
    `out`. Held-out files (`val_json`) skip the confidence filter, as the trainer, the probe and bench.accuracy read
    them: every held-out pair counts. `area`: the buckets' pixel area. `image_root` / `allow_outside_root`: the path
    rule of `training.data`."""
    aspect_buckets(area)  # ValueError for an area that has no buckets, before any work
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    from engine.pixel import PixelFrontEnd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Every kept pair of each file, whatever its mixing weight: the trainer draws a fractional weight's subset with its
    # own seed, so the cache must hold all the pairs that draw can pick.
    files = [path for path, _ in parse_sources(json_files)]
    bad_images: dict[str, list[str]] = {}  # what failed, for the trainer
    checked: dict[str, tuple[str, str] | None] = {}

    def check(path: Path) -> tuple[str, str] | None:  # each image decoded once, however many pairs use it
        if str(path) not in checked:
            checked[str(path)] = problem = image_problem(path)
            if problem is not None:
                bad_images[str(path)] = list(problem)
        return checked[str(path)]

    roots = {"image_root": image_root, "allow_outside_root": allow_outside_root, "image_check": check}
    pairs, report = load_pairs(files, confidence_threshold, on_bad_image, **roots)
    for path in val_json:
        held_out = read_file(path, None, on_bad_image, report, **roots)
        report.weighted[str(Path(path).resolve())] += len(held_out)
        pairs += held_out
    if progress:
        print(report)
    settings = {
        "base": str(Path(base).resolve()),
        "max_sequence_length": max_sequence_length,
        "area": area,
        "dtype": dtype,
    }
    plan = _plan(pairs, shard_size, area)
    fingerprint = hashlib.sha256(json.dumps([settings, plan["shards"], plan["buckets"]]).encode()).hexdigest()
    index_path = out / INDEX
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out} holds a cache of other inputs or settings ({old.get('settings')}); pass a new "
                "--out directory (or delete this one)"
            )
    index = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "settings": settings, **plan}
    atomic_write_text(index_path, json.dumps({**index, "bad_images": dict(sorted(bad_images.items()))}))
    for stale in out.glob(".*.tmp-*"):  # temp files of an interrupted run; never read
        stale.unlink(missing_ok=True)

    todo = [
        s
        for s in plan["shards"]
        if not _shard_complete(out / s["file"], len(s["items"]) * (2 if s["kind"] == "prompts" else 1))
    ]
    if not todo:
        return out
    front = PixelFrontEnd.from_pretrained(
        base, device=device, dtype=DTYPES[dtype], max_sequence_length=max_sequence_length, vae_batch_size=batch_size
    )
    names = {image: f"{p.source} record {p.index}" for p in pairs for image in (p.winner, p.loser)}
    bar = tqdm(total=sum(len(s["items"]) for s in todo), desc="cache", unit="item", disable=not progress)
    for shard in todo:
        items, tensors = shard["items"], {}
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if shard["kind"] == "images":
                latents = encode_image_files(front, [Path(p) for p in chunk], area, names)
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


class LatentCache:
    """Read side of a cache directory: latents by image path, embeddings by prompt, read lazily from memory-mapped
    shards (a 1M-image cache need not fit in RAM)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{self.directory} is not a training cache ({INDEX} missing): run python -m training.cache first"
            )
        index = json.loads(index_path.read_text())
        if index.get("format") != CACHE_FORMAT:
            raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {CACHE_FORMAT!r}")
        self.settings: dict[str, Any] = index["settings"]
        self.fingerprint: str = index["fingerprint"]  # of the inputs and settings the cache was built from
        self.images: dict[str, list[str]] = index["images"]
        self.prompts: dict[str, list[str]] = index["prompts"]
        self.buckets: dict[str, tuple[int, int]] = {k: tuple(v) for k, v in index["buckets"].items()}
        self.bad_images: dict[str, tuple[str, str]] = {k: tuple(v) for k, v in index["bad_images"].items()}
        incomplete = [s["file"] for s in index["shards"] if not (self.directory / s["file"]).is_file()]
        if incomplete:
            raise ValueError(
                f"cache {self.directory} is incomplete ({len(incomplete)} shards missing, e.g. "
                f"{incomplete[0]}): rerun python -m training.cache to finish it"
            )
        self._handles: dict[str, Any] = {}

    def _get_handle(self, name: str) -> Any:
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.directory / name), framework="pt")
        return self._handles[name]

    def _get(self, name: str, key: str) -> torch.Tensor:
        return self._get_handle(name).get_tensor(key)

    def check(self, pairs: Sequence[PreferencePair]) -> None:
        """ValueError naming the first image or prompt of `pairs` that the cache lacks."""
        for p in pairs:
            for image in (p.winner, p.loser):
                if str(image) not in self.images:
                    raise ValueError(
                        f"image {image} ({p.source} record {p.index}) is not in cache {self.directory}: "
                        "build the cache from the same JSON files with the same confidence threshold and on_bad_image "
                        "(validation files under --val-json)"
                    )
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
        if str(path) not in self.images and not path.is_file():
            return "missing_image", "no such file"
        return None

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
    parser = argparse.ArgumentParser(prog="python -m training.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", nargs="+", required=True, help="HPSv3-format training files (file.json:w as well)")
    parser.add_argument(
        "--val-json",
        nargs="+",
        default=[],
        help="held-out HPSv3-format files: every pair is cached (no confidence filter)",
    )
    parser.add_argument("--base", required=True, help="local SD3/SD3.5 diffusers directory (VAE + text encoders)")
    parser.add_argument("--out", required=True, help="cache directory (created; rerun with the same args resumes)")
    parser.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (SD3: 256, Flow-GRPO: 128)")
    parser.add_argument("--shard-size", type=int, default=256, help="items per safetensors shard")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=HPSV3_CONFIDENCE,
        help="drop pairs below this confidence (HPSv3: 0.95; null passes); -1 keeps all",
    )
    parser.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, default="error")
    add_path_rule_arguments(parser)
    parser.add_argument(
        "--area", type=int, default=DEFAULT_AREA, help="pixel area of the aspect-ratio buckets (default 1024*1024)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--batch-size", type=int, default=16, help="images/prompts per encoder call")
    args = parser.parse_args(argv)
    threshold = None if args.confidence_threshold < 0 else args.confidence_threshold
    out = build_cache(
        args.json,
        args.base,
        args.out,
        args.max_sequence_length,
        args.shard_size,
        threshold,
        args.on_bad_image,
        args.area,
        args.dtype,
        args.device,
        args.batch_size,
        val_json=args.val_json,
        image_root=args.image_root,
        allow_outside_root=args.allow_outside_root,
    )
    print(f"cache ready: {out}")


if __name__ == "__main__":
    main()


__all__ = ["DEFAULT_AREA", "LatentCache", "build_cache", "encode_image_files", "image_bucket", "load_bucketed"]
