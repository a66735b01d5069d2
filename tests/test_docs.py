"""The documentation runs as written (issues 7 and 24): every `spd` command and Python block of
README.md and docs/*.md is executed, except those a visible rule below skips, and every relative
link (and its #anchor) resolves."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the README first: the pages build on its runs
SPD = [sys.executable, "-m", "spd.cli"]
ROOM = ROOT / "tests" / "fixtures" / "nyu_real" / "sync" / "rgb_00000.jpg"  # the `room.jpg` the snippets name

# A command containing one of these is not run here; the reason is the rule.
SKIP_COMMANDS = {
    "/data/nyu": "needs the NYU dataset",
    "/weights/": "needs downloaded weights",
    "runs/v15_nyu": "needs a model trained on NYU",
    "exports/v15_480x640": "needs a model trained on NYU",
    "spd bench": "takes minutes (its smoke test is in test_baseline_bench.py)",
    "spd serve": "runs until stopped (the service has test_serve.py)",
    "spd loadcheck": "takes 30 s and more (test_serve.py runs a short one)",
    "spd demo": "takes minutes (make demo)",
    "runs/ablation ": "trains eight models for half an hour (its smoke test is in test_ablation.py)",
}
# `spd train` in a page is cut to a few steps and `spd synth` to a few rooms; everything else runs as written.
TRAIN_CUT = ["--max-steps", "2", "--set", "data.workers=0", "--set", "eval.limit=2"]
SYNTH_CAP = {"--n-train": 16, "--n-test": 4}  # enough for a batch of 8 and an evaluation


def cut(args: list[str]) -> list[str]:
    """A page's command as the test runs it: training cut to two steps, synthetic sets to a few rooms."""
    if args[0] == "train":
        return args + TRAIN_CUT
    if args[0] == "synth":
        return [str(min(int(value), SYNTH_CAP[flag])) if flag in SYNTH_CAP else value
                for flag, value in zip([""] + args[:-1], args)]
    return args


def bash_lines(page: Path) -> list[str]:
    """The command lines of a page's ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def spd_commands() -> list[tuple[str, str]]:
    """(page name, command) for every `spd ...` line in page order."""
    return [(page.name, line) for page in PAGES for line in bash_lines(page) if line.startswith("spd ")]


def test_every_command_a_page_shows_is_an_spd_command_or_named_as_external():
    external = ("make ", "torchrun ", "trtexec ", "curl ", "tensorboard ", "pip ")
    unknown = [line for page in PAGES for line in bash_lines(page) if not line.startswith(("spd ", *external))]
    assert not unknown, unknown


def test_help_lists_every_subcommand_the_pages_use():
    help_text = subprocess.run(SPD + ["--help"], capture_output=True, text=True, check=True).stdout
    used = {line.split()[1] for _, line in spd_commands()} - {"--help"}
    assert used <= set(re.findall(r"\b(\w+)\b", help_text)), used


# Runs `spd` command lines (JSON on stdin) one after another in one process, as the `spd` entry point
# would one per process: the ~8 s of imports a process costs on a 2-core CPU are paid once, not 15 times.
# Prints one JSON line per command: its exit code and the end of what it wrote to stderr.
RUN_IN_ONE_PROCESS = """
import contextlib, io, json, sys
from spd.cli.main import main
for args in json.load(sys.stdin):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    print(json.dumps({"code": code, "stderr": err.getvalue()[-2000:]}), flush=True)
    if code:
        break
"""


def test_cheap_commands_run_as_written(tmp_path):
    """Every page's `spd` commands in order in one folder (cut: training to two steps, synthetic sets to a few rooms)."""
    shutil.copy(ROOM, tmp_path / "room.jpg")
    commands, skipped = [], []
    for page, line in spd_commands():
        if any(needle in line for needle in SKIP_COMMANDS):
            skipped.append(line)
            continue
        commands.append((page, line, cut(shlex.split(line)[1:])))
    process = subprocess.run([sys.executable, "-c", RUN_IN_ONE_PROCESS], input=json.dumps([c[2] for c in commands]),
                             cwd=tmp_path, capture_output=True, text=True)
    results = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    ran = []
    for (page, line, args), result in zip(commands, results):
        assert result["code"] == 0, f"{page}: {line}\n{result['stderr']}"
        ran.append(args[0])
    assert len(results) == len(commands), process.stderr[-2000:]
    assert {"params", "synth", "data", "train", "eval", "predict", "export"} <= set(ran)
    assert (tmp_path / "overlay.png").is_file()
    assert skipped  # the rule above is exercised, not dead


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text()], ids=lambda p: p.name)
def test_python_blocks_run_as_written(tmp_path, page):
    """A page's ```python blocks, in order, as one script, with a real NYU frame as `room.jpg`; a page
    whose blocks predict (`depth_m = ...`) must get the two depths its example asks for."""
    shutil.copy(ROOM, tmp_path / "room.jpg")
    blocks = "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
    predicts = "depth_m =" in blocks
    script = tmp_path / "blocks.py"
    script.write_text(blocks + ("\nprint('depth_m', depth_m.shape)\n" if predicts else ""))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not predicts or "depth_m (2,)" in result.stdout


def _anchors(page: Path) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_readme_stays_short_and_architecture_names_every_model_module():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    modules = sorted(p.name for p in (ROOT / "src" / "spd" / "models").glob("*.py"))
    assert [m for m in modules if f"`{m}`" not in architecture] == []
