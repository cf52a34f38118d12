"""The retrieval service behind `lavis-lite serve`: the model loaded once, one or more indexes, clip-retrieval's
HTTP API field for field (`POST /knn-service`, `POST /metadata`, `GET /indices-list`) and ours beside it:
ITM re-ranking (`rerank`), ITC and ITM scores per hit, image -> text, `GET /image/{index}/{id}`, health,
Prometheus `/metrics`, the OpenAPI page (`/docs`) and a search page at `/`.

Queries that arrive together are encoded as one batch (`MicroBatcher`: at most `max_batch` of them, waiting at
most `batch_wait_ms` for company); the model runs on one thread, faiss searches on others (faiss releases the
GIL). Nothing is fetched from the network: `image_url` is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib.resources
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lavis_lite.data.config import MAX_IMAGE_PIXELS
from lavis_lite.inference.features import Blip2FeatureExtractor
from lavis_lite.inference.gallery import thumbnail
from lavis_lite.inference.preprocess import ImageError, ImageTooLarge
from lavis_lite.data.transforms import decode_image

from .corpus import ImageProcessor, corpus_roots, describe_locator, open_item_image
from .index import RetrievalIndex
from .search import TextCleaner, rank_image_hits, rank_text_hits, ranked

log = logging.getLogger("lavis_lite.retrieval")

MAX_RESULTS = 1000  # num_images / num_result_ids / rerank at most
IGNORED_FILTERS = ("use_safety_model", "use_violence_detector", "use_mclip", "aesthetic_score", "aesthetic_weight")


class ApiError(Exception):
    """A bad request: its HTTP status and a message naming the field and the fix."""

    def __init__(self, status: int, field_name: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field_name, message


class KnnRequest(BaseModel):
    """clip-retrieval's `/knn-service` body (its ClipClient sends every field), plus `rerank`."""

    model_config = ConfigDict(extra="forbid")
    text: Optional[str] = None
    image: Optional[str] = None  # base64 of the encoded image
    image_url: Optional[str] = None  # refused: the service fetches nothing
    embedding_input: Optional[list] = None  # a query embedding: [E] (text) or [Q, E] / [Q * E] (image)
    modality: Literal["image", "text"] = "image"  # which index of `indice_name` to search
    num_images: int = Field(40, ge=1, le=MAX_RESULTS)
    num_result_ids: Optional[int] = Field(None, ge=1, le=MAX_RESULTS)
    indice_name: Optional[str] = None
    deduplicate: bool = True  # exact duplicates (the same image key, or caption and image) are dropped
    rerank: int = Field(0, ge=0, le=MAX_RESULTS)  # ITM re-ranking of the top N (ours)
    use_safety_model: bool = False
    use_violence_detector: bool = False
    use_mclip: bool = False
    aesthetic_score: Optional[Union[int, str]] = None
    aesthetic_weight: Optional[Union[float, str]] = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[int] = Field(max_length=MAX_RESULTS)
    indice_name: Optional[str] = None
    modality: Literal["image", "text"] = "image"


class MicroBatcher:
    """Calls `fn(list of inputs) -> list of outputs` on `executor` for batches of queries, so that concurrent
    requests share one forward pass and one index search: a batch takes what queued while the previous one
    ran, then waits (at most `wait_s`) while `incoming()` says more requests are on their way to it (parsed,
    not yet queued). A lone query never waits."""

    def __init__(self, fn: Callable[[list], list], executor: ThreadPoolExecutor, max_batch: int, wait_s: float,
                 incoming: Callable[[], int] = lambda: 0):
        self.fn, self.executor, self.max_batch, self.wait_s, self.incoming = fn, executor, max_batch, wait_s, incoming
        self.queue: Optional[asyncio.Queue] = None
        self.batches: list[int] = []  # sizes of the batches run (for tests and the benchmark)

    async def submit(self, item: Any) -> Any:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                elif self.incoming() > 0 and loop.time() < deadline:
                    await asyncio.sleep(0.0005)
                else:
                    break
            self.batches.append(len(batch))
            try:
                outputs = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
            except Exception as err:  # every waiting request gets the error
                for _, future in batch:
                    future.set_exception(err)
                continue
            for (_, future), output in zip(batch, outputs):
                future.set_result(output)


