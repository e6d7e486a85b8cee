"""Where the reference numbers computed with the official iBOT code live.

They ship with the repository in ``tests/fixtures/official/`` (see its README); ``IBOT_FIXTURES``
points elsewhere (e.g. a newer copy in ``../shared/fixtures/official``). A missing fixture fails the
test that needs it (with this explanation) rather than skipping it.
"""
import os
from pathlib import Path

FIXTURES = Path(os.environ.get("IBOT_FIXTURES", Path(__file__).resolve().parent / "fixtures" / "official"))


def fixture_path(name):
    """Absolute path of fixture ``name``; raises FileNotFoundError with a hint when it is missing."""
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(f"official fixture {path} is missing: the tests expect tests/fixtures/official "
                                f"(shipped with the repository), or IBOT_FIXTURES pointing at such a folder")
    return path
