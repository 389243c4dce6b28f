#!/usr/bin/env python
"""Summarise and draw a trace: the same as `offload timeline TRACE -o out.png [--html out.html] [--step N]`,
runnable from a checkout without installing (the logic lives in offload/timeline.py)."""
import os
import sys

# A checkout's tools/ sits beside offload/; put the checkout first so this uses its own package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from offload.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["timeline", *sys.argv[1:]]))
