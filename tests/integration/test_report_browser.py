"""The HTML report rendered by a real browser: headless Chromium draws every graph."""
import os
import shutil
import struct
import subprocess
import tempfile

import pytest



@pytest.fixture
def opt(residual_report):
    return residual_report


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_html_renders_in_headless_chromium(opt, tmp_path):
    path = tmp_path / "report.html"
    opt.report.to_html(str(path))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tempfile.mkdtemp()}"]
    dom = subprocess.run(flags + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "graphopt report: ResidualNet" in dom and dom.count("<svg") == 4 and "<rect" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,900", path.as_uri()],
                   capture_output=True, timeout=120)
    assert _png_size(shot) == (1200, 900)
    assert os.path.getsize(shot) > 20_000  # a blank page compresses to a few KB
