"""Serving registered edit versions over HTTP with Ray Serve.

    POST /generate  {"prompt": "...", "max_new_tokens": 16, "version": null}
                    -> {"text": "...", "version": "3", "name": "...", "alias": "champion"}
    GET  /healthz   -> {"status": "ok", "name": ..., "alias": ..., "version": ...}
    GET  /docs      OpenAPI documentation (FastAPI)

Each replica loads the base model once and keeps the lineages (edit artifacts) of recently used
versions in memory (Serve model multiplexing: a version can be chosen per request with the
`serve_multiplexed_model_id` header or the `version` field, and Serve routes it to a replica that
already holds that version). The artifacts of one version at a time are attached to the shared
base model: a request for another version waits for the requests in flight, then the lineages
are swapped (detach is exact, so the base model never drifts). Requests without a version get
the alias's version, re-resolved every `refresh_s` seconds: when the alias moves, new requests
switch to the new version and no request is dropped. The version `base` serves the base model
with no edit attached (for comparisons).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time,
# and the request / response models are local to `build_app`.
import asyncio
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from editing_core.artifacts import EditArtifact

log = logging.getLogger(__name__)

APP_NAME = "editflow"
BASE_VERSION = "base"  # the version name that serves the base model without any edit
DEFAULT_MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS_LIMIT = 512


@dataclass(frozen=True)
class ServeOptions:
    """How the app serves a registered model.

    name:             registered model name.
    alias:            the alias that requests without a version get (default champion).
    tracking_uri:     MLflow tracking URI of the registry.
    refresh_s:        how often a replica re-resolves the alias.
    replicas:         number of replicas.
    cpus_per_replica: CPUs each replica reserves (fractional, so the app fits on 2 cores).
    max_versions:     lineages a replica keeps in memory (LRU, Serve multiplexing).
    """

    name: str
    tracking_uri: str
    alias: str = "champion"
    refresh_s: float = 10.0
    replicas: int = 1
    cpus_per_replica: float = 0.5
    max_versions: int = 4

    def __post_init__(self) -> None:
        if self.refresh_s <= 0 or self.replicas < 1 or self.cpus_per_replica <= 0 or self.max_versions < 1:
            raise ValueError(f"invalid serve options: {self}")


class VersionedModel:
    """The base model with the lineage of at most one version attached at a time.

    Used by the Serve replica; a plain class so that it is testable without Serve.
    """

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.version: "str | None" = None
        self._stack = ExitStack()

    def use(self, version: str, lineage: "tuple[EditArtifact, ...]") -> None:
        """Make `version`'s lineage the attached one (no-op when it already is)."""
        from editing_core.artifacts import attached_chain

        if version == self.version:
            return
        self._stack.close()  # detach the previous lineage, in reverse order, exactly
        self.version = None
        self._stack = ExitStack()
        self._stack.enter_context(attached_chain(self.loaded.model, lineage))
        self.version = version

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        from editing_core.evaluate import generate_texts

        return generate_texts(self.loaded, [prompt], max_new_tokens, batch_size=1)[0]


def build_app(options: ServeOptions) -> Any:
    """The Serve application (bound deployment) for `options`; nothing starts until `serve.run`."""
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel, Field
    from ray import serve

    class GenerateRequest(BaseModel):
        prompt: str = Field(min_length=1, description="text to continue")
        max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS_LIMIT)
        version: str | None = Field(None, description=f"a version number or alias, or {BASE_VERSION!r} for the "
                                    "unedited base model; default: the served alias")

    class GenerateResponse(BaseModel):
        text: str
        version: str
        name: str
        alias: str | None

    api = FastAPI(title=f"editflow: {options.name}", description="Greedy generation from registered edit versions.")

    @serve.deployment(
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.cpus_per_replica},
        health_check_period_s=10,
    )
    @serve.ingress(api)
    class EditServer:
        def __init__(self) -> None:
            import torch

            from editing_core.models import load_model
            from infra import registry

            torch.set_num_threads(max(1, int(options.cpus_per_replica)))
            self.client = registry.client_for(options.tracking_uri)
            self.alias_version = self._resolve(options.alias)
            base = (registry.get_version(self.client, options.name, self.alias_version).tags or {})[registry.TAG + "base_model"]
            self.model = VersionedModel(load_model(base))
            self.lock = asyncio.Lock()
            self.resolved_at = time.monotonic()

        def _resolve(self, version: str) -> str:
            from infra import registry

            return str(registry.get_version(self.client, options.name, version).version)

        async def _alias_version(self) -> str:
            if time.monotonic() - self.resolved_at >= options.refresh_s:
                self.alias_version = await asyncio.to_thread(self._resolve, options.alias)
                self.resolved_at = time.monotonic()
            return self.alias_version

        @serve.multiplexed(max_num_models_per_replica=options.max_versions)
        async def lineage(self, version: str) -> "tuple[EditArtifact, ...]":
            from infra import registry

            model_version = await asyncio.to_thread(registry.get_version, self.client, options.name, version)
            return (await asyncio.to_thread(registry.download_lineage, options.tracking_uri, model_version)).artifacts

        @api.get("/healthz")
        async def healthz(self) -> dict[str, Any]:
            return {"status": "ok", "name": options.name, "alias": options.alias, "version": self.alias_version}

        @api.post("/generate", response_model=GenerateResponse)
        async def generate(self, body: GenerateRequest) -> GenerateResponse:
            from infra.registry import RegistryError

            asked = body.version or serve.get_multiplexed_model_id() or None
            try:
                if asked == BASE_VERSION:
                    version, lineage = BASE_VERSION, ()
                else:
                    version = await asyncio.to_thread(self._resolve, asked) if asked else await self._alias_version()
                    lineage = await self.lineage(version)
            except RegistryError as exc:
                raise HTTPException(status_code=404, detail=str(exc)) from None
            async with self.lock:  # one version attached at a time on the shared base model
                await asyncio.to_thread(self.model.use, version, lineage)
                text = await asyncio.to_thread(self.model.generate, body.prompt, body.max_new_tokens)
            return GenerateResponse(text=text, version=version, name=options.name, alias=None if asked else options.alias)

    return EditServer.bind()


def start(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app on the current Ray session (HTTP on host:port); its base URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    log.info("serving %s@%s at %s (docs: %s/docs)", options.name, options.alias, url, url)
    return url
