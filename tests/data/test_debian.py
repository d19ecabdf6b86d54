"""Downloading and unpacking Debian packages, with stand-in apt-get scripts (no network)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lorashear.data import cache, debian
from lorashear.data.debian import download_deb, extract_deb, find_downloaded_deb
from lorashear.data.sources import fetch_sources
from lorashear.errors import DataError

# A stand-in apt-get: `download` fails as "unknown" until `update` has run, then writes a .deb.
FAKE_APT = """#!/bin/sh
echo "$@" >> "{log}"
if [ "$1" = update ]; then {update}; : > "{state}"; exit 0; fi
if [ "$1" = download ]; then
  if [ ! -e "{state}" ]; then echo "E: Unable to locate package $2" >&2; exit 100; fi
  {download}
fi
"""


def install_fake_apt(folder: Path, *, update: str = "true",
                     download: str = 'echo data > "$2_1.0_all.deb"') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "calls.log"
    script = folder / "apt-get"
    script.write_text(FAKE_APT.format(log=log, state=folder / "updated", update=update,
                                      download=download))
    script.chmod(0o755)
    return log


def test_unknown_package_runs_update_once_then_downloads(tmp_path, monkeypatch):
    log = install_fake_apt(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    deb = download_deb("sword-text-kjv", tmp_path / "debs")
    assert deb == tmp_path / "debs" / "sword-text-kjv_1.0_all.deb" and deb.read_text() == "data\n"
    assert log.read_text().splitlines() == ["download sword-text-kjv", "update",
                                            "download sword-text-kjv"]
    assert [p.name for p in (tmp_path / "debs").iterdir()] == [deb.name], "no temporary left"
    # Already downloaded: apt-get is not even needed.
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert download_deb("sword-text-kjv", tmp_path / "debs") == deb


def test_download_failures_are_data_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="'apt-get' is not installed") as caught:
        download_deb("sword-text-kjv", tmp_path / "debs")
    assert "copy sword-text-kjv_*.deb" in str(caught.value)

    install_fake_apt(tmp_path / "a", update='echo "E: permission denied" >&2; exit 100')
    monkeypatch.setenv("PATH", str(tmp_path / "a"))
    with pytest.raises(DataError, match="'apt-get update' failed: E: permission denied"):
        download_deb("sword-text-kjv", tmp_path / "debs")

    install_fake_apt(tmp_path / "b", download='echo "E: Failed to fetch http://x 404" >&2; exit 1')
    monkeypatch.setenv("PATH", str(tmp_path / "b"))
    (tmp_path / "b" / "updated").touch()
    with pytest.raises(DataError, match="cannot download the Debian package nope: E: Failed"):
        download_deb("nope", tmp_path / "debs")

    install_fake_apt(tmp_path / "c", download="exit 0")
    monkeypatch.setenv("PATH", str(tmp_path / "c"))
    (tmp_path / "c" / "updated").touch()
    with pytest.raises(DataError, match="left no"):
        download_deb("ghost", tmp_path / "debs")
    assert find_downloaded_deb("ghost", tmp_path / "debs") is None


def test_missing_dpkg_deb(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="'dpkg-deb' is not installed"):
        extract_deb(tmp_path / "x.deb", tmp_path / "out")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")
def test_real_deb_from_the_download_folder_is_used(tmp_path, monkeypatch, make_sword_module):
    """A .deb built here with dpkg-deb, placed where downloads go: fetch needs no apt-get."""
    tree = tmp_path / "pkg"
    make_sword_module(tree, "KJV", {"ot": [["In the beginning.", "And the earth."]]})
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        "Package: sword-text-kjv\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n")
    debs = cache.debs_dir(tmp_path / "cache")
    debs.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(tree),
                    str(debs / "sword-text-kjv_1.0_all.deb")], check=True, capture_output=True)
    commands: list[str] = []
    real_run = debian._run

    def spy(command, **kwargs):
        commands.append(Path(command[0]).name)
        return real_run(command, **kwargs)

    monkeypatch.setattr(debian, "_run", spy)
    outcomes = fetch_sources(["kjv"], tmp_path / "cache")
    assert commands == ["dpkg-deb"]
    assert outcomes[0].status == "fetched"
    found = cache.find_cached("kjv", tmp_path / "cache")
    assert found.manifest["deb"] == "sword-text-kjv_1.0_all.deb"
    text = found.split_path("train").read_text() + found.split_path("heldout").read_text()
    assert "In the beginning. And the earth." in text
    broken = tmp_path / "broken.deb"
    broken.write_bytes(b"not an archive")
    with pytest.raises(DataError, match="could not unpack"):
        extract_deb(broken, tmp_path / "out")
