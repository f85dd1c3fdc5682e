"""The FastAPI application: routers, auth and error handling wired together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from fluxtrain import __version__
from fluxtrain.api.deps import require_api_key
from fluxtrain.api.errors import install_error_handlers
from fluxtrain.api.limits import BodySizeLimit
from fluxtrain.api.routes import captions, dataset_config, datasets, health, images, models, runs
from fluxtrain.api.routes.web import install_web_page
from fluxtrain.datasets.fetch import make_ssl_context
from fluxtrain.datasets.image_workers import image_workers
from fluxtrain.errors import UnavailableError
from fluxtrain.settings import Settings, get_settings


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the training executor for as long as the app serves (only the lease holder acts), and
    start the image workers and load the TLS roots now, so the first download waits for neither
    (Pillow's import in each worker; 16 ms of certificates). A CA bundle that does not load is
    reported by the downloads that need it, as before."""
    from fluxtrain.runs.executor import start_executor

    image_workers(app.state.settings.image_workers)
    with contextlib.suppress(UnavailableError):
        await asyncio.to_thread(make_ssl_context, app.state.settings.ca_bundle)
    executor = start_executor(app.state.settings)
    app.state.executor = executor
    try:
        yield
    finally:
        await asyncio.to_thread(executor.stop)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="fluxtrain",
        version=__version__,
        description="Image URLs in, a trained FLUX.1 LoRA out.",
        lifespan=_lifespan,
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_upload_bytes=settings.max_upload_bytes)
    app.include_router(health.router)
    protected = [Depends(require_api_key)]
    for module in (datasets, images, dataset_config, captions, runs, models):
        app.include_router(module.router, dependencies=protected)
    install_web_page(app)
    return app