@dataclass
class Query:
    """One query waiting for the encoder: text or pixels, the index to search and how many hits to fetch."""

    payload: Any
    index: RetrievalIndex
    k: int


@dataclass
class Served:
    """One name of `/indices-list`: an image index (text -> image) and/or a text index (image -> text)."""

    name: str
    indexes: dict[str, RetrievalIndex]  # modality -> index ("image": items are images, "text": captions)
    paths: dict[str, str] = field(default_factory=dict)


@dataclass
class ServiceConfig:
    max_batch: int = 16
    batch_wait_ms: float = 20.0  # at most, and only while other requests are on their way
    max_body_bytes: int = 16 << 20
    max_image_pixels: int = MAX_IMAGE_PIXELS


def create_app(
    model: Blip2FeatureExtractor,
    processor: ImageProcessor,
    clean: TextCleaner,
    served: dict[str, Served],
    config: ServiceConfig = ServiceConfig(),
) -> FastAPI:
    """The FastAPI app over a loaded model and indexes (see the module docstring)."""
    app = FastAPI(title="lavis_lite retrieval", version="1", description=__doc__)
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")  # one forward pass at a time: no oversubscription
    search_threads = ThreadPoolExecutor(4, thread_name_prefix="faiss")
    registry = CollectorRegistry()
    requests = Counter("lavis_lite_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    seconds = Histogram("lavis_lite_stage_seconds", "time per request stage", ["stage"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
    batch_sizes = Histogram("lavis_lite_batch_size", "queries per encoder batch", ["kind"], registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64))

    def search_groups(queries: list[Query], vectors: np.ndarray) -> list[list]:
        """Each query's ITC hits: one faiss call per (index, k) for the whole batch (one pass over the index's
        memory for many queries instead of one each)."""
        start, out, groups = time.perf_counter(), [None] * len(queries), {}
        for j, query in enumerate(queries):
            groups.setdefault((id(query.index), query.k), []).append(j)
        for rows in groups.values():
            first = queries[rows[0]]
            for j, hits in zip(rows, first.index.search(vectors[rows], first.k)):
                out[j] = hits
        seconds.labels("search").observe(time.perf_counter() - start)
        return out

    def encode_texts(queries: list[Query]) -> list[tuple[None, list]]:
        batch_sizes.labels("text").observe(len(queries))
        start = time.perf_counter()
        with torch.inference_mode():
            vectors = model.text_vectors([q.payload for q in queries]).cpu().numpy()
        seconds.labels("encode").observe(time.perf_counter() - start)
        return [(None, hits) for hits in search_groups(queries, vectors)]

    def encode_images(queries: list[Query]) -> list[tuple[torch.Tensor, list]]:
        batch_sizes.labels("image").observe(len(queries))
        start = time.perf_counter()
        with torch.inference_mode():
            embeds = model.encode_images(torch.stack([q.payload for q in queries]))
            vectors = model.image_vectors(image_embeds=embeds).cpu().numpy()
        seconds.labels("encode").observe(time.perf_counter() - start)
        return list(zip(embeds, search_groups(queries, vectors)))

    arriving = [0]  # requests read but not yet queued for the encoder: a batch waits for them
    text_batcher = MicroBatcher(encode_texts, model_thread, config.max_batch, config.batch_wait_ms / 1000, lambda: arriving[0])
    image_batcher = MicroBatcher(encode_images, model_thread, config.max_batch, config.batch_wait_ms / 1000, lambda: arriving[0])
    app.state.batchers = {"text": text_batcher, "image": image_batcher}

    def index_for(name: Optional[str], modality: str) -> tuple[Served, RetrievalIndex]:
        entry = served.get(name or next(iter(served)))
        if entry is None:
            raise ApiError(404, "indice_name", f"unknown index {name!r}: GET /indices-list gives {sorted(served)}")
        if modality not in entry.indexes:
            raise ApiError(400, "modality", f"index {entry.name!r} has no {modality} index: it has {sorted(entry.indexes)}")
        return entry, entry.indexes[modality]

    def decode_query_image(data: str) -> torch.Tensor:
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image", "image is not valid base64: send the encoded image file's bytes in base64") from None
        if not raw:
            raise ApiError(400, "image", "image is empty")
        try:
            return processor(decode_image(raw, "the query image", config.max_image_pixels))
        except ImageTooLarge as err:
            raise ApiError(413, "image", str(err)) from None
        except ImageError as err:
            raise ApiError(400, "image", str(err)) from None

    def row(entry: Served, hit: dict[str, Any], base_url: str, modality: str) -> dict[str, Any]:
        out = {"id": hit["item_id"], "similarity": hit["score"], "itc": hit["itc"], "itm": hit["itm"]}
        out["caption"] = hit.get("caption") or "; ".join(hit.get("captions", []))
        out["key"] = hit["key"]
        out["image_path"] = describe_locator(hit["locator"])
        out["url"] = f"{base_url}image/{entry.name}/{modality}/{hit['item_id']}"
        return out

    async def timed(stage: str, call: Callable, *args) -> Any:
        """`call` on the model thread (rerank) or a search thread (the rest), timed as `stage`."""
        start = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(model_thread if stage == "rerank" else search_threads, call, *args)
        finally:
            seconds.labels(stage).observe(time.perf_counter() - start)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        requests.labels(request.url.path, str(err.status)).inc()
        return JSONResponse({"error": err.message, "field": err.field}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return await api_error(request, _field_error(err.errors(), skip=1))

    async def parse(request: Request, schema: type[BaseModel]) -> BaseModel:
        """The JSON body, whatever its Content-Type (clip-retrieval's client sends none), as `schema`."""
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise ApiError(413, "body", f"request body of {len(raw)} bytes is over the limit of {config.max_body_bytes}")
        try:
            data = json.loads(raw)
        except ValueError:
            raise ApiError(400, "body", "the request body is not JSON") from None
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            raise _field_error(err.errors(), skip=0) from None

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            requests.labels(request.url.path, "413").inc()
            return JSONResponse({"error": f"request body of {length} bytes is over the limit of {config.max_body_bytes}", "field": "body"}, status_code=413)
        return await call_next(request)

    @app.post("/knn-service", openapi_extra=_body_schema(KnnRequest))
    async def knn_service(request: Request, response: Response) -> list[dict[str, Any]]:
        arriving[0] += 1
        queued = [False]

        async def encode(batcher: MicroBatcher, query: Query) -> Any:
            arriving[0] -= 1
            queued[0] = True
            return await batcher.submit(query)

        try:
            return await knn(request, response, encode)
        finally:
            if not queued[0]:
                arriving[0] -= 1

    async def knn(request: Request, response: Response, encode: Callable) -> list[dict[str, Any]]:
        body = await parse(request, KnnRequest)
        given = [name for name in ("text", "image", "image_url", "embedding_input") if getattr(body, name) is not None]
        if len(given) != 1:
            raise ApiError(400, "text", f"give exactly one of text, image or embedding_input (got {given or 'none'})")
        if body.image_url is not None:
            raise ApiError(400, "image_url", "the service fetches nothing from the network: send the image itself, base64 in 'image'")
        entry, index = index_for(body.indice_name, body.modality)
        k = max(body.num_images, body.num_result_ids or 0)
        ignored = [name for name in IGNORED_FILTERS if getattr(body, name) not in (None, False, "")]
        if ignored:
            response.headers["X-Ignored-Filters"] = ", ".join(ignored)
        if body.text is not None:
            text = clean(body.text)
            if not text:
                raise ApiError(400, "text", "text is empty (no words after cleaning): give at least one word")
            _, found = await encode(text_batcher, Query(text, index, max(k, body.rerank)))
            rank = lambda: rank_text_hits(index, model, processor, text, found, k, body.rerank)  # noqa: E731
        elif body.image is not None:
            pixels = decode_query_image(body.image)
            embed, found = await encode(image_batcher, Query(pixels, index, max(k, body.rerank)))
            rank = lambda: rank_image_hits(index, model, embed, found, k, body.rerank)  # noqa: E731
        else:
            if body.rerank:
                raise ApiError(400, "rerank", "an embedding query cannot be re-ranked by ITM: send text or an image")
            vector = _embedding(body.embedding_input, model)
            found = (await asyncio.get_running_loop().run_in_executor(search_threads, search_groups, [Query(None, index, k)], vector[None]))[0]
            rank = lambda: ranked(index, found, None, k)  # noqa: E731
        hits = await timed("rerank", rank) if body.rerank else rank()
        rows = [row(entry, hit, str(request.base_url), body.modality) for hit in hits]
        if body.deduplicate:
            seen: set = set()
            rows = [r for r in rows if not ((r["key"], r["caption"]) in seen or seen.add((r["key"], r["caption"])))]
        requests.labels("/knn-service", "200").inc()
        return rows[: body.num_images]

    @app.post("/metadata", openapi_extra=_body_schema(MetadataRequest))
    async def metadata(request: Request) -> list[dict[str, Any]]:
        body = await parse(request, MetadataRequest)
        entry, index = index_for(body.indice_name, body.modality)
        bad = [i for i in body.ids if not 0 <= i < index.manifest["count"]]
        if bad:
            raise ApiError(400, "ids", f"ids {bad[:5]} are not in index {entry.name!r} (0..{index.manifest['count'] - 1})")
        items = index.items(body.ids)
        requests.labels("/metadata", "200").inc()
        return [{"id": i, "metadata": {**item, "image_path": describe_locator(item["locator"])}} for i, item in zip(body.ids, items)]

    @app.get("/indices-list")
    async def indices_list() -> list[str]:
        requests.labels("/indices-list", "200").inc()
        return list(served)

    @app.get("/image/{name}/{modality}/{item_id}")
    async def image(name: str, modality: str, item_id: int) -> Response:
        entry, index = index_for(name, modality)
        if not 0 <= item_id < index.manifest["count"]:
            raise ApiError(404, "item_id", f"no item {item_id} in index {name!r}")
        locator = index.items([item_id])[0]["locator"]
        try:
            data = await timed("thumbnail", lambda: thumbnail(open_item_image(locator, corpus_roots(index.manifest["corpus"]))))
        except ImageError as err:
            raise ApiError(404, "item_id", str(err)) from None
        return Response(data, media_type="image/jpeg")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        return {"status": "ready", "indices": {name: sorted(e.indexes) for name, e in served.items()}}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return importlib.resources.files("lavis_lite.retrieval").joinpath("static/search.html").read_text(encoding="utf-8")

    return app


def _field_error(errors: list[dict], skip: int) -> ApiError:
    """pydantic's first error as an ApiError naming the field (`skip`: leading parts of its location, e.g. "body")."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    name = ".".join(str(p) for p in first.get("loc", ())[skip:]) or "body"
    message = "unknown field: remove it" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid")
    return ApiError(400, name, f"{name}: {message}")


def _body_schema(schema: type[BaseModel]) -> dict:
    """OpenAPI's description of a JSON body that the handler parses itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


def _embedding(values: list, model: Blip2FeatureExtractor) -> np.ndarray:
    """A query embedding from JSON: [E] or [Q, E] / [Q * E] numbers, L2-normalised per vector."""
    try:
        vector = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise ApiError(400, "embedding_input", "embedding_input must be a list of numbers") from None
    dim = model.embed_dim
    if vector.ndim == 1 and vector.size % dim == 0 and vector.size // dim in (1, model.num_queries):
        vector = vector.reshape(-1, dim) if vector.size > dim else vector
    elif not (vector.ndim == 2 and vector.shape == (model.num_queries, dim)):
        raise ApiError(400, "embedding_input", f"embedding_input must be {dim} numbers (or {model.num_queries} x {dim}), got shape {list(vector.shape)}")
    if not np.all(np.isfinite(vector)) or np.any(np.linalg.norm(vector, axis=-1) == 0):
        raise ApiError(400, "embedding_input", "embedding_input must be finite and not all zeros")
    return vector / np.linalg.norm(vector, axis=-1, keepdims=True)
