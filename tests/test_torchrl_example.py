"""examples/torchrl_collector.py run as a user would: a subprocess, TorchRL collectors in real workers, real learning.

The default suite runs a short budget and checks that the mean episodic return clearly rises (the workers' policy
can only improve if the TorchRL weight-sync scheme applies the trainer's weights) and that the workers' own metrics
reach the trainer's CSV; the full solve is marked slow.
"""

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "torchrl_collector.py"


def run_example(out_dir: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not re.match(r"^(MASTER_PORT|LOCAL_RANK|RANK|WORLD_SIZE)$", key)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(EXAMPLE), "--out-dir", str(out_dir), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    return result


def read_metrics(out_dir: Path) -> list[dict]:
    (metrics,) = out_dir.glob("torchrl_collector/version_*/metrics.csv")
    with open(metrics) as handle:
        return list(csv.DictReader(handle))


def series(rows: list[dict], name: str) -> list[tuple[int, float]]:
    points = []
    for row in rows:
        value = row.get(name, "")
        if value not in ("", "nan") and not math.isnan(float(value)):
            points.append((int(row["step"]), float(value)))
    return points


@pytest.mark.timeout(150)
def test_short_run_learns(tmp_path: Path) -> None:
    """20K env steps: the mean return of the last 20 episodes rises far above a random policy's (about 22)."""
    result = run_example(tmp_path, "--total-frames", "20000", timeout=140)
    rows = read_metrics(tmp_path)
    points = series(rows, "charts/episodic_return")
    assert len(points) >= 10, points
    early = max(value for _, value in points[:3])
    late = max(value for _, value in points[-5:])
    assert early < 60, f"a fresh policy should score like a random one, got {early}"
    assert late > 100 and late > 3 * early, f"the mean return did not clearly rise: {early:.1f} -> {late:.1f}"
    for worker in (0, 1):  # logged by the workers with ctx.log_dict, written by the trainer's logger
        assert series(rows, f"worker{worker}/collector_fps"), f"no collector speed from worker {worker}"
    summary = next(tmp_path.glob("torchrl_collector/version_*/summary.txt")).read_text()
    assert "env steps" in summary and "version lag" in summary
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_default_flags_solve_cartpole(tmp_path: Path) -> None:
    """Default flags: mean return >= 475 over 20 episodes within the budget, then training stops."""
    result = run_example(tmp_path, timeout=290)
    match = re.search(r"^solved: .* at (\d+) env steps, ([\d.]+)s wall time", result.stdout, re.MULTILINE)
    assert match, f"never solved:\n{result.stdout[-4000:]}"
    print(f"solved at {match.group(1)} env steps, {match.group(2)}s wall time from process start")
    assert int(series(read_metrics(tmp_path), "charts/episodic_return")[-1][0]) == int(match.group(1))
