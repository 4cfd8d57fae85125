"""Runs a jaxal command in a real process that stops at a chosen point, for the tests of what an
interruption leaves behind: `python tests/interrupt_at.py POINT ACTION MODULE ARGS...` runs
`python -m MODULE ARGS...`, and right after it saves a checkpoint into a folder named POINT
("trained", "rounds", "trial_0"), either kills itself with SIGKILL (ACTION "kill") or touches
ACTION.paused and waits until the file ACTION exists (the test does something meanwhile: starts a
second process, sends SIGINT)."""

import faulthandler
import importlib
import os
import signal
import sys
import time
from pathlib import Path

from jaxal import checkpoint

# SIGUSR1 prints every thread's stack: what a test shows when this process does not end as it should
faulthandler.register(signal.SIGUSR1, all_threads=True)
# Ctrl-C as a terminal delivers it. A job that a non-interactive shell starts in the background (`cmd &`)
# inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler: the suite run that way
# would otherwise see this process sleep through the test's SIGINT.
signal.signal(signal.SIGINT, signal.default_int_handler)
point, action, module = sys.argv[1:4]
save_state = checkpoint.save_state


def save_then_stop(mngr, step, state, meta):
    save_state(mngr, step, state, meta)
    if Path(str(mngr.directory)).name != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    Path(action + ".paused").touch()
    while not Path(action).exists():
        time.sleep(0.05)


checkpoint.save_state = save_then_stop
sys.exit(importlib.import_module(module).main(sys.argv[4:]))
