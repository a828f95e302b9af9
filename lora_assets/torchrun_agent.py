"""torchrun, recording why a run failed: ``python -m lora_assets.torchrun_agent FAILURES.json TORCHRUN_ARGS...``.

Runs ``torch.distributed.run`` (what the ``torchrun`` command runs) with the arguments after the file name, unchanged.
When a worker fails, torchrun prints each failed rank with its exit code or signal to its stderr and writes an error
file only for a worker that raised a Python exception; a worker killed by a signal (the OOM killer, a preempted
node, ``kill -9``) leaves no file. This agent writes every failure to ``FAILURES.json``
(:func:`lora_assets.distributed.failure_reason` reads it), so whoever started the run can say which rank failed and
why without parsing torchrun's log. On success it writes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path


def failures_record(error) -> dict:
    """The failures of a torchrun ``ChildFailedError`` as JSON, the root cause (first observed) first."""
    root_rank, _ = error.get_first_failure()
    ranks = [root_rank] + sorted(r for r in error.failures if r != root_rank)
    out = []
    for rank in ranks:
        f = error.failures[rank]
        signal_name = f.signal_name() if f.exitcode < 0 else None
        message = f.message if isinstance(f.message, str) else (f.message or {}).get("message", "")
        out.append(
            {
                "rank": rank,
                "local_rank": f.local_rank,
                "pid": f.pid,
                "exitcode": f.exitcode,
                "signal": signal_name,
                "message": message,
            }
        )
    return {"failures": out}


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from lora_assets.files import write_json_atomic

    failures_file, torchrun_args = Path(argv[0]), argv[1:]
    failures_file.unlink(missing_ok=True)
    try:
        torchrun_main(torchrun_args)
    except ChildFailedError as e:
        write_json_atomic(failures_file, failures_record(e), indent=2)
        raise
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print("usage: python -m lora_assets.torchrun_agent FAILURES.json TORCHRUN_ARGS...", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
