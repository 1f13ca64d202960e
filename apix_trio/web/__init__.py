"""Browser-side assets shipped with the server: the JavaScript client and pages.

`static/apix.js` is the official APIX JavaScript client (one ES module, no
build step, no runtime dependencies; browsers and Node 20+), and
`static/apix.d.ts` its TypeScript declarations. `static/` also holds the
demo app and the operator dashboard (with the vendored uPlot in
`static/vendor/`). All are package data, so an installed server has them
too; `apix_trio.web.pages` says which file is served at which path
(`/client/apix.js`, `/demo`, `/dashboard`, ...). Usage: docs/clients.md,
docs/operations.md.
"""

from __future__ import annotations

import pathlib

STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"


def static_path(name: str) -> pathlib.Path:
    """The path of the static file `name` (e.g. ``"apix.js"``).

    Only plain file names inside `static/` are accepted, so a name taken from
    a request path cannot reach elsewhere. Raises ValueError for any other
    name and FileNotFoundError when there is no such file.
    """
    if not name or name != pathlib.PurePath(name).name or name in (".", ".."):
        raise ValueError(f"not a static file name: {name!r}")
    path = STATIC_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"no static file {name!r} in {STATIC_DIR}")
    return path
