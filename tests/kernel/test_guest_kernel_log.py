"""In the guest, after every other test (conftest moves it last): the kernel log is clean."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

pytestmark = pytest.mark.kernel

#: What a kernel splat starts with: BUG: (NULL dereference, soft lockup, sleeping in atomic),
#: WARNING: (WARN_ON), Oops (the oops header).
SPLAT = re.compile(r"BUG:|WARNING:|Oops")


def test_kernel_log_has_no_bug_warning_or_oops(guest: dict[str, Any]) -> None:
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    splats = [line for line in log.splitlines() if SPLAT.search(line)]
    assert not splats, "kernel log:\n" + "\n".join(splats)
