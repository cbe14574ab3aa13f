"""A model family declared outside the repository's table: `shout` (tests/test_modelspec.py).

Everything a new family needs, in the files a contributor would write and no shared table:
this spec (`TRIFECTA_MODEL_MODULES=tests.helpers.shout` makes the API, workers and CLI load it),
the runner and its tiny writer (`shout_runner.py`) and a router (`shout_routes.py`). This
module imports `tasks` only, as the API may import it.
"""

from __future__ import annotations

from tasks.models import Admission, ModelSpec

SPEC = ModelSpec(
    "shout",
    "shout",
    True,
    "test family: pixels brighter than the threshold its tiny checkpoint holds",
    runner="tests.helpers.shout_runner:ShoutRunner",
    tiny="tests.helpers.shout_runner:write_tiny",
    sync=True,
    routes=("tests.helpers.shout_routes:router",),
    admission=Admission(paths=("/v1/shout/loud",)),
    job_kinds=("image",),
    sdk=True,
)
MODEL_SPECS = [SPEC]
