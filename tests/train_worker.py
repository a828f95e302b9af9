"""Run one training in this process, for tests that kill it: python tests/train_worker.py BASE DATA HOME."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_assets.base_model import resolve_base_model  # noqa: E402
from lora_assets.clean import current_clean  # noqa: E402
from lora_assets.home import Home  # noqa: E402
from lora_assets.spec import AdapterSpec  # noqa: E402
from lora_assets.train import train_adapter  # noqa: E402

RESUME_SPEC = AdapterSpec(dataset="d", batch_size=4, learning_rate=1e-3, checkpoint_every=5, seed=3)

if __name__ == "__main__":
    base_dir, datasets_root, home = (Path(a) for a in sys.argv[1:4])
    base = resolve_base_model(str(base_dir), home)
    train_adapter("a", RESUME_SPEC, base, current_clean(datasets_root, "d"), Home.at(home))
