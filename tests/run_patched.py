"""Run pytest in a process monkeypatched by the given hub, before pytest imports anything.

python tests/run_patched.py gevent|eventlet [pytest args...]
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    # a match, not an `in` test, so mypy narrows the hub to green.HubName
    match sys.argv[1:2]:
        case ["gevent" | "eventlet" as hub]:
            pass
        case _:
            print("usage: run_patched.py gevent|eventlet [pytest args...]", file=sys.stderr)
            return 2
    from greenworker import green

    green.patch(hub)
    os.environ["GREENWORKER_TEST_HUB"] = hub
    import pytest

    return int(pytest.main(["-p", "no:cacheprovider", *sys.argv[2:]]))


if __name__ == "__main__":
    sys.exit(main())
