"""The server's settings: one schema, read from the command line (`python -m engine.serve`), from Ray's
``serve run engine.serve.app:app_builder key=value ...`` and from the ``args:`` of a Serve config file.

Every field states its type and bounds once; the parser, the error messages (``--max-batch: got 0, expected a value
>= 1``) and `app_builder`'s checks all come from here.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.config import PRESETS
from engine.prompt_length import CLIP_TOKENS, MAX_T5_TOKENS
from engine.schema import Schema, SchemaError, invalid, text_value, validate

# The longest prompt_embeds the SD3/SD3.5 pipelines produce: 77 CLIP tokens, then T5 at max_sequence_length <= 512
# (diffusers refuses more). Flow-GRPO sends 77 + 128, the pipeline's default is 77 + 256. Joint attention grows
# with the text tokens, so an uncapped prompt is a cost any caller could impose (65,536 tokens: 33 s on the tiny
# preset).
MAX_PROMPT_TOKENS = CLIP_TOKENS + MAX_T5_TOKENS

# RFC 6750 b64token: what can follow "Bearer " in an Authorization header.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_AUTOSCALE = re.compile(r"(\d{1,4}):(\d{1,4})")


class ServeConfig(Schema):
    """What the application is: the model its replicas load and how requests are admitted, batched and answered."""

    # the model (exactly one of checkpoint / preset)
    checkpoint: str | None = Field(None, description="reward checkpoint directory (with --base unless it holds "
                                   "the backbone)")  # fmt: skip
    preset: Literal[tuple(PRESETS)] | None = Field(None, description="random weights, seed 0 (for trying the server)")
    base: str | None = Field(None, description="SD3/SD3.5 diffusers directory or single file (with --checkpoint)")
    dtype: Literal["bf16", "fp8", "fp16", "fp32"] = Field("bf16", description="the engine's compute dtype")
    device: Literal["cuda", "cpu"] | None = Field(
        None, description="where replicas compute, one GPU each on cuda (default: cuda when this process sees one)"
    )
    # replicas
    replicas: int | None = Field(None, ge=1, le=1024, description="Scorer replicas, one engine each (default 1)")
    autoscale: str | None = Field(None, description="MIN:MAX Scorer replicas, scaled by Ray Serve on queued "
                                  "requests (instead of --replicas; quote it in YAML: \"1:4\")")  # fmt: skip
    # batching and admission
    max_batch: int = Field(16, ge=1, le=4096, description="requests per batch (@serve.batch max_batch_size)")
    batch_wait_ms: float = Field(10.0, ge=0, le=10_000, description="how long a batch waits to fill (ms)")
    max_ongoing: int | None = Field(None, ge=1, le=65_536, description="requests in flight per replica, at least "
                                    "--max-batch (default 2 x --max-batch)")  # fmt: skip
    max_queued: int = Field(256, ge=1, le=65_536, description="requests waiting for a replica before 503")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of a 503 (seconds)")
    cache_size: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="conditioned prompt rows kept per replica, and as many (prompt row, t) levels (an LRU each)",
    )
    # what one request may be
    max_request_mb: float = Field(256.0, gt=0, le=4096, description="larger bodies are answered 413 (MiB)")
    max_prompt_tokens: int = Field(MAX_PROMPT_TOKENS, ge=1, le=4096, description="longest prompt_embeds accepted "
                                   "(77 CLIP + T5 tokens; SD3 pipelines produce at most 77 + 512)")  # fmt: skip
    # slow senders
    upload_timeout_s: float = Field(60.0, gt=0, le=3600, description="a request body must arrive within this "
                                    "time of its headers, else 408")  # fmt: skip
    max_uploads: int = Field(512, ge=1, le=65_536, description="request bodies received at once per ingress "
                             "replica; more are answered 503")  # fmt: skip
    max_uploads_per_client: int = Field(64, ge=1, le=65_536, description="request bodies received at once from "
                                        "one client address")  # fmt: skip
    token: str | None = Field(None, description="require 'Authorization: Bearer TOKEN' on POST /score (else 401)")

    @field_validator("token")
    @classmethod
    def _bearer_token(cls, token: str | None) -> str | None:
        if token is not None and not _BEARER_TOKEN.fullmatch(token):
            raise ValueError("a non-empty bearer token (RFC 6750: letters, digits, -._~+/, then any '='); an "
                             "empty token would let 'Bearer ' through")  # fmt: skip
        return token

    @field_validator("autoscale", mode="before")
    @classmethod
    def _min_max(cls, autoscale: Any) -> str | None:
        if autoscale is None:
            return None
        if not isinstance(autoscale, str):  # YAML reads an unquoted 1:4 as the base-60 integer 64
            raise ValueError('MIN:MAX as text (in YAML quote it: autoscale: "1:4")')
        match = _AUTOSCALE.fullmatch(autoscale)
        if not match or int(match[2]) < max(1, int(match[1])):
            raise ValueError("MIN:MAX replicas with 0 <= MIN <= MAX, 1 <= MAX <= 9999 (e.g. 1:4)")
        return autoscale

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if (self.checkpoint is None) == (self.preset is None):
            raise invalid("checkpoint", self.checkpoint, "exactly one of --checkpoint or --preset")
        if self.base is not None and self.checkpoint is None:
            raise invalid("base", self.base, "--base only with --checkpoint (a preset has no base)")
        if self.replicas is not None and self.autoscale is not None:
            raise invalid("replicas", self.replicas, "either --replicas or --autoscale, not both")
        if self.max_ongoing is not None and self.max_ongoing < self.max_batch:
            raise invalid("max_ongoing", self.max_ongoing, f"at least --max-batch {self.max_batch} (a replica "
                          "that takes fewer requests never fills a batch)")  # fmt: skip
        if self.max_uploads_per_client > self.max_uploads:
            raise invalid("max_uploads_per_client", self.max_uploads_per_client,
                          f"at most --max-uploads {self.max_uploads}")  # fmt: skip
        return self

    # ------------------------------------------------------------------------------------- derived values

    @property
    def ongoing_per_replica(self) -> int:
        return self.max_ongoing if self.max_ongoing is not None else 2 * self.max_batch

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) Scorer replicas; equal without --autoscale."""
        if self.autoscale is None:
            n = self.replicas or 1
            return n, n
        low, high = self.autoscale.split(":")
        return int(low), int(high)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def admitted_requests(self) -> int:
        """The most requests the Scorers hold at once (in flight on every replica, plus waiting in the handle's
        queue); past it the handle refuses with 503."""
        return self.ongoing_per_replica * self.replica_range[1] + self.max_queued

    def resolved_device(self) -> str:
        import torch

        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


class ServeFlags(ServeConfig):
    """`python -m engine.serve`: the application's settings plus where this process serves it."""

    host: str = Field("127.0.0.1", min_length=1, description="HTTP bind address (0.0.0.0 to serve other machines)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    name: str = Field("dit-reward", min_length=1, max_length=128, description="Ray Serve application name "
                      "(scorer_handle(name=...) finds it)")  # fmt: skip
    num_cpus: int | None = Field(None, ge=1, le=4096, description="CPUs of a locally started Ray (default: all)")


def config_from_args(args: Any, source: str = "engine.serve.app:app_builder") -> ServeConfig:
    """A `ServeConfig` from an app builder's arguments: ``serve run ... key=value`` gives text (converted by each
    field's type, as on a command line), a Serve config file's ``args:`` gives typed values."""
    if isinstance(args, ServeConfig):
        return args
    if not isinstance(args, dict):
        raise SchemaError(f"{source}: got {type(args).__name__}, expected a mapping of arguments")
    fields = ServeConfig.model_fields
    values = {k: text_value(fields[k].annotation, v) if k in fields and isinstance(v, str) else v
              for k, v in args.items()}  # fmt: skip
    return validate(ServeConfig, values, source)
