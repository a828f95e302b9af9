"""The keys of the materialization metadata that something reads back: defined once, written by the assets
(:mod:`orchestration.assets`), read by the run view's headlines (:func:`orchestration.progress.headline`) and the
tests. A key only shown in Dagster's UI is spelled where it is written. Imports no Dagster: the view loads without it.
"""

from __future__ import annotations

# base_model/<name>
BASE_PARAMETERS = "parameters"
BASE_OBTAINED = "obtained"

# dataset/<name>/clean
CLEAN_ROWS_IN = "rows_in"
CLEAN_ROWS_TRAIN = "rows_train"
CLEAN_ROWS_EVAL = "rows_eval"
CLEAN_ROWS_QUARANTINED = "rows_quarantined"

# adapter/<job>/train
TRAIN_REUSED = "reused_existing_run"
TRAIN_LOSS = "train_loss"
TRAIN_STEPS = "steps"
TRAIN_TOKENS_PER_S = "tokens_per_s"

# adapter/<job>/eval: every metric's value for the base and the adapter (see eval_metric), and the rows
EVAL_ROWS = "eval_rows"

# adapter/<job>/register
REGISTER_VERSION = "version"
REGISTER_STATUS = "status"

# adapter/<sweep>/leaderboard: the winner's keys only when a version is servable
LEADERBOARD_VERSIONS = "versions"
LEADERBOARD_WINNER_VERSION = "winner_version"
LEADERBOARD_WINNER_METRIC = "winner_metric"

# serving/deployment
DEPLOYMENT_URL = "url"
DEPLOYMENT_RESTARTED = "restarted"


def eval_metric(metric: str, side: str) -> str:
    """The eval asset's key of one metric for ``side`` (``base`` or ``adapter``), e.g. ``exact_match_adapter``."""
    return f"{metric}_{side}"
