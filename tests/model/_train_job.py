"""A training job run in its own process by the kill-and-resume and DDP tests.

    python -m tests.model._train_job SPLIT CKPT OUT [--kill-at EPOCH STEP] [--set k=v ...]

Trains the small test configuration, optionally SIGKILLs itself mid-epoch (a real,
abrupt death: no cleanup runs), and writes the final weights' SHA-256 and the loss
history to OUT (rank 0; under torchrun each rank writes OUT.rank<N>).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path

from pipelines.sequences import load_split
from pipelines.train import train_model
from tests.model.conftest import small_config


def weights_digest(encoder) -> str:
    h = hashlib.sha256()
    for k, v in sorted(encoder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("split")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--kill-at", nargs=2, type=int)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    over = dict(s.split("=", 1) for s in args.set)
    cfg = small_config(**{"train.checkpoint_every_steps": 2, **over})
    data = load_split(Path(args.split), cfg.model.time_buckets)

    def on_step(epoch: int, step: int) -> None:
        if args.kill_at and (epoch, step) == tuple(args.kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    result = train_model(cfg, data, Path(args.ckpt), on_step=on_step)
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out if rank == 0 else f"{args.out}.rank{rank}")
    out.write_text(
        json.dumps(
            {
                "digest": weights_digest(result.encoder),
                "losses": [h["loss"] for h in result.history],
                "resumed_from": result.resumed_from,
                "world_size": result.world_size,
            }
        )
    )


if __name__ == "__main__":
    main()
