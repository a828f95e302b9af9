"""The `slow` marker is what `make test-fast` leaves out (docs/testing.md): a test that reaches a fixture which trains,
starts vLLM or drives a browser must carry it, or the quick tier would start the session's pipeline run."""

from __future__ import annotations

import pytest

#: Fixtures that train, start vLLM or a browser, directly or through the session's `materialized` run.
EXPENSIVE_FIXTURES = {
    "materialized",  # conftest.py: the tiny base built, both adapters trained, vLLM started
    "vllm_server",  # conftest.py: the session's vLLM server
    "sweep_run",  # test_gates_sweeps.py: a sweep trained on the session's base
    "real_pipeline",  # test_real_model.py: SmolLM2 converted, trained and served
    "two_process_run",  # test_distributed_training.py: torchrun training with 2 processes
    "piped_run",  # test_cli_progress.py: `lorafoundry run` trains two adapters on the random base
    "dagster_dev",  # test_ui.py: `dagster dev` on the session's home
    "chromedriver",  # test_ui.py: headless Chromium
}


def test_every_test_that_reaches_an_expensive_fixture_is_marked_slow(request: pytest.FixtureRequest):
    """Checks the tests of this run: under `make test` all of them, under `make test-fast` those it selected."""
    unmarked = sorted(
        f"{item.nodeid} (uses {', '.join(sorted(EXPENSIVE_FIXTURES & set(item.fixturenames)))})"
        for item in request.session.items
        if EXPENSIVE_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None
    )
    assert not unmarked, "mark these @pytest.mark.slow (or the module with pytestmark):\n" + "\n".join(unmarked)
