"""Reference service for benchmarks/serve_latency.py: BentoML with nothing to do.

The same serving stack as the model service (BentoML 1.4, one worker, access log
and tracing of the API off, a pydantic-validated JSON body, a pre-serialised JSON
response), answering /recommend with a constant: the floor of what the stack itself
costs per request.

    bentoml serve benchmarks.noop_service:Noop --port 3200
"""

from __future__ import annotations

import bentoml
from pydantic import BaseModel
from starlette.responses import Response

ANSWER = b'{"items":[],"scores":[],"unknown_items":[],"explanation":null}'


class NoopRequest(BaseModel):
    """The model service's request fields."""

    user_id: str | None = None
    history: list[str] | None = None
    k: int = 10
    exclude_seen: bool = True
    explain: bool = False


@bentoml.service(
    name="noop",
    workers=1,
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": ["/recommend"]},
)
class Noop:
    """A trivial API on the model service's stack."""

    @bentoml.api(route="/recommend")
    async def recommend(self, req: NoopRequest, /) -> dict:
        """A constant answer of the model service's shape."""
        return Response(ANSWER, media_type="application/json")
