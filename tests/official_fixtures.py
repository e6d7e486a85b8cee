"""Where the reference numbers computed with the official iBOT code live.

``IBOT_FIXTURES`` overrides the default ``<repo>/../shared/fixtures/official``. A missing fixture
fails the test that needs it (with this explanation) rather than skipping it.
"""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("IBOT_FIXTURES", REPO.parent / "shared" / "fixtures" / "official"))


def fixture_path(name):
    """Absolute path of fixture ``name``; raises FileNotFoundError with a hint when it is missing."""
    path = FIXTURES / name
    if not path.exists():
        raise FileNotFoundError(f"official fixture {path} is missing: the tests expect shared/fixtures/official "
                                f"beside the repository, or IBOT_FIXTURES pointing at it")
    return path
