"""The web dashboard, a part of its own: it reads run folders (by the names in lorakit.runs), sweep folders and the
adapter registry, and imports nothing from serve/, train/ or lab/. `lorakit serve` mounts it on the API's app (same
port, at /; Compare calls the API in-process), `lorakit ui` serves it alone without a model (Compare off):

    /ui/login, /ui/logout                 the API key (or the admin key) -> a session cookie
    /ui/adapters, /ui/adapters/{name}     the registry; rollback and remove (admin key)
    /ui/compare                           one prompt (or a few) -> base, adapters, versions, stacks side by side
    /ui/runs, /ui/runs/{name}             training runs under --runs-dir: live loss curves, config, evals
    /ui/sweeps, /ui/sweeps/{name}         sweep directories under --sweeps-dir: report, table, plots

Server-rendered Jinja2 pages (autoescaped), two small scripts, no network at run time. Every POST carries the
session's CSRF token; every page passes one login gate (`UI.viewer`, a FastAPI dependency); every refusal or 404 is
a `Denied` that one handler answers. `mount(app, state, UIOptions(...))` adds the routes; `state` needs
`registry`, `api_keys`, `admin_key`, `base_name` and, for Compare, an `engine` (None: no inference).
"""
from __future__ import annotations

from lorakit.ui.core import UI, Denied, UIOptions, UIState

__all__ = ["UI", "UIOptions", "UIState", "mount"]


def mount(app, state, options: UIOptions | None = None) -> UI:
    """Add the dashboard's routes to a FastAPI app."""
    from lorakit.ui import lab_pages, pages

    ui = UI(state, options or UIOptions())
    app.add_exception_handler(Denied, lambda request, exc: exc.response)  # the login gate's and 404s' answer
    pages.add_routes(app, ui)
    lab_pages.add_routes(app, ui)
    app.state.lorakit_ui = ui
    return ui
