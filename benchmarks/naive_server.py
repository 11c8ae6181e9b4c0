"""Reference server for benchmarks/serve_latency.py: the naive way to serve the model.

Plain FastAPI under uvicorn, one process, the same `ServedModel` called once per
request (no batching), in FastAPI's default thread pool for a sync endpoint:

    ATTNFLOW_MODEL_SOURCE=<model folder> \\
        python -m uvicorn benchmarks.naive_server:app --port 3100 --no-access-log
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from pipelines.errors import UnknownUser
from pipelines.inference import ServedModel

STATE: dict[str, ServedModel] = {}


@asynccontextmanager
async def lifespan(_: FastAPI):
    """Load the model once; the same torch thread count as the model service."""
    torch.set_num_threads(int(os.environ.get("ATTNFLOW_TORCH_THREADS", "1")))
    STATE["model"] = ServedModel.load(os.environ["ATTNFLOW_MODEL_SOURCE"])
    yield


app = FastAPI(lifespan=lifespan)


class RecommendRequest(BaseModel):
    """The model service's request, without its limits."""

    user_id: str | None = None
    history: list[str] | None = None
    k: int = 10
    exclude_seen: bool = True


@app.post("/recommend")
def recommend(req: RecommendRequest) -> dict:
    """One request, one forward pass."""
    try:
        rec = STATE["model"].recommend(
            user_id=req.user_id, history=req.history, k=req.k, exclude_seen=req.exclude_seen
        )
    except UnknownUser:
        raise HTTPException(404, "unknown user") from None
    return {"items": rec.items, "scores": rec.scores, "unknown_items": rec.unknown_items}


@app.get("/readyz")
def readyz() -> dict:
    """Ready once the model is loaded (the lifespan finished)."""
    return {"ready": "model" in STATE}
