"""Download Debian packages and unpack them into a folder, without installing anything.

The text sources ship as Debian packages, which the machines we run on reach through their
ordinary package registry. ``apt-get download`` fetches the ``.deb`` into the current folder
(no root needed, nothing installed) and ``dpkg-deb -x`` unpacks its files. A ``.deb`` already
in the download folder is reused, so a machine without apt can be served by copying files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from lorashear.errors import DataError

#: What apt-get prints when its package lists do not know a package (then `apt-get update`).
_UNKNOWN_PACKAGE_MARKERS = ("Unable to locate package", "Can't select candidate version",
                            "has no installation candidate", "No packages found")


def find_downloaded_deb(package: str, debs_dir: str | Path) -> Path | None:
    """Return the newest-named ``<package>_*.deb`` already in ``debs_dir``, if any."""
    debs_dir = Path(debs_dir)
    candidates = sorted(debs_dir.glob(f"{package}_*.deb")) if debs_dir.is_dir() else []
    return candidates[-1] if candidates else None


def download_deb(package: str, debs_dir: str | Path, *, timeout_s: float = 900.0) -> Path:
    """Make sure ``<package>_*.deb`` is in ``debs_dir`` and return its path.

    Downloads with ``apt-get download`` into a temporary sibling folder and moves the file in
    whole, so an interrupted download never looks finished. When apt does not know the
    package, ``apt-get update`` runs once and the download is retried.
    """
    debs_dir = Path(debs_dir)
    existing = find_downloaded_deb(package, debs_dir)
    if existing is not None:
        return existing
    apt_get = _require_tool("apt-get", f"cannot download the Debian package {package}",
                            hint=f"on a machine without apt, copy {package}_*.deb into "
                            f"{debs_dir}")
    debs_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{package}.", dir=debs_dir) as partial:
        result = _run([apt_get, "download", package], cwd=partial, timeout_s=timeout_s)
        if result.returncode != 0 and _says_unknown(result):
            update = _run([apt_get, "update"], cwd=partial, timeout_s=timeout_s)
            if update.returncode != 0:
                raise DataError(f"apt-get does not know the package {package}, and "
                                f"'apt-get update' failed: {_last_line(update)}",
                                hint="run 'apt-get update' as root, then fetch again")
            result = _run([apt_get, "download", package], cwd=partial, timeout_s=timeout_s)
        if result.returncode != 0:
            raise DataError(f"cannot download the Debian package {package}: {_last_line(result)}",
                            hint="check the package name and that the package registry is "
                            "reachable")
        downloaded = sorted(Path(partial).glob(f"{package}_*.deb"))
        if not downloaded:
            raise DataError(f"apt-get download {package} succeeded but left no {package}_*.deb")
        target = debs_dir / downloaded[-1].name
        os.replace(downloaded[-1], target)
    return target


def extract_deb(deb: str | Path, destination: str | Path, *, timeout_s: float = 900.0) -> Path:
    """Unpack the files of ``deb`` under ``destination`` with ``dpkg-deb -x`` and return it."""
    dpkg_deb = _require_tool("dpkg-deb", f"cannot unpack {Path(deb).name}",
                             hint="install dpkg (Debian/Ubuntu: it is always there)")
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    result = _run([dpkg_deb, "-x", str(deb), str(destination)], cwd=None, timeout_s=timeout_s)
    if result.returncode != 0:
        raise DataError(f"dpkg-deb could not unpack {deb}: {_last_line(result)}",
                        hint="the file may be truncated: delete it and fetch again")
    return destination


def _require_tool(name: str, what: str, *, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DataError(f"{what}: '{name}' is not installed or not on PATH", hint=hint)
    return path


def _run(command: list[str], *, cwd: str | None, timeout_s: float
         ) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DataError(f"'{' '.join(command)}' did not finish within {timeout_s:.0f} s") from exc
    except OSError as exc:
        raise DataError(f"cannot run '{command[0]}': {exc}") from exc


def _says_unknown(result: subprocess.CompletedProcess[str]) -> bool:
    output = (result.stderr or "") + (result.stdout or "")
    return any(marker in output for marker in _UNKNOWN_PACKAGE_MARKERS)


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The most telling line of a failed command's output (apt's ``E:`` lines first)."""
    lines = [line.strip() for line in ((result.stderr or "") + "\n" + (result.stdout or ""))
             .splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"exit status {result.returncode}"
