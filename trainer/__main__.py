"""`python -m trainer`: see trainer/cli.py."""

import os
import signal
import sys

try:
    from trainer.cli import main

    code = main()
except KeyboardInterrupt:  # before main could catch it
    code = 128 + signal.SIGINT
if code == 128 + signal.SIGTERM:
    # Die of the signal, as a stopped process does: its parent (the GUI) reads
    # "killed by SIGTERM" as the stop it asked for.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
sys.exit(code)
