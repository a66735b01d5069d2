"""The README's commands run as written (the cheap ones), and `spd --help` matches it (issue 7)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPD = [sys.executable, "-m", "spd.cli"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("spd ")]


def test_help_lists_every_subcommand_the_readme_uses():
    help_text = subprocess.run(SPD + ["--help"], capture_output=True, text=True, check=True).stdout
    used = {line.split()[1] for line in readme_commands()} - {"--help"}
    assert used <= set(re.findall(r"\b(\w+)\b", help_text)), used
    for sub in sorted(used):
        subprocess.run(SPD + [sub, "--help"], capture_output=True, check=True)


def test_cheap_readme_commands_run_as_written(tmp_path):
    """synth, data check, params, train (cut to 2 steps), eval and predict, in the README's order."""
    ran = []
    for line in readme_commands():
        args = shlex.split(line)[1:]
        if args[0] in ("bench", "--help", "serve", "loadcheck") or any(
            needs in line for needs in ("/data/nyu", "/path/to", "runs/v15_nyu", "exports/v15_480x640")
        ):
            continue  # bench takes minutes, serve runs until stopped; NYU needs the dataset and a trained model
        if args[0] == "train":
            args += ["--max-steps", "2", "--set", "data.workers=0", "--set", "eval.limit=2"]
        result = subprocess.run(SPD + args, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
        ran.append(args[0])
    assert {"params", "synth", "data", "train", "eval", "predict", "export"} <= set(ran)
    assert (tmp_path / "overlay.png").is_file()


def test_python_blocks_run_as_written(tmp_path):
    """Every ```python block of the README, in order, in one namespace, with a real NYU frame as the
    `room.jpg` the snippet names."""
    import shutil

    shutil.copy(ROOT / "tests" / "fixtures" / "nyu_real" / "sync" / "rgb_00000.jpg", tmp_path / "room.jpg")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n".join(blocks) + "\nprint('depth', depth.shape, 'depth_m', depth_m.shape, 'xyz', xyz.shape)\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "depth torch.Size([1, 2]) depth_m (2,) xyz (1, 3)" in result.stdout
