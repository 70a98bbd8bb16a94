"""Progress bars: live on a terminal, one line each elsewhere; errors always start a line of their own."""

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

import yaml
from PIL import Image

from memsafe.progress import close_all_bars, progress_bar
from tests.conftest import tiny_config_dict


def test_a_bar_writes_one_line_when_its_stream_is_not_a_terminal():
    stream = io.StringIO()
    for _ in progress_bar(range(2000), desc="work", file=stream, mininterval=0):
        pass
    assert stream.getvalue().count("\n") == 1 and "\r" not in stream.getvalue()
    assert stream.getvalue().startswith("work: 100%") and "2000/2000" in stream.getvalue()
    hidden = io.StringIO()
    for _ in progress_bar(range(10), file=hidden, leave=False):
        pass
    assert hidden.getvalue() == ""


def test_close_all_bars_ends_a_bar_left_open():
    stream = io.StringIO()
    bar = progress_bar(total=10, desc="left open", file=stream)
    bar.update(3)
    close_all_bars()
    assert stream.getvalue().startswith("left open:  30%") and stream.getvalue().count("\n") == 1
    assert bar.disable  # closed


def _image_folder(folder, count):
    folder.mkdir()
    for i in range(count):
        Image.new("L", (8, 8), color=i % 256).save(folder / f"{i:04d}.png")
    data = (folder / f"{count - 1:04d}.png").read_bytes()
    (folder / f"{count - 1:04d}.png").write_bytes(data[: len(data) // 2])  # the last one is truncated


def test_an_error_during_a_progress_bar_is_printed_on_its_own_line_on_a_terminal(tmp_path):
    _image_folder(tmp_path / "images", 501)  # decoding 500 or more images shows a bar
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "run", data={"source": str(tmp_path / "images"),
                                                                             "max_train_images": None, "holdout_images": 0})))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    process = subprocess.Popen([sys.executable, "-m", "memsafe.cli", "train", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=120) == 1
    lines = output.decode().replace("\r\n", "\n").split("\n")
    errors = [line for line in lines if "memsafe: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("memsafe: error: cannot read image"), output.decode()
    assert "decoding images" in output.decode()  # the bar was shown, then closed before the error
    assert not (tmp_path / "run").exists()
