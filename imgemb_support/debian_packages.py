"""Real services for the tests come from Debian's packages: found, or installed when the tests may.

CI runs as root with apt-get, so a missing package is installed there (and `.ci/run` installs it up
front); only a developer machine that is not root, has no apt-get and is not CI skips. Anywhere
else a missing service fails, so CI can never pass without having run the tests that need it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from typing import TypeVar

import pytest

Found = TypeVar("Found")


def _install_with_apt(package: str) -> None:
    # Quiet unless it fails: the output is only useful then.
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]):
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(args)}` failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def installed_or_fail(package: str, find: Callable[[], Found | None], where: str) -> Found:
    """What `find` finds of `package` (`where` says where it looks), installing the package when missing."""
    found = find()
    if found is not None:
        return found
    is_root = os.geteuid() == 0
    has_apt = shutil.which("apt-get") is not None
    if is_root and has_apt:
        _install_with_apt(package)
        found = find()
        if found is not None:
            return found
        pytest.fail(f"apt-get installed {package} but nothing was found in {where}")
    reasons = ", ".join(why for why, holds in (("not root", not is_root), ("no apt-get", not has_apt)) if holds)
    message = (
        f"{package} is not installed ({where}) and cannot be installed here ({reasons}): install Debian's `{package}`"
    )
    if not is_root and not has_apt and not os.environ.get("CI"):
        pytest.skip(message)
    pytest.fail(message)
