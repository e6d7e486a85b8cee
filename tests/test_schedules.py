"""cosine_scheduler against the official values."""
import json

import numpy as np
import pytest

from ibot.train.schedules import cosine_scheduler
from official_fixtures import fixture_path

SETTINGS = json.loads(fixture_path("schedules.json").read_text())


@pytest.mark.parametrize("i", range(len(SETTINGS)))
def test_cosine_scheduler_matches_official(i):
    s = SETTINGS[i]
    values = cosine_scheduler(s["base"], s["final"], s["epochs"], s["niter_per_ep"], s["warmup_epochs"],
                              s["start_warmup_value"])
    assert len(values) == len(s["values"])
    np.testing.assert_allclose(values, s["values"], rtol=0, atol=1e-12)
