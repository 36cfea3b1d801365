"""`lorakit ui`: the web dashboard alone (registry, runs, sweeps) without loading a model. Compare needs
a model: use `lorakit serve`, which serves the same dashboard at / next to the API."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def register(sub) -> None:
    from lorakit.cli.serve import DEFAULT_REGISTRY, dashboard_args

    p = sub.add_parser("ui", help="web dashboard without a model: adapters, training runs, sweeps")
    p.add_argument("--registry", default=os.environ.get("LORAKIT_REGISTRY", DEFAULT_REGISTRY),
                   help="SQLite registry file or postgresql:// URL (default: $LORAKIT_REGISTRY or ./%(default)s); "
                        "need not exist")
    dashboard_args(p)
    p.add_argument("--api-key", action="append", default=None,
                   help="key that logs in (repeatable); default $LORAKIT_API_KEYS; none: open to read")
    p.add_argument("--admin-key", default=os.environ.get("LORAKIT_ADMIN_KEY"),
                   help="key for rollback/remove (default $LORAKIT_ADMIN_KEY)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    import uvicorn
    from fastapi import FastAPI

    from lorakit.adapters.pg import is_url
    from lorakit.adapters.registries import open_registry
    from lorakit.cli.serve import dashboard_options
    from lorakit.ui import UIState, mount

    options = dashboard_options(args)
    keys = args.api_key or [k for k in os.environ.get("LORAKIT_API_KEYS", "").split(",") if k]
    # do not create an empty one
    reg = open_registry(args.registry) if is_url(args.registry) or Path(args.registry).exists() else None
    state = UIState(reg, keys, args.admin_key, (reg.base_name if reg else None) or "no model")
    app = FastAPI(title="lorakit dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, state, options)
    if not keys:
        print("warning: no --api-key: the dashboard is open to read for anyone who can reach the port",
              file=sys.stderr)
    print(f"dashboard on http://{args.host}:{args.port}/ (no model: Compare is off)", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        if reg is not None:
            reg.close()
    return 0
