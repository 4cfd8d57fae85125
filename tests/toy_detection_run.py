"""`python tests/toy_detection_run.py ARGS...` is `python -m jaxal.run ARGS...` with the toy FCOS of
`detection_toys` (a 2-stage backbone, 16 channels) in place of the ResNet FCOS, so a detection run's loop,
checkpoints and data pipeline are tested at the cost of a toy model. With $KILL_AT_EVALUATION=N the process
kills itself with SIGKILL in the N-th evaluation (1-based): in the middle of a cycle, after its training."""

import os
import signal
import sys

from detection_toys import ISAL, toy_fcos
from jaxal import run
from jaxal.detection import active, training


def toy_detector(config, num_classes):
    return training.Detector(toy_fcos(ISAL, num_classes), ISAL)


def use_toy_detector(patch=setattr):
    """Put the toy detector in place (`patch`: setattr, or a pytest monkeypatch's)."""
    patch(active, "build_detector", toy_detector)


def kill_in_evaluation(number: int) -> None:
    detect, calls = training.detect, []

    def detect_then_kill(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            os.kill(os.getpid(), signal.SIGKILL)
        return detect(*args, **kwargs)

    training.detect = detect_then_kill


def main(argv) -> int:
    use_toy_detector()
    if os.environ.get("KILL_AT_EVALUATION"):
        kill_in_evaluation(int(os.environ["KILL_AT_EVALUATION"]))
    return run.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
