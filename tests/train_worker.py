"""Subprocess worker for tests/test_faults.py and tests/test_distributed.py (not a test module).

``python tests/train_worker.py CONFIG_JSON OUT_DIR THREADS [PAUSE_AT_STEP]`` - also under ``torchrun`` - trains
the TrainConfig on the tests' ``tiny`` set (96 MNIST-M images, see conftest.py) into OUT_DIR and saves
``result_rank<r>.pt`` (history and final state_dict).  With PAUSE_AT_STEP, the step monitor touches
``OUT_DIR/PAUSED`` at that global step and sleeps 3 s, so the test can signal the process mid-epoch.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from bilevel_ssl.config import TrainConfig
from bilevel_ssl.data import load_dataset
from bilevel_ssl.trainer import train


def tiny():
    return load_dataset("mnistm5k").subset(torch.arange(0, 5000, 52)[:96], "tiny")


def main() -> None:
    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    out, threads = Path(sys.argv[2]), int(sys.argv[3])
    pause_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.set_num_threads(threads)

    def pause(step, net, meta, views):
        if step == pause_at:
            (out / "PAUSED").touch()
            time.sleep(3.0)
        return {}

    result = train(cfg, tiny(), out, step_monitors=(pause,) if pause_at else ())
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"history": result.history, "state": result.net.state_dict()}, out / f"result_rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
