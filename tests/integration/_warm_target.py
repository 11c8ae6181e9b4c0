"""A module the warm-start tests run through the standby: reports what it was given."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

if __name__ == "__main__":
    preloaded = "xml.dom.minidom" in sys.modules  # before this module imports anything
    from services.launch import session_nice

    if sys.argv[1:2] == ["prefect"]:
        import logging

        from prefect.settings import get_current_settings

        settings = get_current_settings()
        print(
            json.dumps(
                {
                    "api_url": settings.api.url,
                    "level": logging.getLevelName(logging.getLogger("prefect").level),
                    "preloaded": "prefect.flow_engine" in sys.modules,
                }
            )
        )
        sys.exit(0)
    if sys.argv[1:2] == ["sleep"]:
        marker = sys.argv[2]

        def on_term(signum, _frame):
            with open(marker, "w") as f:
                f.write(str(signum))
            sys.exit(143)

        signal.signal(signal.SIGTERM, on_term)
        print(json.dumps({"pid": os.getpid()}), flush=True)
        time.sleep(60)
        sys.exit(0)
    print(
        json.dumps(
            {
                "cwd": os.getcwd(),
                "env": os.environ.get("WARM_TEST_VALUE"),
                "argv": sys.argv[1:],
                "ppid": os.getppid(),
                "preloaded": preloaded,
                "session_leader": os.getsid(0) == os.getpid(),
                "session_nice": session_nice(os.getpid()),
            }
        )
    )
    sys.exit(3)
